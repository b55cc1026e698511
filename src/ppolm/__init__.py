"""ppolm: Proximal Policy Optimization for language models."""

from ppolm.advantages import compute_gae, masked_mean, masked_var, whiten
from ppolm.config import PPOConfig
from ppolm.env import TextGenerationEnv, read_prompts
from ppolm.errors import (
                          CheckpointError,
                          ConfigError,
                          DataError,
                          PPOLMError,
                          RewardError,
                          TrainingError,
)
from ppolm.evaluate import EvalResult, distinct_n, evaluate
from ppolm.kl_budget import BudgetFit, WeightPath, fit_kl_budget
from ppolm.kl_control import KLController
from ppolm.losses import entropy, kl_penalty, policy_loss, value_loss
from ppolm.models import chat_prompts, freeze_lower_layers, load_gguf, load_smollm2
from ppolm.policies import HFPolicy, LSTMPolicy, Policy, TransformerPolicy, ValueHead
from ppolm.rewards import (
    CallableReward,
    RewardFunction,
    SentimentReward,
    SequenceClassifierReward,
    WeightedReward,
)
from ppolm.tokenization import char_tokenizer
from ppolm.trainer import Trainer
from ppolm.types import Episodes, Rollout

__version__ = "0.1.0"

__all__ = [
    "BudgetFit", "CallableReward", "CheckpointError", "ConfigError", "DataError", "Episodes",
    "EvalResult", "HFPolicy", "KLController", "LSTMPolicy", "PPOConfig", "PPOLMError", "Policy",
    "RewardError", "RewardFunction", "Rollout", "SentimentReward", "SequenceClassifierReward",
    "TextGenerationEnv", "Trainer", "TrainingError", "TransformerPolicy", "ValueHead",
    "WeightPath", "WeightedReward", "char_tokenizer", "chat_prompts", "compute_gae", "distinct_n",
    "entropy", "evaluate", "fit_kl_budget", "freeze_lower_layers", "kl_penalty", "load_gguf",
    "load_smollm2", "masked_mean", "masked_var", "policy_loss", "read_prompts", "value_loss",
    "whiten",
]
