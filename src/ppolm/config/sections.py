"""The three sections of a PPOConfig, declared (``ppolm.config.ppo`` validates them):
``AlgorithmConfig`` (what PPO computes), ``SystemConfig`` (how) and ``RunConfig`` (files and
feedback)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

KLMode = Literal["reward", "loss"]
KLEstimator = Literal["k1", "k2", "k3", "full"]
LRSchedule = Literal["constant", "linear", "cosine"]
RolloutLogprobs = Literal["sampler", "forward"]
RatioLevel = Literal["token", "sequence"]
AdvantageEstimator = Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp",
                             "reinforce_pp_baseline"]
LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                          "seq-mean-token-sum-norm"]
#: The estimators that need no value function: no value head is built or run.
CRITIC_FREE = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
#: Those that compare the responses of a group (samples_per_prompt >= 2).
GROUPED = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
#: Each estimator's loss aggregation when ``loss_aggregation`` is None: token-mean for GAE (as
#: before) and REINFORCE++ (OpenRLHF), the per-sequence mean of GRPO (Shao et al. 2024, eq. 3),
#: the constant normaliser of Dr. GRPO (Liu et al. 2025).
DEFAULT_AGGREGATION = {"gae": "token-mean", "grpo": "seq-mean-token-mean",
                       "dr_grpo": "seq-mean-token-sum-norm", "rloo": "token-mean",
                       "reinforce_pp": "token-mean", "reinforce_pp_baseline": "token-mean"}
EngineName = Literal["auto", "plain", "fast_cpu"]
Distributed = Literal["ddp", "fsdp"]


@dataclass
class AlgorithmConfig:
    """What PPO computes: loop sizes, the sampling training computes with, optimisation,
    advantages, losses, KL control and the weights training ends with. (A declaration: build a
    ``PPOConfig``, which validates.)"""

    # --- loop sizes --------------------------------------------------------------------------
    iterations: int = 100
    """Number of PPO iterations (rollout + update)."""
    batch_size: int = 32
    """Episodes (prompt + sampled response) collected per iteration."""
    minibatch_size: int = 8
    """Episodes per optimizer step; must divide ``batch_size``."""
    micro_batch_size: int | None = None
    """Episodes per forward/backward pass; gradients of ``minibatch_size / micro_batch_size``
    micro-batches are accumulated before each optimizer step. None means ``minibatch_size``."""
    ppo_epochs: int = 4
    """Passes over the rollout batch per iteration (K in the PPO paper)."""

    # --- sampling ----------------------------------------------------------------------------
    # The two sampling settings training computes with; the environment holds the other four
    # (max_new_tokens, top_k, top_p, stop_token_ids). All six are declared and checked in
    # ppolm.config.sampling; a run's YAML gives them in one ``sampling:`` section.
    temperature: float = 1.0
    """Sampling temperature; logits are divided by it for sampling AND for every logprob
    computed for training and for the reference, so the first ratio is exactly 1."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt (group sampling): each prompt of a batch is sampled k
    times, its responses side by side; ``batch_size`` counts episodes and must be a multiple
    of k. The grouped estimators compare the responses of a group."""

    # --- optimisation ------------------------------------------------------------------------
    learning_rate: float = 3e-4
    """Adam learning rate for the policy and the value head."""
    lr_schedule: LRSchedule = "constant"
    """Learning-rate schedule over the optimizer steps after the warm-up: constant, linear (to 0)
    or cosine."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up (lr x 1/n, 2/n, ..., 1) before the schedule, which then
    runs over the remaining steps; a run shorter than the warm-up never reaches the full rate.
    Adam's first steps move every weight by about the full learning rate whatever the
    gradient's size; a warm-up keeps them small."""
    adam_eps: float = 1e-5
    """Adam epsilon (1e-5 as in CleanRL and OpenAI baselines)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; None disables clipping."""
    max_bad_updates: int = 5
    """Stop with TrainingError after this many non-finite updates in a row (each is skipped)."""

    # --- advantages --------------------------------------------------------------------------
    advantage_estimator: AdvantageEstimator = "gae"
    """'gae' (PPO with a value function: GAE(gamma, lam) on the per-token rewards), or a
    critic-free one (no value head is built or run): 'grpo' ((r - group mean) / group std),
    'dr_grpo' (r - group mean), 'rloo' (r - mean of the other k - 1), 'reinforce_pp' (returns
    of the score and the per-token KL penalty, whitened over the batch),
    'reinforce_pp_baseline' (the group mean subtracted first). Formulas and references:
    docs/maths.md. grpo, dr_grpo and rloo take the KL in the loss (``kl_mode`` picks 'loss' for
    them)."""
    gamma: float = 1.0
    """Discount factor over response tokens, in [0, 1]."""
    lam: float = 0.95
    """GAE lambda, in [0, 1]."""
    whiten_rewards: bool = False
    """Whiten the scores over the batch before adding the KL penalty."""
    whiten_advantages: bool = True
    """Whiten advantages over the valid tokens of the batch (masked mean and variance)."""

    # --- losses ------------------------------------------------------------------------------
    loss_aggregation: LossAggregation | None = None
    """How the per-token policy-loss terms (and the entropy bonus and the KL in the loss) of a
    minibatch become one number: 'token-mean' (over all its tokens), 'seq-mean-token-mean'
    (each sequence's mean, averaged), 'seq-mean-token-sum' (each sequence's sum, averaged),
    'seq-mean-token-sum-norm' (the sum over max_new_tokens x sequences, a constant: Dr. GRPO).
    None: the estimator's usual choice (gae, rloo, reinforce_pp*: token-mean; grpo:
    seq-mean-token-mean; dr_grpo: seq-mean-token-sum-norm). The value loss is a token mean."""
    clip_range: float = 0.2
    """PPO ratio clip epsilon: the ratio is clipped to [1 - clip_range, 1 + clip_range]."""
    clip_range_low: float | None = None
    """Decoupled clipping: the lower epsilon, the ratio clipped below at 1 - clip_range_low.
    None: ``clip_range``."""
    clip_range_high: float | None = None
    """Decoupled clipping: the upper epsilon, the ratio clipped above at 1 + clip_range_high
    (DAPO's clip-higher uses 0.28 with 0.2 below: unlikely tokens with a positive advantage
    may grow further, which keeps the entropy from collapsing). None: ``clip_range``. At least
    the lower one."""
    ratio_level: RatioLevel = "token"
    """'token': one ratio per token (PPO). 'sequence': GSPO (Zheng et al. 2025), each sequence's
    length-normalised ratio (pi(y)/pi_old(y))^(1/|y|), clipped per sequence; its ratios stay
    near 1, so GSPO clips at about 3e-4 below and 4e-4 above (the ``gspo`` recipe)."""
    tis_cap: float | None = None
    """Truncated importance sampling (Yao et al. 2025) for rollouts sampled under other
    numerics than training's: each token's loss is multiplied by min(pi_old / pi_rollout,
    tis_cap), pi_old the trainer's probability (a forward over the finished sequences),
    pi_rollout the sampler's. Needs rollout_logprobs='forward'. None: off (e.g. 2.0 on)."""
    clip_range_value: float | None = 0.2
    """Clip the new values to within this distance of the rollout values; None disables it."""
    vf_coef: float = 0.5
    """Weight of the value loss in the total loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    target_approx_kl: float | None = None
    """Stop the epochs of an iteration early once the epoch's mean approx_kl exceeds this."""

    # --- which groups are trained on ----------------------------------------------------
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (grouped estimators): a group whose rewards are all equal has
    no signal, so it is dropped and further prompt groups are sampled until the batch is full
    (at most ``max_sampling_rounds`` rounds; then the batch is completed with dropped groups,
    with a warning). Logged: sampling_rounds, groups_dropped, sampled_per_trained, and
    sampled_score_mean (the mean score of every episode sampled: score_mean is the trained
    batch's, without the groups that all scored alike)."""
    max_sampling_rounds: int = 4
    """With dynamic_sampling: the most sampling rounds per iteration (the first included)."""

    # --- KL control --------------------------------------------------------------------------
    kl_coef: float = 0.05
    """Initial KL coefficient beta against the frozen reference policy."""
    kl_mode: KLMode | None = None
    """Where the KL acts: 'reward' (per-token penalty in the reward, as OpenAI/TRL) or 'loss'
    (a KL term added to the policy loss, GRPO style). None (default): the estimator's natural
    choice, set when the config is built: 'loss' for grpo, dr_grpo and rloo (their advantages
    come from the scores alone) and with kl_estimator='full', 'reward' otherwise."""
    kl_estimator: KLEstimator = "k1"
    """Per-token KL estimator: k1 = logp - logp_ref, k2 = (logp - logp_ref)^2 / 2,
    k3 = (r - 1) - log r with r = p_ref / p (on the sampled token), or 'full', the exact KL
    over the vocabulary (kl_mode='loss' only; the rollout then holds the reference's whole
    distribution, batch_size x response length x vocabulary floats)."""
    adaptive_kl: bool = False
    """Adapt kl_coef toward kl_target (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target KL per response (nats) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (episodes) of the adaptive controller."""

    # --- the weights training ends with ------------------------------------------------------
    average_last: int = 0
    """End training with the uniform mean of the policy's trainable weights after each of the
    last N iterations instead of the last iterate (tail averaging, see
    ppolm.training.averaging): when the late iterates scatter around a fixed point, their noise,
    and the KL it costs, averages out. 0 (default): the last iterate. At most ``iterations``."""


@dataclass
class FastCPUSettings:
    """The fast CPU engine's own switches (``PPOConfig`` fields of the same names; each
    technique, its measured gain and its test: docs/performance.md)."""

    cpu_bf16: bool = False
    """bf16 autocast on CPU (AMX or AVX-512 BF16 units): the LM head's products in bf16, its
    softmax, its weight gradient, the attention and the values in float32; weights, gradients
    and optimizer state stay float32. Refused where PyTorch reports no bf16 support."""
    compile: bool = False
    """The trunks' whole-sequence passes (the update's forward and backward, the rollout's
    reference and critic forwards) through ``torch.compile``; decoding steps stay eager.
    ``transformers`` policies and ``TransformerPolicy``; needs a C++ compiler. The first
    iterations pay the compile time."""
    keep_freed_memory: bool = False
    """Have glibc's malloc keep freed memory for reuse (Linux): the tensors freed every
    minibatch are not page-faulted in again. Process-wide and not undone (the process keeps its
    peak memory), so off from the library; the ``ppolm train`` command turns it on."""
    reuse_frozen_layers: bool = True
    """With frozen lower layers (``freeze_lower_layers``), run them once per rollout (from the
    sampling pass) and start every training forward, and the reference's when it shares them,
    above them. Used only where the split trunk is checked to equal the whole trunk."""
    static_decoding: bool = True
    """Decoding steps of Llama-family ``transformers`` models (Llama, Mistral, Qwen2, SmolLM2)
    over a KV cache allocated once per rollout, with the mask and rotary angles made once per
    step, instead of ``DynamicCache`` growing by a copy each step. Used only where a probe
    gives the model's own hidden states."""
    packed_weights: bool = True
    """With ``static_decoding``, the decoding steps' matrix products (and the head's) over
    weights packed once per rollout for oneDNN's kernel: about twice ``F.linear``'s speed at
    a batch's few rows. float32 sums in another order (sampled logprobs equal to float32
    rounding, not bitwise); bf16 equals autocast's. Where torch has oneDNN."""
    prefill_once: bool = True
    """With ``static_decoding``, a prompt that fills several rows of a rollout
    (``samples_per_prompt`` > 1) is run through the model once before decoding, its states
    copied to each of its rows. A batch of another size sums in another order: sampled
    logprobs equal to float32 rounding, not bitwise."""


@dataclass
class SystemConfig(FastCPUSettings):
    """How the numbers are computed: the engine, the device, precision, the seed; the fast CPU
    engine's switches (``cpu_bf16``, ``compile``, ``keep_freed_memory``,
    ``reuse_frozen_layers``, ``static_decoding``, ``packed_weights``, ``prefill_once``) are
    declared with that engine (``FastCPUSettings``)."""

    engine: EngineName = "auto"
    """'plain' (torch as users know it: AdamW, clip_grad_norm_, autocast on CUDA), 'fast_cpu'
    (the single-process CPU engine, docs/performance.md) or 'auto' (fast_cpu on CPU, plain
    elsewhere)."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    bf16: bool = True
    """bf16 autocast on CUDA (on CPU see ``cpu_bf16``, a fast_cpu setting); with FSDP2, bf16
    parameters in its mixed precision (gradients reduced in float32)."""
    distributed: Distributed = "ddp"
    """Under torchrun (any number of ranks): 'ddp' (every rank holds whole models; gradients
    all-reduced) or 'fsdp' (FSDP2: parameters, gradients and AdamW state sharded over the
    ranks, each decoder layer gathered while it runs). See docs/distributed.md."""
    dist_timeout: float = 600.0
    """Seconds a collective waits for a rank that stopped answering before it raises (no
    rank hangs for ever)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer of the trained models in backward instead of keeping its
    activations (transformers policies; the plain and distributed engines)."""
    seed: int = 0
    """Seed of every random generator of the run."""
    rollout_logprobs: RolloutLogprobs = "sampler"
    """Where the rollout's logprobs and value-head states come from. 'sampler': the sampling
    pass itself (the states that drew each token), so the rollout runs no forward of the
    policy; the first ratio is 1 up to float rounding. 'forward': one more forward pass over
    the finished sequences, the same computation as the update's, so the first ratio is
    exactly 1."""


@dataclass
class RunConfig:
    """Files and feedback of a run."""

    output_dir: str | None = None
    """Where metrics.jsonl and checkpoints go. None (the default from Python): no files are
    written (``trainer.save(path)`` still writes a checkpoint where asked); the ``ppolm train``
    command always sets one."""
    overwrite: bool = False
    """Let a new run start in an output_dir that holds an earlier run's checkpoints or metrics,
    deleting them. Without it such a start is refused (resume continues the earlier run)."""
    save_every: int = 0
    """Save a checkpoint every this many iterations (0: only at the end); needs output_dir."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep on disk."""
    progress: bool = True
    """Show a progress bar."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that receive the metrics too (metrics.jsonl is always written):
    any of 'tensorboard', 'wandb' (offline unless WANDB_MODE says otherwise), 'trackio'
    (local), 'mlflow' (a file store in output_dir unless MLFLOW_TRACKING_URI is set); [] or
    ['none'] for none. Each needs its package (``pip install ppolm[NAME]``) and an output_dir,
    where the tracker's run id is kept so that a resumed run continues the same tracker run."""
    log_samples_every: int = 10
    """Record sampled prompts and responses (with reward and KL) every this many iterations,
    and at the first and the last: samples.jsonl in output_dir, and a table in the trackers
    that have tables. 0: never."""
    tracker_project: str = "ppolm"
    """The project (W&B, trackio) or experiment (MLflow) the trackers log the run under; the
    run is named after output_dir."""
    health_checks: bool = True
    """Watch the metrics for known signs of trouble and warn in plain words (a default
    ``ppolm.HealthMonitor``, unless one is passed in ``callbacks``); the warnings also go to
    warnings.jsonl in output_dir."""
