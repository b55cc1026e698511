"""``build_run``: a ready Trainer from a RunSpec (the run's YAML, read and checked in
``ppolm.config.run_spec``, re-exported here), and the reward, interaction and tools a spec
names."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ppolm.config.run_spec import DEMO as DEMO  # re-exported
from ppolm.config.run_spec import EnvSpec as EnvSpec  # re-exported
from ppolm.config.run_spec import ModelSpec, RunSpec
from ppolm.config.sampling import SamplingConfig as SamplingConfig  # re-exported
from ppolm.errors import ConfigError


def load_reward(name: str | dict[str, Any], kwargs: dict[str, Any],
                config_dir: Path | None = None) -> Any:
    """A reward from a built-in name or a 'module:Class' path, built with ``kwargs``. The
    module is looked for in ``config_dir`` (the run's YAML file's folder), then the current
    folder, then the installed packages: the same with ``ppolm`` and ``python -m ppolm``.
    ``{model: PATH, ...}``: a saved reward model (``RewardModelReward``)."""
    from ppolm.rollout.tasks import BUILTIN_REWARDS

    if isinstance(name, dict):
        from ppolm.rollout.learned_reward import RewardModelReward

        return RewardModelReward(**{**kwargs, **name})
    if name in BUILTIN_REWARDS:
        cls = BUILTIN_REWARDS[name]
    elif ":" in name:
        cls = load_attr(name, "reward", config_dir)
    else:
        raise ConfigError(f"Unknown reward {name!r}: use one of {sorted(BUILTIN_REWARDS)} or "
                          "'package.module:ClassName'.")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"Cannot build reward {name!r} with {kwargs}: {e}") from None


def load_attr(name: str, what: str, config_dir: Path | None = None) -> Any:
    """The object a 'module:name' path names (``what`` it is, for messages), the module
    looked for as ``load_reward`` looks for it."""
    module, _, attr = name.partition(":")
    folders = [*([config_dir] if config_dir is not None else []), Path.cwd()]
    try:
        return getattr(_import(module, folders), attr)
    except ModuleNotFoundError as e:
        tried = ", ".join(str(f.resolve()) for f in folders)
        raise ConfigError(f"Cannot import {what} {name!r}: {e}; looked in {tried} and the "
                          "installed packages.") from None
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"Cannot import {what} {name!r}: {e}") from None


def load_interaction(env: EnvSpec, config_dir: Path | None = None) -> Any:
    """The Interaction ``env.interaction`` and ``env.tools`` name (None when they name none):
    the class built with ``interaction_kwargs`` (and ``tools=`` the functions when there are
    tools), or a ToolInteraction of the tools."""
    if env.interaction is None and not env.tools:
        return None
    kwargs = dict(env.interaction_kwargs)
    if env.tools:
        kwargs["tools"] = [load_attr(t, "tool", config_dir) for t in env.tools]
    if env.interaction is None:
        from ppolm.rollout.tools import ToolInteraction

        cls: Any = ToolInteraction
    else:
        cls = load_attr(env.interaction, "interaction", config_dir)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"Cannot build interaction {env.interaction or 'ToolInteraction'!r} "
                          f"with {sorted(kwargs)}: {e}") from None


def _import(module: str, folders: list[Path]) -> Any:
    """``module`` from the first of ``folders`` that holds it (as a .py file or a package),
    else from the installed packages."""
    top = module.split(".")[0]
    for folder in folders:
        if (folder / f"{top}.py").is_file() or (folder / top / "__init__.py").is_file():
            with _on_path(folder):
                return importlib.import_module(module)
    return importlib.import_module(module)


@contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    """``folder`` first on sys.path while a reward module is imported, then taken off again
    (the module stays imported)."""
    entry = str(folder.resolve())
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        sys.path.remove(entry)


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
    reward = load_reward(spec.reward, spec.reward_kwargs, spec.config_dir) if spec.reward else (
        task.reward if task else None)
    if m.kind in ("hf", "smollm2"):
        # under torchrun with FSDP2, no rank builds the whole model (see empty_policy)
        from ppolm.parallel.world import launched

        policy, tokenizer = _load_pretrained(m, empty=spec.ppo.distributed == "fsdp"
                                             and launched())
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
    value = spec.value_head()                # None: a critic-free estimator
    value_head = (None if value is None
                  else ValueHead.separate(policy, from_reward_model=m.value_from)
                  if value == "separate" else ValueHead.adapter(policy) if value == "adapter"
                  else ValueHead(policy.hidden_size, detach=value == "detached"))
    e = spec.env
    interaction = load_interaction(e, spec.config_dir)
    if interaction is None and task is not None:
        interaction = task.interaction          # a multi-turn task's own (lookup)
    # the sampling settings the environment holds (PPOConfig holds the others)
    env = TextGenerationEnv(prompts, tokenizer, reward, **spec.sampling.env_values(),
                            missing_eos_penalty=e.missing_eos_penalty,
                            prefix_shaping=e.prefix_shaping,
                            add_special_tokens=not e.chat_template, seed=spec.ppo.seed,
                            chat_template=e.chat_template, interaction=interaction,
                            max_turns=e.max_turns, max_episode_tokens=e.max_episode_tokens,
                            overlong_buffer=e.overlong_buffer,
                            overlong_penalty=e.overlong_penalty)
    torch.manual_seed(spec.ppo.seed)
    return Trainer(policy, env, spec.ppo, value_head=value_head, reference=reference,
                   callbacks=_eval_callbacks(spec, tokenizer))


def _eval_callbacks(spec: RunSpec, tokenizer: Any) -> list[Any]:
    """The EvalCallback the spec asks for (none without eval_prompts)."""
    if spec.eval_prompts is None:
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


def _load_pretrained(m: ModelSpec, empty: bool = False) -> tuple[Any, Any]:
    """Policy and tokenizer of model.kind hf (a folder or a .gguf file) or smollm2. ``empty``
    (FSDP2 under torchrun): a folder's model without LoRA is built on the meta device
    (``empty_policy``), each rank later reading its shards of the weights."""
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
        policy = (models.empty_policy(m.path) if empty and m.lora is None
                  else HFPolicy(m.path))
        tokenizer = models.load_tokenizer(m.path)
    if m.trainable_layers is not None:
        models.freeze_lower_layers(policy, m.trainable_layers)
    if m.lora is not None:
        from ppolm.policies.lora import lora_config

        policy = HFPolicy(policy.model, peft_config=lora_config(m.lora))
    return policy, tokenizer
