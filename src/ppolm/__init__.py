"""ppolm: Proximal Policy Optimization for language models."""

from ppolm.config.ppo import PPOConfig
from ppolm.config.reward_model import RewardModelConfig
from ppolm.engines import Engine, FastCPUEngine, PlainEngine
from ppolm.errors import (
                          CheckpointError,
                          ConfigError,
                          DataError,
                          PPOLMError,
                          RewardError,
                          TrainingError,
)
from ppolm.evaluation.callback import EvalCallback
from ppolm.evaluation.evaluate import EvalResult, distinct_n, evaluate
from ppolm.evaluation.kl_budget import BudgetFit, WeightPath, fit_kl_budget
from ppolm.maths.advantages import compute_gae, masked_mean, masked_var, whiten
from ppolm.maths.losses import entropy, kl_penalty, policy_loss, value_loss
from ppolm.observe.callbacks import Callback
from ppolm.observe.health import HealthMonitor, PPOHealthWarning
from ppolm.policies import HFPolicy, LSTMPolicy, Policy, TransformerPolicy, ValueHead
from ppolm.policies.pretrained import chat_prompts, freeze_lower_layers, load_gguf, load_smollm2
from ppolm.policies.reward_model import RewardModel
from ppolm.reward_modeling.trainer import RewardModelTrainer
from ppolm.rollout.env import TextGenerationEnv, read_prompts
from ppolm.rollout.interaction import Interaction, Reply
from ppolm.rollout.learned_reward import RewardModelReward
from ppolm.rollout.rewards import (
                          CallableReward,
                          RewardFunction,
                          SentimentReward,
                          SequenceClassifierReward,
                          WeightedReward,
)
from ppolm.rollout.tokenization import char_tokenizer
from ppolm.rollout.tools import ToolInteraction
from ppolm.rollout.types import Advantages, Episodes, Rollout
from ppolm.training.kl_control import KLController
from ppolm.training.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "Advantages", "BudgetFit", "CallableReward", "Callback", "CheckpointError", "ConfigError",
    "DataError", "Engine", "Episodes", "EvalCallback", "EvalResult", "FastCPUEngine", "HFPolicy",
    "HealthMonitor", "Interaction", "KLController", "LSTMPolicy", "PPOConfig", "PPOHealthWarning",
    "PPOLMError", "PlainEngine", "Policy", "Reply", "RewardError", "RewardFunction",
    "RewardModel", "RewardModelConfig", "RewardModelReward", "RewardModelTrainer", "Rollout",
    "SentimentReward", "SequenceClassifierReward", "TextGenerationEnv", "ToolInteraction",
    "Trainer",
    "TrainingError", "TransformerPolicy", "ValueHead", "WeightPath", "WeightedReward",
    "char_tokenizer", "chat_prompts", "compute_gae", "distinct_n", "entropy", "evaluate",
    "fit_kl_budget", "freeze_lower_layers", "kl_penalty", "load_gguf", "load_smollm2",
    "masked_mean", "masked_var", "policy_loss", "read_prompts", "value_loss", "whiten",
]
