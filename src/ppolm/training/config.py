"""PPOConfig: every hyper-parameter of a PPO run, validated once, with YAML load/save and
``key=value`` overrides.

Derived sizes (minibatches per epoch, gradient-accumulation steps) are computed in
``__post_init__`` so the rest of the code never re-derives them (and never disagrees about them:
inconsistent micro/mini batch settings silently halved gradients in peers, verl issues 747, 2505).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ppolm.errors import ConfigError

KLMode = Literal["reward", "loss"]
KLEstimator = Literal["k1", "k2", "k3", "full"]
LRSchedule = Literal["constant", "linear", "cosine"]
RolloutLogprobs = Literal["sampler", "forward"]


@dataclass
class PPOConfig:
    """Hyper-parameters of a PPO run. Every field is checked in ``__post_init__``."""

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
    last N iterations instead of the last iterate (tail averaging, see ppolm.training.averaging): when
    the late iterates scatter around a fixed point, their noise, and the KL it costs, averages
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

    # --- run --------------------------------------------------------------------------------
    seed: int = 0
    """Seed of every random generator of the run."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    bf16: bool = True
    """Use bf16 autocast on CUDA (on CPU see ``cpu_bf16``)."""
    cpu_bf16: bool = False
    """Use bf16 autocast when the run is on CPU (off: float32). Meant for CPUs with bf16 matrix
    units (Intel AMX, Sapphire Rapids and later), whose bf16 products run several times faster
    than float32 ones; without them expect no gain. The LM head's logits and its input's
    gradient in bf16; its softmax, its weight's gradient, the attention and the values in
    float32; weights, gradients and optimizer state stay float32. Measured on a 2-core AMX
    machine: the benchmark's update 8% (tiny) and 14% (SmolLM2-135M size) faster, generation
    16-20%; the SmolLM2 example's iteration 15.3 against 10.2-10.8 s (docs/benchmarks.md).
    Refused where PyTorch reports no bf16 support for the CPU."""
    compile: bool = False
    """Run the trunks' whole-sequence passes (the update's forward and backward, the rollout's
    reference and critic forwards) through ``torch.compile``; decoding steps stay eager.
    ``transformers`` policies and ``TransformerPolicy``; needs a C++ compiler on CPU. Same
    numbers up to float rounding. Measured on 2 CPU cores: the benchmark's update 12% (tiny)
    and 20% (SmolLM2-135M size) faster, after a first iteration that compiles for about
    15-50 s (tiny) or 3-4 minutes (135M) (docs/benchmarks.md)."""
    keep_freed_memory: bool = True
    """On CPU (Linux, glibc): have malloc keep freed memory for reuse (``ppolm.engines.fast_cpu.memory``), so the
    tensors freed every minibatch are not page-faulted in again; process-wide, and the process
    keeps its peak memory."""
    reuse_frozen_layers: bool = True
    """When the policy's lower layers are frozen (e.g. ``freeze_lower_layers``), run them once
    per rollout and start every training forward (and the reference's, when it shares them)
    above them. Same numbers, less work; used only where the policy's split trunk is checked
    to equal its whole trunk."""
    rollout_logprobs: RolloutLogprobs = "sampler"
    """Where the rollout's logprobs and value-head states come from. 'sampler': the sampling
    pass itself (the states that drew each token; with frozen lower layers, their output too),
    so the rollout runs no forward of the policy: faster, and the first ratio is 1 up to float
    rounding (1e-6 to 2e-5 in float32). 'forward': one more forward pass over the finished
    sequences, the same computation as the update's, so the first ratio is exactly 1. With bf16
    autocast the two paths round differently (the sampler's logprobs are still those the
    tokens were drawn with)."""
    output_dir: str = "runs/ppolm"
    """Where metrics.jsonl and checkpoints go."""
    overwrite: bool = False
    """Let a new run start in an output_dir that holds an earlier run's checkpoints or metrics,
    deleting them. Without it such a start is refused (resume continues the earlier run)."""
    save_every: int = 0
    """Save a checkpoint every this many iterations (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep on disk."""
    progress: bool = True
    """Show a progress bar."""

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
        self.num_minibatches = self.batch_size // self.minibatch_size
        self.grad_accum_steps = self.minibatch_size // micro

    # --- I/O ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PPOConfig:
        """Build from a plain dict, refusing unknown keys (with the closest known name)."""
        check_keys(cls, values, where="PPOConfig")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The settable fields as a plain dict (derived sizes left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_yaml(cls, path: str | Path) -> PPOConfig:
        """Load from a YAML mapping of field names to values."""
        return cls.from_dict(load_yaml_mapping(path))

    def to_yaml(self, path: str | Path) -> None:
        """Write the settable fields to a YAML file."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def override(self, pairs: list[str]) -> PPOConfig:
        """A copy with ``key=value`` strings applied (values parsed as YAML scalars)."""
        values = self.to_dict()
        values.update(parse_overrides(pairs))
        return PPOConfig.from_dict(values)


# --- helpers shared by every config-like dataclass --------------------------------------------

def check_keys(cls: type, values: dict[str, Any], where: str) -> None:
    """Raise ConfigError for a key that is not a settable field of ``cls``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of names to values, got {values!r}.")
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Known keys: {', '.join(known)}."
            raise ConfigError(f"Unknown key {key!r} in {where}.{hint}")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parse ``["a=1", "b=x"]`` into ``{"a": 1, "b": "x"}`` (values read as YAML scalars)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"Override {pair!r} is not of the form key=value.")
        key, _, raw = pair.partition("=")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"Cannot parse the value of override {pair!r}: {e}") from None
    return out


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; clear errors for a missing or bad file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file {str(p)!r} does not exist.")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"Config file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {str(p)!r} must hold a mapping, got {type(data).__name__}.")
    return data


def check_types(obj: Any) -> None:
    """Check each init field against its annotation; ints are accepted where floats are."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        if isinstance(value, str) and _accepts_float(hints[f.name]):
            # YAML 1.1 reads "1e-4" (no dot) as a string; take it as the number it means.
            try:
                value = float(value)
                setattr(obj, f.name, value)
            except ValueError:
                pass
        if not _matches(value, hints[f.name]):
            raise ConfigError(f"{f.name}={value!r} has the wrong type: expected "
                              f"{_describe(hints[f.name])}, got {type(value).__name__}.")


def _accepts_float(hint: Any) -> bool:
    return hint is float or float in typing.get_args(hint)


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    if hint is Any:
        return True
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
