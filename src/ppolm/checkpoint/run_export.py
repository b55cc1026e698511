"""``export_run``: the newest checkpoint of a run as a Hugging Face model folder
(``save_model``'s: weights with LoRA merged or the adapters alone, tokenizer, generation
config, the value head beside them), in one process, whether one process or several ranks
wrote it. What ``ppolm export RUN_DIR OUT`` runs, and ``ppolm train`` at the end of a run of a
transformers policy (``OUT = output_dir/model``).

A one-process checkpoint holds the policy's own files (``policy/``: ``save_pretrained``, or a
LoRA policy's adapters, whose base is found by its name). A sharded one holds DCP's shards and
``policy/`` with the model's configs and tokenizer (``ModelFiles.save_description``): the
model is built from its config on the meta device, with no memory for weights, and takes the
tensors read from the shards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ppolm.checkpoint import folders
from ppolm.checkpoint.export import (
    CRITIC_FOLDER,
    POLICY_FOLDER,
    VALUE_HEAD_FILE,
    save_model,
)
from ppolm.checkpoint.sharded import MODELS, SafeLoadPlanner, read_metadata
from ppolm.errors import CheckpointError
from ppolm.policies.hf import HFPolicy, local_model_path
from ppolm.policies.lora import CRITIC_ADAPTER, AdapterCritic, is_peft
from ppolm.policies.pretrained import load_tokenizer
from ppolm.policies.value import ValueHead

ADAPTER_CONFIG = "adapter_config.json"


def export_run(run_dir: str | Path, out: str | Path, merge: bool = True) -> Path:
    """Write the newest complete checkpoint of the run in ``run_dir`` (its ``output_dir``) as
    a model folder at ``out`` (see the module docstring); returns ``out``. ``merge=False``
    writes a LoRA policy's adapters alone (``peft.AutoPeftModelForCausalLM`` loads them).
    Runs in one process; under torchrun call it on one rank (it starts no collective)."""
    found = folders.latest_checkpoint(Path(run_dir) / "checkpoints")
    if found is None:
        raise CheckpointError(f"No complete checkpoint under {str(Path(run_dir))!r}/checkpoints "
                              "(is RUN_DIR a run's output_dir?).")
    return export_checkpoint(found, out, merge)


def export_checkpoint(folder: str | Path, out: str | Path, merge: bool = True) -> Path:
    """``export_run`` of one checkpoint folder ``iter-NNNNNNN``."""
    folder, out = Path(folder), Path(out)
    sharded = bool(folders.load_state(folder).get("sharded"))
    description = folder / POLICY_FOLDER
    if not (description / "config.json").is_file() and not (
            description / ADAPTER_CONFIG).is_file():
        raise CheckpointError(
            f"{str(folder)!r} holds no transformers model ({POLICY_FOLDER}/config.json): "
            "export writes transformers policies (a sharded checkpoint of an earlier ppolm "
            "version: ppolm.checkpoint.sharded.export_policy).")
    tokenizer = load_tokenizer(description)
    if sharded:
        policy, value_head = _from_shards(folder)
        return save_model(policy, tokenizer, out, value_head, merge=merge)
    save_model(_from_files(description), tokenizer, out, merge=merge)
    if (folder / VALUE_HEAD_FILE).is_file():      # already in save_model's form: copied
        shutil.copy2(folder / VALUE_HEAD_FILE, out / VALUE_HEAD_FILE)
    if (folder / CRITIC_FOLDER).is_dir():
        shutil.copytree(folder / CRITIC_FOLDER, out / CRITIC_FOLDER, dirs_exist_ok=True)
    return out


def _from_files(policy: Path) -> HFPolicy:
    """The policy of a one-process checkpoint: its ``save_pretrained`` folder, or its adapters
    on their base model (found by the name in ``adapter_config.json``)."""
    if not (policy / ADAPTER_CONFIG).is_file():
        return HFPolicy(policy)
    from peft import PeftModel

    base_name = json.loads((policy / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(_base_model(base_name), str(policy))
    for name, sub in _adapter_folders(policy).items():
        if name != "default":
            model.load_adapter(str(sub), adapter_name=name)
    return HFPolicy(model)


def _base_model(name: str) -> Any:
    """The base model a LoRA policy was trained on: a local folder or a model of the Hugging
    Face cache, or SmolLM2-135M-Instruct as ``load_smollm2`` makes it (its name)."""
    from ppolm.policies.pretrained import SMOLLM2_NAME, load_smollm2

    try:
        return HFPolicy(local_model_path(name)).model
    except Exception:  # not a local folder nor cached: the GGUF SmolLM2 goes by the Hub name
        if name != SMOLLM2_NAME:
            raise
        return load_smollm2()[0].model


def _adapter_folders(policy: Path) -> dict[str, Path]:
    """Adapter name -> its folder, in peft's layout (the default adapter at the top)."""
    found = {"default": policy} if (policy / ADAPTER_CONFIG).is_file() else {}
    found.update({sub.name: sub for sub in sorted(policy.iterdir())
                  if sub.is_dir() and (sub / ADAPTER_CONFIG).is_file()})
    return found


def read_shards(folder: Path, prefix: str = "models.") -> dict[str, Tensor]:
    """Every tensor under ``prefix`` in the DCP shards of the checkpoint ``folder``, whole, in
    this process (read safely: ``ppolm.checkpoint.sharded``), the prefix taken off."""
    meta = read_metadata(folder).state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    try:
        dcp.load(state, checkpoint_id=str(folder / MODELS), planner=SafeLoadPlanner(),
                 no_dist=True)
    except dcp.CheckpointException as e:
        raise CheckpointError(f"Cannot read the shards of {str(folder)!r}: {e}") from None
    return {k.removeprefix(prefix): v for k, v in state.items()}


def _from_shards(folder: Path) -> tuple[HFPolicy, ValueHead | None]:
    """The policy and value head of a sharded checkpoint, built from ``policy/`` on the meta
    device and given the tensors of the shards."""
    tensors = read_shards(folder)
    policy = HFPolicy(_rebuild(folder / POLICY_FOLDER, _part(tensors, "policy.model.")))
    head = _part(tensors, "value_head.linear.")
    if not head:
        return policy, None
    critic_state = _part(tensors, "value_head.critic.model.")
    critic: HFPolicy | AdapterCritic | None = None
    if critic_state:
        critic = HFPolicy(_rebuild(folder / POLICY_FOLDER, critic_state))
    elif CRITIC_ADAPTER in getattr(policy.model, "peft_config", {}):
        # a critic adapter (ValueHead.adapter): its weights are among the policy's
        critic = AdapterCritic(policy, name=CRITIC_ADAPTER, existing=True)
    value_head = ValueHead(policy.hidden_size, critic=critic)
    value_head.linear.load_state_dict(head)
    return policy, value_head


def _part(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def _rebuild(description: Path, state: dict[str, Tensor]) -> Any:
    """A transformers model (a PeftModel when ``description`` has adapter configs and
    ``state`` has adapter weights) from its config on the meta device, given ``state``."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    with torch.device("meta"):          # no memory for weights that ``state`` replaces
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(description)))
        adapters = _adapter_folders(description)
        if adapters and any("lora_" in k for k in state):
            from peft import LoraConfig, get_peft_model

            configs = {n: LoraConfig.from_pretrained(str(f)) for n, f in adapters.items()}
            base = configs["default"].base_model_name_or_path
            # the run's base, not this folder: peft names the base after the model
            model.name_or_path = model.config.name_or_path = base or ""
            model = get_peft_model(model, configs.pop("default"))
            for name, config in configs.items():
                model.add_adapter(name, config)
            for config in model.peft_config.values():
                config.base_model_name_or_path = base
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"The shards do not fit the model in {str(description)!r}: "
                              f"{e}") from None
    lm = model.get_base_model() if is_peft(model) else model
    lm.tie_weights()                     # assign=True replaced the tied tensors one by one
    if (description / "generation_config.json").is_file():
        lm.generation_config = GenerationConfig.from_pretrained(str(description))
    return model.eval()
