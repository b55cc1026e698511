"""Exporting a trained policy as a Hugging Face model folder: weights (LoRA merged, or the
adapters alone), tokenizer and generation config, so that ``AutoModelForCausalLM``,
``AutoTokenizer`` and ``pipeline("text-generation", model=path)`` load it as it is; the value
head beside it in its own file, which ``transformers`` ignores.

Files and models only: the Trainer's ``save_model`` calls ``save_model`` here, and a checkpoint
written by one process holds its models in the same files (``ModelFiles``).
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ppolm.errors import CheckpointError, ConfigError
from ppolm.policies.base import Policy
from ppolm.policies.hf import HFPolicy
from ppolm.policies.lora import merged_copy
from ppolm.policies.value import ValueHead

VALUE_HEAD_FILE = "value_head.safetensors"
OLD_VALUE_HEAD_FILE = "value_head.pt"          # (written by earlier versions; still read)
CRITIC_FOLDER = "critic"
POLICY_FOLDER = "policy"


def save_model(policy: Policy, tokenizer: Any, path: str | Path,
               value_head: ValueHead | None = None, merge: bool = True) -> Path:
    """Write ``policy`` as a model folder at ``path``; returns the folder.

    * A LoRA policy: with ``merge`` (default) a plain model with the adapters merged into its
      weights (loads with ``AutoModelForCausalLM``; the policy itself keeps its adapters);
      with ``merge=False`` the adapters alone (``adapter_config.json`` and
      ``adapter_model.safetensors``: load with ``peft.AutoPeftModelForCausalLM`` or
      ``PeftModel.from_pretrained(base, path)``), whose ``base_model_name_or_path`` names the
      base as another machine finds it (``portable_name``).
    * Any other ``HFPolicy``: the whole model.
    * Always: the tokenizer and the model's ``generation_config``; the value head's linear
      map as ``value_head.safetensors`` and a separate critic's trunk under ``critic/``.
    """
    if not isinstance(policy, HFPolicy):
        raise ConfigError(f"save_model writes a transformers model folder and needs an "
                          f"HFPolicy, not a {type(policy).__name__}; use trainer.save() or "
                          "policy.save() for other policies.")
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        model = merged_copy(policy.model) if policy.is_lora and merge else policy.model
        model.save_pretrained(str(folder))
        if getattr(policy.lm, "generation_config", None) is not None:
            policy.lm.generation_config.save_pretrained(str(folder))
        save_tokenizer(tokenizer, folder)
        if value_head is not None:
            save_value_head(value_head, folder)
        portable_adapters(folder)
    except OSError as e:
        raise CheckpointError(f"Cannot write the model to {str(folder)!r}: {e}") from None
    return folder


#: A snapshot in the local Hugging Face cache: .../models--{org}--{name}/snapshots/{revision}.
HUB_SNAPSHOT = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\][^/\\]+[/\\]?$")


def portable_name(name: str) -> str:
    """The base model's name as another machine finds it: the Hub id of a snapshot in the
    local Hugging Face cache (what ``HFPolicy("org/name")`` loads), else ``name`` as it is (a
    path the user gave, or a name ``load_smollm2`` set)."""
    found = HUB_SNAPSHOT.search(name)
    return f"{found[1]}/{found[2]}" if found else name


def portable_adapters(folder: Path) -> None:
    """Rewrite the ``base_model_name_or_path`` of every adapter folder under ``folder`` (the
    policy's, a critic adapter's) with ``portable_name``, and the same path in peft's model
    card beside it, so that the adapters do not point at a cache folder of this machine."""
    for config in folder.rglob("adapter_config.json"):
        values = json.loads(config.read_text())
        old = values.get("base_model_name_or_path")
        if not isinstance(old, str) or portable_name(old) == old:
            continue
        values["base_model_name_or_path"] = portable_name(old)
        config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
        card = config.parent / "README.md"
        if card.is_file():
            card.write_text(card.read_text().replace(old, portable_name(old)))


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """The tokenizer's own files in ``folder`` (as the Trainer uses it: left padding, the pad
    token it was given), when it can write them."""
    if callable(getattr(tokenizer, "save_pretrained", None)):
        tokenizer.save_pretrained(str(folder))


def save_value_head(value_head: ValueHead, folder: Path) -> None:
    """The value head's linear map (``linear.weight`` (1, H), ``linear.bias`` (1,)) in
    ``value_head.safetensors``; a separate critic's trunk under ``critic/`` (its own files)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in value_head.linear.state_dict(
        prefix="linear.").items()}
    save_file(tensors, str(folder / VALUE_HEAD_FILE))
    if value_head.critic is not None:
        value_head.critic.save(folder / CRITIC_FOLDER)


def _linear_state(folder: Path) -> dict[str, Tensor]:
    """The value head's linear map from ``folder``: ``value_head.safetensors``, or the
    ``value_head.pt`` of a folder written by an earlier ppolm (its state dict; tensors only)."""
    from safetensors.torch import load_file

    file = folder / VALUE_HEAD_FILE
    try:
        if file.is_file():
            tensors = load_file(str(file))
        elif (folder / OLD_VALUE_HEAD_FILE).is_file():
            tensors = torch.load(folder / OLD_VALUE_HEAD_FILE, map_location="cpu",
                                 weights_only=True)
        else:
            raise CheckpointError(f"No value head at {str(file)!r}.")
        return {k.removeprefix("linear."): v for k, v in tensors.items()
                if k.startswith("linear.")}
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"Cannot read the value head in {str(folder)!r}: {e}") from None


def load_value_head(folder: str | Path) -> ValueHead:
    """The value head written by ``save_model`` (on the policy's trunk; a separate critic's
    trunk is in ``critic/``, loaded as a policy of its own)."""
    linear = _linear_state(Path(folder))
    head = ValueHead(int(linear["weight"].shape[1]))
    head.linear.load_state_dict(linear)
    return head


def read_value_head(value_head: ValueHead, folder: Path) -> None:
    """Load what ``save_value_head`` wrote into ``value_head`` (its linear map, and a separate
    critic's trunk from ``critic/``)."""
    try:
        value_head.linear.load_state_dict(_linear_state(folder))
    except RuntimeError as e:                                # another shape
        raise CheckpointError(f"The value head in {str(folder)!r} does not fit this run's: "
                              f"{e}") from None
    if value_head.critic is not None:
        value_head.critic.load(folder / CRITIC_FOLDER)


@dataclass(frozen=True)
class ModelFiles:
    """The trained models as their own files, how a checkpoint written by one process holds
    them: ``policy/`` (``policy.save``: ``save_pretrained``, a LoRA policy's adapters alone,
    or ``policy.pt``; with the tokenizer) and the value head (``value_head.safetensors``, a
    separate critic under ``critic/``). Several ranks write DCP shards instead
    (``ppolm.checkpoint.sharded``)."""

    policy: Policy
    value_head: ValueHead | None
    tokenizer: Any = None

    def save(self, folder: Path) -> None:
        self.policy.save(folder / POLICY_FOLDER)
        save_tokenizer(self.tokenizer, folder / POLICY_FOLDER)
        if self.value_head is not None:
            save_value_head(self.value_head, folder)

    def save_description(self, folder: Path) -> None:
        """What a sharded checkpoint holds beside its DCP shards, so that one process can
        rebuild the models without the run's code (``ppolm.checkpoint.run_export``): for a
        transformers policy, ``policy/`` with its ``config.json``, ``generation_config.json``,
        the tokenizer and each adapter's ``adapter_config.json`` (the weights are the shards').
        Nothing for other policies."""
        if not isinstance(self.policy, HFPolicy):
            return
        policy = folder / POLICY_FOLDER
        policy.mkdir(parents=True, exist_ok=True)
        self.policy.lm.config.save_pretrained(str(policy))
        if getattr(self.policy.lm, "generation_config", None) is not None:
            self.policy.lm.generation_config.save_pretrained(str(policy))
        save_tokenizer(self.tokenizer, policy)
        if self.policy.is_lora:             # peft's layout: the default adapter's at the top
            for name, config in self.policy.model.peft_config.items():
                config.save_pretrained(str(policy if name == "default" else policy / name))
            portable_adapters(policy)

    def load(self, folder: Path) -> None:
        """Load the files of ``folder`` into the models, in place."""
        self.policy.load(folder / POLICY_FOLDER)
        if self.value_head is not None:
            read_value_head(self.value_head, folder)
