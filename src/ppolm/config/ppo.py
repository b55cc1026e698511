"""PPOConfig: every setting of a PPO run, validated once, with YAML load/save and ``key=value``
overrides.

The settings are declared in three sections, by who reads them (TRL keeps its
``TrainingArguments`` apart from the algorithm's fields the same way): ``AlgorithmConfig`` (what
PPO computes, including the two sampling settings training computes with, ``temperature`` and
``samples_per_prompt``; the environment holds the other four, see ``ppolm.config.sampling``),
``SystemConfig`` (how: the engine, the device, precision, and the fast CPU engine's own
switches, declared with that engine as ``FastCPUSettings``) and ``RunConfig`` (files and
progress). ``PPOConfig`` is all three: it takes every field as a flat keyword argument (a
misspelled one is a ConfigError naming the closest field), validates them in one place
(``__post_init__``), and writes YAML in sections.

Derived sizes (minibatches per epoch, gradient-accumulation steps) are computed in
``__post_init__`` so the rest of the code never re-derives them (and never disagrees about them:
inconsistent micro/mini batch settings silently halved gradients in peers, verl issues 747, 2505).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ppolm.config.recipes import recipe_settings, with_recipe
from ppolm.config.report_to import check_report_to
from ppolm.config.sampling import check_sampling
from ppolm.config.sections import (  # noqa: F401 (re-exported)
    CRITIC_FREE,
    DEFAULT_AGGREGATION,
    GROUPED,
    AdvantageEstimator,
    AlgorithmConfig,
    EngineName,
    FastCPUSettings,
    KLEstimator,
    KLMode,
    LossAggregation,
    LRSchedule,
    RolloutLogprobs,
    RunConfig,
    SystemConfig,
)
from ppolm.config.yaml_io import check_keys, check_types, load_yaml_mapping, parse_overrides
from ppolm.errors import ConfigError

#: The sections of a PPOConfig, as its YAML file writes them.
SECTIONS: dict[str, type] = {"algorithm": AlgorithmConfig, "system": SystemConfig,
                             "run": RunConfig}
FAST_CPU_FIELDS = tuple(f.name for f in dataclasses.fields(FastCPUSettings))
#: The estimators whose advantages come from the scores alone: a KL must act in the loss.
KL_IN_THE_LOSS = ("grpo", "dr_grpo", "rloo")
log = logging.getLogger(__name__)


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


def natural_kl_mode(advantage_estimator: str, kl_estimator: str) -> KLMode:
    """Where the KL acts when ``kl_mode`` is None (see ``PPOConfig.resolve_kl_mode``)."""
    if advantage_estimator in KL_IN_THE_LOSS or kl_estimator == "full":
        return "loss"
    return "reward"


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
        report_to: Any = self.report_to
        if isinstance(report_to, str):       # report_to="wandb" (or report_to=wandb) is one
            self.report_to = [report_to]
        check_types(self)
        check_sampling({"temperature": self.temperature,
                        "samples_per_prompt": self.samples_per_prompt})
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
        self.check_objective()
        if self.clip_range_value is not None and not self.clip_range_value > 0:
            raise ConfigError(f"clip_range_value={self.clip_range_value} must be > 0, or null "
                              "to disable value clipping.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm={self.max_grad_norm} must be > 0, or null.")
        if self.target_approx_kl is not None and not self.target_approx_kl > 0:
            raise ConfigError(f"target_approx_kl={self.target_approx_kl} must be > 0, or null.")
        for name in ("kl_coef", "vf_coef", "ent_coef", "weight_decay", "adam_eps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0.")
        self.resolve_kl_mode()
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
            self.check_fast_cpu_settings("plain")
        if not self.dist_timeout > 0:
            raise ConfigError(f"dist_timeout={self.dist_timeout} must be > 0 (seconds).")
        if self.gradient_checkpointing and self.engine == "fast_cpu":
            raise ConfigError("gradient_checkpointing needs engine='plain' (or 'auto' on a GPU "
                              "or under torchrun); the fast_cpu engine keeps its own buffers.")
        if self.save_every and self.output_dir is None:
            raise ConfigError(f"save_every={self.save_every} needs an output_dir to save into.")
        if self.log_samples_every < 0:
            raise ConfigError(f"log_samples_every={self.log_samples_every} must be >= 0 "
                              "(0: never).")
        check_report_to(self.report_to, self.output_dir)
        self.check_estimator()
        self.num_minibatches = self.batch_size // self.minibatch_size
        self.grad_accum_steps = self.minibatch_size // micro

    def resolve_kl_mode(self) -> None:
        """``kl_mode=None``: the estimator's natural choice, as TRL's GRPO runs with its
        defaults: 'loss' where the advantages come from the scores alone (grpo, dr_grpo, rloo)
        and for the exact KL ('full'), which only the loss can take; 'reward' otherwise (PPO
        with GAE, REINFORCE++). An explicit choice is kept, and checked."""
        self._kl_mode_given = self.kl_mode      # what to_dict writes (None: resolved again)
        if self.kl_mode is None:
            full = self.kl_estimator == "full"
            self.kl_mode = natural_kl_mode(self.advantage_estimator, self.kl_estimator)
            log.info("kl_mode=%r: advantage_estimator=%r's choice%s", self.kl_mode,
                     self.advantage_estimator, " (kl_estimator='full')" if full else "")

    def check_estimator(self) -> None:
        """Group sampling and the advantage estimator's needs."""
        k, est = self.samples_per_prompt, self.advantage_estimator
        if self.batch_size % k:
            raise ConfigError(f"batch_size={self.batch_size} is not a multiple of "
                              f"samples_per_prompt={k}: batch_size counts episodes, k per "
                              "prompt.")
        if est in GROUPED and k < 2:
            raise ConfigError(f"advantage_estimator={est!r} compares the responses to one "
                              "prompt: set samples_per_prompt >= 2 (e.g. 4).")
        if est in KL_IN_THE_LOSS and self.kl_mode == "reward" and self.kl_coef:
            raise ConfigError(f"advantage_estimator={est!r} takes its advantages from the "
                              "scores alone, so a KL in the reward would be ignored: set "
                              "kl_mode=loss or leave it unset (GRPO uses kl_estimator=k3), or "
                              "kl_coef=0.")

    def check_objective(self) -> None:
        """Decoupled clipping, the ratio level, truncated importance sampling, dynamic
        sampling."""
        for name in ("clip_range_low", "clip_range_high", "tis_cap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name}={value} must be > 0, or null (off).")
        if self.clip_high < self.clip_low:
            raise ConfigError(f"clip_range_high={self.clip_high} is below clip_range_low="
                              f"{self.clip_low}: the upper epsilon must be at least the lower "
                              "(DAPO: 0.2 below, 0.28 above).")
        if self.tis_cap is not None and self.rollout_logprobs != "forward":
            raise ConfigError("tis_cap weights each token by pi_old / pi_rollout, the trainer's "
                              "probability over the sampler's: it needs rollout_logprobs="
                              "'forward' (the trainer's own forward of the rollout).")
        if self.dynamic_sampling:
            if self.advantage_estimator not in GROUPED:
                raise ConfigError(
                    f"dynamic_sampling drops groups whose rewards are all equal, which carry no "
                    f"signal only for the grouped estimators ({', '.join(GROUPED)}); "
                    f"advantage_estimator={self.advantage_estimator!r} learns from them.")
            if self.samples_per_prompt < 2:
                raise ConfigError("dynamic_sampling compares the responses to one prompt: set "
                                  "samples_per_prompt >= 2.")
        if self.max_sampling_rounds < 1:
            raise ConfigError(f"max_sampling_rounds={self.max_sampling_rounds} must be >= 1.")

    @property
    def clip_low(self) -> float:
        """The lower clip epsilon in use (``clip_range_low`` or ``clip_range``)."""
        return self.clip_range if self.clip_range_low is None else self.clip_range_low

    @property
    def clip_high(self) -> float:
        """The upper clip epsilon in use (``clip_range_high`` or ``clip_range``)."""
        return self.clip_range if self.clip_range_high is None else self.clip_range_high

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

    def check_fast_cpu_settings(self, engine: str, why: str = "") -> None:
        """Refuse the fast CPU engine's switches for a run on another ``engine``, which would
        ignore them: checked here for engine='plain', and by ``make_engine`` once 'auto' has
        picked for the device (``why`` says how it picked)."""
        on = self.fast_cpu_fields_set()
        if engine == "fast_cpu" or not on:
            return
        it = "it" if len(on) == 1 else "them"
        raise ConfigError(f"{', '.join(on)} set, but only engine='fast_cpu' reads {it}; "
                          f"{why or f'engine={engine!r}'} would ignore {it}. Use "
                          f"engine='fast_cpu' (or 'auto' on one CPU), or leave {it} at the "
                          "default.")

    def fast_cpu_settings(self) -> FastCPUSettings:
        """The fast CPU engine's switches."""
        return FastCPUSettings(**{n: getattr(self, n) for n in FAST_CPU_FIELDS})

    # --- I/O ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PPOConfig:
        """Build from a plain dict: flat field names, or the sections ``algorithm``, ``system``
        and ``run`` as mappings (as ``to_yaml`` writes them), refusing unknown keys (with the
        closest known name). A ``recipe`` key names a recipe whose settings the others
        override."""
        flat = with_recipe(flatten_sections(values))
        check_keys(cls, flat, where="PPOConfig")
        return cls(**flat)

    @classmethod
    def recipe(cls, name: str, **overrides: Any) -> PPOConfig:
        """The settings of a published method (``ppolm.config.recipes.RECIPES``: "ppo",
        "grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp"), with ``overrides`` over
        them: ``PPOConfig.recipe("dapo", batch_size=64, samples_per_prompt=8)``."""
        return cls.from_dict({**recipe_settings(name), **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The settable fields as one flat dict (derived sizes left out); ``kl_mode`` as given
        (None: the estimator's choice, so a copy with another estimator chooses again)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        out["kl_mode"] = getattr(self, "_kl_mode_given", self.kl_mode)
        return out

    def to_sections(self) -> dict[str, dict[str, Any]]:
        """The settable fields by section: ``{"algorithm": {...}, "system": {...},
        "run": {...}}``."""
        flat = self.to_dict()
        return {name: {n: flat[n] for n in _names(cls)} for name, cls in SECTIONS.items()}

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


def _with_key_check(init: Callable[..., None]) -> Callable[..., None]:
    """The dataclass's ``__init__`` with unknown keywords refused first: a misspelled one gets
    the closest field's name (as from YAML), not a bare TypeError. ``functools.wraps`` keeps
    its signature for ``inspect`` and the docs."""
    @functools.wraps(init)
    def __init__(self: PPOConfig, *args: Any, **kwargs: Any) -> None:
        check_keys(type(self), kwargs, where=type(self).__name__)
        init(self, *args, **kwargs)
    return __init__


setattr(PPOConfig, "__init__", _with_key_check(PPOConfig.__init__))  # noqa: B010 (mypy)
