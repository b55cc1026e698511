"""An engine's state spread over the ranks of a process group (``Engine.sharded``), in a
checkpoint's ``models/`` folder with ``torch.distributed.checkpoint`` (DCP): the trained models
and the AdamW state, as ``DistributedEngine.state_dict`` gives them (``models.policy.…``,
``models.value_head.…``, ``optimizer.…``). Every rank writes its own shards (under DDP the
replicated tensors are written once) and loads them in place. ``export_policy`` turns such a
checkpoint into the policy's own files in one process.

DCP itself unpickles its ``.metadata`` file and every non-tensor value (the optimizer's
``param_groups``) with plain ``pickle``, which runs whatever code a crafted file names; here
both are first read with restricted unpicklers (DCP's own metadata classes, torch's
``weights_only`` loader) and a file that names anything else is refused with a
``CheckpointError`` before DCP reads it.

What else a checkpoint folder holds, and who writes it: ``ppolm.checkpoint.layout``.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import ReadItem

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


METADATA_FILE = ".metadata"         # DCP's index of a checkpoint's tensors and values
_METADATA_CLASSES = {               # what DCP's metadata pickles hold (torch 2.4 to 2.13)
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata and nothing else: a global outside DCP's metadata classes,
    torch's dtypes and sizes, and paths is refused (so a crafted file runs no code)."""

    def find_class(self, module: str, name: str) -> Any:
        import torch.distributed.checkpoint.metadata as meta

        found = None
        if module == meta.__name__:
            found = getattr(meta, name, None)
            found = found if isinstance(found, type) else None
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            found = getattr(torch, name)
        elif name in _METADATA_CLASSES.get(module, ()):
            found = super().find_class(module, name)
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")
        return found


def read_metadata(folder: Path) -> Metadata:
    """DCP's metadata of the checkpoint ``folder/models``, read without running code
    (``CheckpointError`` for a file that is missing, corrupt or names other globals)."""
    file = folder / MODELS / METADATA_FILE
    try:
        with file.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except Exception as e:  # any unpickling failure: a corrupt or foreign file
        raise CheckpointError(f"Checkpoint file {str(file)!r} is corrupt or unsafe: {e}"
                              ) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{str(file)!r} is not DCP's metadata.")
    return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with non-tensor values (which DCP unpickles without the
    weights-only restriction) first checked by torch's ``weights_only`` unpickler: a value that
    passes holds tensors and plain Python values only, so DCP's own load of it runs no code."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except Exception as e:  # an unsafe global, or corrupt bytes
            raise CheckpointError(f"The checkpoint value {read_item.dest_index.fqn!r} is "
                                  f"corrupt or unsafe: {e}") from None
        value.seek(0)
        super().load_bytes(read_item, value)


def _load(state: dict[str, Any], folder: Path, partial: bool = False) -> None:
    """``dcp.load`` of ``folder/models`` into ``state`` in place, its metadata and values read
    safely (see the module docstring); ``partial``: entries of ``state`` that the checkpoint
    lacks keep their values."""
    read_metadata(folder)
    try:
        dcp.load(state, checkpoint_id=str(folder / MODELS),
                 planner=SafeLoadPlanner(allow_partial_load=partial))
    except dcp.CheckpointException as e:      # what DCP makes of any rank's error
        raise CheckpointError(f"Cannot load the shards of {str(folder)!r}: {e}") from None


def load_shards(template: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Fill ``template`` (the engine's own ``state_dict()``: the tensors to load into) from
    ``folder/models``, in place; returns it. Every rank calls it together."""
    saved = read_metadata(folder).state_dict_metadata
    missing = [k for k in template["models"] if f"models.{k}" not in saved]
    if missing:
        raise CheckpointError(f"{str(folder)!r} lacks weights this run's models have "
                              f"({', '.join(missing[:3])}...): it is another run's checkpoint.")
    # get_state_dict gives AdamW state to every parameter, while a parameter that never had a
    # gradient (a critic's unused LM head) has none in the checkpoint: partial loads are
    # allowed for that (such a state is zero and AdamW skips parameters without gradients).
    _load(template, folder, partial=True)
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
    _load(state, folder)
    trained.load_state_dict(state["models"])
    policy.save(out)
    if value_head is not None:
        save_value_head(value_head, out)
    return out
