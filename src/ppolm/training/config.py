"""PPOConfig: every setting of a PPO run, validated once, with YAML load/save and ``key=value``
overrides.

The settings are declared in three sections, by who reads them (TRL keeps its
``TrainingArguments`` apart from the algorithm's fields the same way): ``AlgorithmConfig`` (what
PPO computes), ``SystemConfig`` (how: the engine, the device, precision, and the fast CPU
engine's own switches, declared with that engine as ``FastCPUSettings``) and ``RunConfig``
(files and progress). ``PPOConfig`` is all three: it takes every field as a flat keyword
argument, validates them in one place (``__post_init__``), and writes YAML in sections.

Derived sizes (minibatches per epoch, gradient-accumulation steps) are computed in
``__post_init__`` so the rest of the code never re-derives them (and never disagrees about them:
inconsistent micro/mini batch settings silently halved gradients in peers, verl issues 747, 2505).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ppolm.engines.fast_cpu import FastCPUSettings
from ppolm.errors import ConfigError
from ppolm.training.config_io import check_keys, check_types, load_yaml_mapping, parse_overrides

KLMode = Literal["reward", "loss"]
KLEstimator = Literal["k1", "k2", "k3", "full"]
LRSchedule = Literal["constant", "linear", "cosine"]
RolloutLogprobs = Literal["sampler", "forward"]
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


@dataclass
class AlgorithmConfig:
    """What PPO computes: loop sizes, optimisation, advantages, losses, KL control, sampling
    temperature. (A declaration: build a ``PPOConfig``, which validates.)"""

    # --- loop sizes -------------------------------------------------------------------------
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

    # --- optimisation -----------------------------------------------------------------------
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
    average_last: int = 0
    """End training with the uniform mean of the policy's trainable weights after each of the
    last N iterations instead of the last iterate (tail averaging, see
    ppolm.training.averaging): when the late iterates scatter around a fixed point, their noise,
    and the KL it costs, averages
    out. 0 (default): the last iterate. At most ``iterations``."""
    adam_eps: float = 1e-5
    """Adam epsilon (1e-5 as in CleanRL and OpenAI baselines)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; None disables clipping."""
    max_bad_updates: int = 5
    """Stop with TrainingError after this many non-finite updates in a row (each is skipped)."""

    # --- advantages -------------------------------------------------------------------------
    gamma: float = 1.0
    """Discount factor over response tokens, in [0, 1]."""
    lam: float = 0.95
    """GAE lambda, in [0, 1]."""
    whiten_rewards: bool = False
    """Whiten the scores over the batch before adding the KL penalty."""
    whiten_advantages: bool = True
    """Whiten advantages over the valid tokens of the batch (masked mean and variance)."""

    samples_per_prompt: int = 1
    """Responses sampled per prompt (group sampling): each prompt of a batch is sampled k
    times, its responses side by side; ``batch_size`` counts episodes and must be a multiple
    of k. The grouped estimators compare the responses of a group."""
    advantage_estimator: AdvantageEstimator = "gae"
    """'gae' (PPO with a value function: GAE(gamma, lam) on the per-token rewards), or a
    critic-free one (no value head is built or run): 'grpo' ((r - group mean) / group std),
    'dr_grpo' (r - group mean), 'rloo' (r - mean of the other k - 1), 'reinforce_pp' (returns
    of the score and the per-token KL penalty, whitened over the batch),
    'reinforce_pp_baseline' (the group mean subtracted first). Formulas and references:
    docs/maths.md. grpo, dr_grpo and rloo take the KL in the loss (kl_mode='loss')."""
    loss_aggregation: LossAggregation | None = None
    """How the per-token policy-loss terms (and the entropy bonus and the KL in the loss) of a
    minibatch become one number: 'token-mean' (over all its tokens), 'seq-mean-token-mean'
    (each sequence's mean, averaged), 'seq-mean-token-sum' (each sequence's sum, averaged),
    'seq-mean-token-sum-norm' (the sum over max_new_tokens x sequences, a constant: Dr. GRPO).
    None: the estimator's usual choice (gae, rloo, reinforce_pp*: token-mean; grpo:
    seq-mean-token-mean; dr_grpo: seq-mean-token-sum-norm). The value loss is a token mean."""

    # --- losses -----------------------------------------------------------------------------
    clip_range: float = 0.2
    """PPO ratio clip epsilon: the ratio is clipped to [1 - clip_range, 1 + clip_range]."""
    clip_range_value: float | None = 0.2
    """Clip the new values to within this distance of the rollout values; None disables it."""
    vf_coef: float = 0.5
    """Weight of the value loss in the total loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    target_approx_kl: float | None = None
    """Stop the epochs of an iteration early once the epoch's mean approx_kl exceeds this."""

    # --- KL control -------------------------------------------------------------------------
    kl_coef: float = 0.05
    """Initial KL coefficient beta against the frozen reference policy."""
    kl_mode: KLMode = "reward"
    """Where the KL acts: 'reward' (per-token penalty in the reward, as OpenAI/TRL) or 'loss'
    (a KL term added to the policy loss, GRPO style)."""
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

    # --- sampling ---------------------------------------------------------------------------
    temperature: float = 1.0
    """Sampling temperature; logits are divided by it for sampling AND for every logprob
    computed for training and for the reference, so the first ratio is exactly 1."""



@dataclass
class SystemConfig(FastCPUSettings):
    """How the numbers are computed: the engine, the device, precision, the seed; the fast CPU
    engine's switches (``cpu_bf16``, ``compile``, ``keep_freed_memory``,
    ``reuse_frozen_layers``) are declared with that engine (``FastCPUSettings``)."""

    engine: EngineName = "auto"
    """'plain' (torch as users know it: AdamW, clip_grad_norm_, autocast on CUDA), 'fast_cpu'
    (the single-process CPU engine, docs/performance.md) or 'auto' (fast_cpu on CPU, plain
    elsewhere)."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    bf16: bool = True
    """bf16 autocast on CUDA (on CPU see ``cpu_bf16``, a fast_cpu setting)."""
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


#: The sections of a PPOConfig, as its YAML file writes them.
SECTIONS: dict[str, type] = {"algorithm": AlgorithmConfig, "system": SystemConfig,
                             "run": RunConfig}
FAST_CPU_FIELDS = tuple(f.name for f in dataclasses.fields(FastCPUSettings))


def flatten_sections(values: dict[str, Any]) -> dict[str, Any]:
    """PPOConfig values with the sections ``algorithm``, ``system``, ``run`` (as ``to_yaml``
    writes them) made flat; flat keys pass through. A key in the wrong section is refused."""
    if not isinstance(values, dict):
        raise ConfigError(f"PPOConfig must be a mapping of names to values, got {values!r}.")
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict):
            check_keys(SECTIONS[key], value, where=f"PPOConfig section {key!r}")
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


@dataclass
class PPOConfig(RunConfig, SystemConfig, AlgorithmConfig):
    """Every setting of a PPO run (the three sections' fields, as flat keyword arguments).
    Every field is checked in ``__post_init__``."""

    # --- derived (not settable) -------------------------------------------------------------
    num_minibatches: int = field(init=False, default=0)
    """batch_size // minibatch_size."""
    grad_accum_steps: int = field(init=False, default=0)
    """minibatch_size // micro_batch_size (micro-batches per optimizer step)."""

    def __post_init__(self) -> None:
        check_types(self)
        positive = ("iterations", "batch_size", "minibatch_size", "ppo_epochs", "kl_horizon",
                    "max_bad_updates", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0.")
        micro = self.minibatch_size if self.micro_batch_size is None else self.micro_batch_size
        if micro <= 0:
            raise ConfigError(f"micro_batch_size={micro} must be > 0.")
        if self.minibatch_size > self.batch_size:
            raise ConfigError(f"minibatch_size={self.minibatch_size} is larger than "
                              f"batch_size={self.batch_size}; lower minibatch_size.")
        if self.batch_size % self.minibatch_size:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by "
                              f"minibatch_size={self.minibatch_size}; pick sizes that divide.")
        if self.minibatch_size % micro:
            raise ConfigError(f"minibatch_size={self.minibatch_size} is not divisible by "
                              f"micro_batch_size={micro}.")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be > 0 (e.g. 3e-4).")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1].")
        if not self.clip_range > 0:
            raise ConfigError(f"clip_range={self.clip_range} must be > 0 (typically 0.2).")
        if self.clip_range_value is not None and not self.clip_range_value > 0:
            raise ConfigError(f"clip_range_value={self.clip_range_value} must be > 0, or null "
                              "to disable value clipping.")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm={self.max_grad_norm} must be > 0, or null.")
        if self.target_approx_kl is not None and not self.target_approx_kl > 0:
            raise ConfigError(f"target_approx_kl={self.target_approx_kl} must be > 0, or null.")
        for name in ("kl_coef", "vf_coef", "ent_coef", "weight_decay", "adam_eps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0.")
        if self.kl_estimator == "full" and self.kl_mode != "loss":
            raise ConfigError("kl_estimator='full' (the exact KL over the vocabulary) needs "
                              "kl_mode='loss': in the reward it would act through the sampled "
                              "tokens only. Set kl_mode=loss, or use k1/k2/k3.")
        if not self.kl_target > 0:
            raise ConfigError(f"kl_target={self.kl_target} must be > 0.")
        if self.save_every < 0:
            raise ConfigError(f"save_every={self.save_every} must be >= 0.")
        if not 0 <= self.average_last <= self.iterations:
            raise ConfigError(f"average_last={self.average_last} must be between 0 (off) and "
                              f"iterations={self.iterations}.")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device={self.device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'.")
        if self.engine == "plain":
            on = self.fast_cpu_fields_set()
            if on:
                raise ConfigError(f"{', '.join(on)} set, but only engine='fast_cpu' reads "
                                  f"{'it' if len(on) == 1 else 'them'}; engine='plain' would "
                                  "ignore it. Use engine='fast_cpu' (or 'auto' on one CPU).")
        if self.save_every and self.output_dir is None:
            raise ConfigError(f"save_every={self.save_every} needs an output_dir to save into.")
        self.check_estimator()
        self.num_minibatches = self.batch_size // self.minibatch_size
        self.grad_accum_steps = self.minibatch_size // micro

    def check_estimator(self) -> None:
        """Group sampling and the advantage estimator's needs."""
        k, est = self.samples_per_prompt, self.advantage_estimator
        if k < 1:
            raise ConfigError(f"samples_per_prompt={k} must be >= 1.")
        if self.batch_size % k:
            raise ConfigError(f"batch_size={self.batch_size} is not a multiple of "
                              f"samples_per_prompt={k}: batch_size counts episodes, k per "
                              "prompt.")
        if est in GROUPED and k < 2:
            raise ConfigError(f"advantage_estimator={est!r} compares the responses to one "
                              "prompt: set samples_per_prompt >= 2 (e.g. 4).")
        if est in ("grpo", "dr_grpo", "rloo") and self.kl_mode == "reward" and self.kl_coef:
            raise ConfigError(f"advantage_estimator={est!r} takes its advantages from the "
                              "scores alone, so a KL in the reward would be ignored: set "
                              "kl_mode=loss (GRPO uses kl_estimator=k3), or kl_coef=0.")

    @property
    def aggregation(self) -> str:
        """The loss aggregation in use (``loss_aggregation`` or the estimator's default)."""
        return self.loss_aggregation or DEFAULT_AGGREGATION[self.advantage_estimator]

    @property
    def critic_free(self) -> bool:
        """Whether the estimator needs no value function."""
        return self.advantage_estimator in CRITIC_FREE

    def fast_cpu_fields_set(self) -> list[str]:
        """The fast CPU engine's switches set away from their defaults."""
        return [n for n in FAST_CPU_FIELDS if getattr(self, n) != getattr(FastCPUSettings, n)]

    def fast_cpu_settings(self) -> FastCPUSettings:
        """The fast CPU engine's switches."""
        return FastCPUSettings(**{n: getattr(self, n) for n in FAST_CPU_FIELDS})

    # --- I/O ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PPOConfig:
        """Build from a plain dict: flat field names, or the sections ``algorithm``, ``system``
        and ``run`` as mappings (as ``to_yaml`` writes them), refusing unknown keys (with the
        closest known name)."""
        flat = flatten_sections(values)
        check_keys(cls, flat, where="PPOConfig")
        return cls(**flat)

    def to_dict(self) -> dict[str, Any]:
        """The settable fields as one flat dict (derived sizes left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def to_sections(self) -> dict[str, dict[str, Any]]:
        """The settable fields by section: ``{"algorithm": {...}, "system": {...},
        "run": {...}}``."""
        return {name: {n: getattr(self, n) for n in _names(cls)}
                for name, cls in SECTIONS.items()}

    @classmethod
    def from_yaml(cls, path: str | Path) -> PPOConfig:
        """Load from a YAML mapping (sections or flat field names)."""
        return cls.from_dict(load_yaml_mapping(path))

    def to_yaml(self, path: str | Path) -> None:
        """Write the settable fields to a YAML file, by section."""
        Path(path).write_text(yaml.safe_dump(self.to_sections(), sort_keys=False))

    def override(self, pairs: list[str]) -> PPOConfig:
        """A copy with ``key=value`` strings applied (values parsed as YAML scalars; a key may
        name its section: ``system.engine=plain``)."""
        values = self.to_dict()
        for key, value in parse_overrides(pairs).items():
            section, _, name = key.rpartition(".")
            if section and section not in SECTIONS:
                raise ConfigError(f"Unknown section {section!r} in override {key!r}; use "
                                  f"{', '.join(SECTIONS)}.")
            if section:
                check_keys(SECTIONS[section], {name: value}, where=f"section {section!r}")
            values[name] = value
        return PPOConfig.from_dict(values)
