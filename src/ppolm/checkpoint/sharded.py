"""An engine's state spread over the ranks of a process group (``Engine.sharded``), in a
checkpoint's ``models/`` folder with ``torch.distributed.checkpoint`` (DCP): the trained models
and the AdamW state, as ``DistributedEngine.state_dict`` gives them (``models.policy.…``,
``models.value_head.…``, ``optimizer.…``). Every rank writes its own shards (under DDP the
replicated tensors are written once) and loads them in place. DTensors found in the rest of a
Trainer's state (the weight average under FSDP2: each rank's shards) go there too, under
``rest.…`` (``take_dtensors``): rank 0's ``trainer_state.pt`` keeps a placeholder for each,
which ``rest_templates`` turns back into a DTensor to load into. ``export_policy`` turns such a
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
from torch.distributed.tensor import DeviceMesh, DTensor, Placement, Replicate, Shard

from ppolm.checkpoint import folders
from ppolm.checkpoint.export import save_value_head
from ppolm.engines.base import trained_modules
from ppolm.errors import CheckpointError
from ppolm.policies.base import Policy
from ppolm.policies.value import ValueHead

MODELS = "models"
REST = "rest"               # DCP's key of the DTensors of the rest of a Trainer's state
_PLACEHOLDER = "__dtensor__"


def save_shards(state: dict[str, Any], folder: Path) -> None:
    """Write this rank's part of an engine's ``state`` (and of ``state[REST]``, see
    ``take_dtensors``) under ``folder/models`` (every rank calls it together)."""
    dcp.save(state, checkpoint_id=str(folder / MODELS))


def take_dtensors(state: Any, name: str = "") -> tuple[Any, dict[str, DTensor]]:
    """``state`` (nested dicts) with each DTensor replaced by a placeholder (its name, global
    shape, dtype and placements: plain values ``torch.load(weights_only=True)`` reads), and the
    DTensors by name. The placeholders go into rank 0's file, the DTensors into DCP's."""
    if isinstance(state, DTensor):
        return {_PLACEHOLDER: name, "shape": list(state.shape),
                "dtype": str(state.dtype).removeprefix("torch."),
                "placements": [_placement_name(p) for p in state.placements]}, {name: state}
    if not isinstance(state, dict):
        return state, {}
    kept, found = {}, {}
    for k, v in state.items():
        kept[k], inner = take_dtensors(v, f"{name}.{k}" if name else str(k))
        found.update(inner)
    return kept, found


def rest_templates(state: Any, template: dict[str, Any]) -> dict[str, DTensor]:
    """For the placeholders of ``take_dtensors`` in ``state``, empty DTensors of their shape,
    dtype and placements, on the mesh of the engine's own shards in ``template`` (the one FSDP2
    shards the models over), to load the checkpoint's shards into; by name."""
    holders: list[dict[str, Any]] = []
    _placeholders(state, holders)
    if not holders:
        return {}
    meshes = [v.device_mesh for v in template[MODELS].values() if isinstance(v, DTensor)]
    if not meshes:
        raise CheckpointError("This checkpoint holds sharded weights besides the models' (a "
                              "weight average of FSDP2's shards); resume it with "
                              "distributed='fsdp'.")
    return {h[_PLACEHOLDER]: _empty(h, meshes[0]) for h in holders}


def put_dtensors(state: Any, loaded: dict[str, DTensor]) -> Any:
    """``state`` with the placeholders of ``take_dtensors`` replaced by the ``loaded``
    DTensors."""
    if isinstance(state, dict):
        if _PLACEHOLDER in state:
            return loaded[state[_PLACEHOLDER]]
        return {k: put_dtensors(v, loaded) for k, v in state.items()}
    return state


def _placeholders(state: Any, found: list[dict[str, Any]]) -> None:
    if isinstance(state, dict):
        if _PLACEHOLDER in state:
            found.append(state)
        for v in state.values():
            _placeholders(v, found)


def _placement_name(p: Placement) -> str:
    if isinstance(p, Shard):
        return f"shard:{p.dim}"
    if isinstance(p, Replicate):
        return "replicate"
    raise CheckpointError(f"Cannot write a DTensor placed as {p} beside the models' shards "
                          "(sharded on a dimension or replicated only).")


def _empty(holder: dict[str, Any], mesh: DeviceMesh) -> DTensor:
    placements: list[Placement] = [
        Replicate() if name == "replicate" else Shard(int(name.removeprefix("shard:")))
        for name in holder["placements"]]
    if len(placements) != mesh.ndim:
        raise CheckpointError(f"{holder[_PLACEHOLDER]!r} was sharded over {len(placements)} "
                              f"mesh dimensions and this run's models over {mesh.ndim}.")
    return torch.distributed.tensor.empty(holder["shape"], dtype=getattr(torch, holder["dtype"]),
                                          device_mesh=mesh, placements=placements)


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
    """Fill ``template`` (the engine's own ``state_dict()``: the tensors to load into; with
    ``REST``, ``rest_templates``) from ``folder/models``, in place; returns it. Every rank calls
    it together."""
    saved = read_metadata(folder).state_dict_metadata
    missing = [f"{part}.{k}" for part in (MODELS, REST) for k in template.get(part, {})
               if f"{part}.{k}" not in saved]
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
