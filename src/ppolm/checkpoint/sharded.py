"""An engine's state spread over the ranks of a process group (``Engine.sharded``), in a
checkpoint's ``models/`` folder with ``torch.distributed.checkpoint`` (DCP): the trained models
and the AdamW state, as ``DistributedEngine.state_dict`` gives them (``models.policy.…``,
``models.value_head.…``, ``optimizer.…``). Every rank writes its own shards (under DDP the
replicated tensors are written once) and loads them in place. ``export_policy`` turns such a
checkpoint into the policy's own files in one process.

What else a checkpoint folder holds, and who writes it: ``ppolm.checkpoint.layout``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from ppolm.checkpoint import folders
from ppolm.checkpoint.export import save_value_head
from ppolm.engines.base import trained_modules
from ppolm.errors import CheckpointError
from ppolm.policies.base import Policy
from ppolm.policies.value import ValueHead

MODELS = "models"


def save_shards(state: dict[str, Any], folder: Path) -> None:
    """Write this rank's part of an engine's ``state`` under ``folder/models`` (every rank
    calls it together)."""
    dcp.save(state, checkpoint_id=str(folder / MODELS))


def load_shards(template: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Fill ``template`` (the engine's own ``state_dict()``: the tensors to load into) from
    ``folder/models``, in place; returns it. Every rank calls it together."""
    saved = dcp.FileSystemReader(str(folder / MODELS)).read_metadata().state_dict_metadata
    missing = [k for k in template["models"] if f"models.{k}" not in saved]
    if missing:
        raise CheckpointError(f"{str(folder)!r} lacks weights this run's models have "
                              f"({', '.join(missing[:3])}...): it is another run's checkpoint.")
    # get_state_dict gives AdamW state to every parameter, while a parameter that never had a
    # gradient (a critic's unused LM head) has none in the checkpoint: partial loads are
    # allowed for that (such a state is zero and AdamW skips parameters without gradients).
    dcp.load(template, checkpoint_id=str(folder / MODELS),
             planner=DefaultLoadPlanner(allow_partial_load=True))
    return template


def export_policy(folder: str | Path, policy: Policy, value_head: ValueHead | None,
                  out: str | Path) -> Path:
    """In one process: load the trained weights of a distributed checkpoint ``folder`` into
    ``policy`` (and ``value_head``), built as the run built them, and write the policy's own
    files into ``out`` (``save_pretrained`` for a transformers model), the value head beside
    them as ``save_model`` writes it (``value_head.safetensors``, a separate critic under
    ``critic/``). Returns ``out``."""
    folder, out = Path(folder), Path(out)
    if not (folder / folders.COMPLETE).is_file() or not (folder / MODELS).is_dir():
        raise CheckpointError(f"{str(folder)!r} is not a complete distributed ppolm checkpoint.")
    trained = trained_modules(policy, value_head)
    state = {"models": trained.state_dict()}
    dcp.load(state, checkpoint_id=str(folder / MODELS))
    trained.load_state_dict(state["models"])
    policy.save(out)
    if value_head is not None:
        save_value_head(value_head, out)
    return out
