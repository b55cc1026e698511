"""A Trainer's checkpoint folder: what it holds and who writes it, for one process and for the
ranks of a process group alike. Files and dicts only: the state is the Trainer's
``state_dict()`` (``engine``: the engine's, i.e. the trained models and the optimizer; ``rng``:
this rank's random generators; the rest the same on every rank).

``iter-NNNNNNN/`` holds:

* the engine's state. When it is whole (one process): the models as their own files
  (``ModelFiles``: ``policy/`` with the tokenizer, ``value_head.safetensors``, ``critic/``)
  and the optimizer's state in ``trainer_state.pt``. When it is sharded (``Engine.sharded``,
  under torchrun): ``models/``, DCP's files of the models and the optimizer, each rank writing
  its shards (``ppolm.checkpoint.sharded``), and ``policy/`` the transformers model's
  configs and tokenizer without weights (``ModelFiles.save_description``). DTensors in the
  rest of the state (the weight average of FSDP2's shards) are written there too, each rank
  its shards, under ``rest.…``: rank 0's file below could hold only its own;
* ``trainer_state.pt`` (rank 0): the schedule, KL controller, prompt order, weight average and
  counters, with the checkpoint's format, whether it is sharded and the world size;
* ``rng-rank-K.pt``: each rank's random generators (each rank samples its own episodes);
* ``config.yaml`` (rank 0) and the ``COMPLETE`` marker.

Every rank writes into one temporary folder; when all are done rank 0 marks it complete and
renames it into place (``folders.commit``), so a crash leaves no folder that looks complete.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ppolm.checkpoint import folders, sharded
from ppolm.checkpoint.export import ModelFiles
from ppolm.errors import CheckpointError
from ppolm.parallel.world import World

FORMAT = 2          # 1: the value head and the generators inside trainer_state.pt


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng-rank-{rank}.pt"


def save(final: Path, state: dict[str, Any], *, sharded_state: bool, world: World,
         models: ModelFiles, write_config: Callable[[Path], None], marker: str) -> Path:
    """Write the checkpoint folder ``final`` from ``state`` (every rank calls it together);
    ``sharded_state``: the engine's state is this rank's shards. Returns ``final``."""
    tmp = folders.temporary(final)
    world.on_main(lambda: folders.fresh(tmp), "preparing the checkpoint folder")
    engine = state["engine"]
    shared = {k: v for k, v in state.items() if k not in ("engine", "rng")}
    shared.update(format=FORMAT, sharded=sharded_state, world_size=world.size)
    if sharded_state:
        shared, rest = sharded.take_dtensors(shared)
        sharded.save_shards({**engine, sharded.REST: rest} if rest else engine, tmp)
    else:                          # the models as their own files, the rest with the state
        shared["engine"] = {k: v for k, v in engine.items() if k != "models"}
    torch.save(state["rng"], rng_file(tmp, world.rank))
    world.barrier()                # every rank's files written

    def finish() -> None:
        if sharded_state:            # the models' configs and tokenizer, for run_export
            models.save_description(tmp)
        else:
            models.save(tmp)
        folders.save_state(shared, tmp)
        write_config(tmp / "config.yaml")
        folders.commit(tmp, final, marker)

    world.on_main(finish, "writing the checkpoint")
    return final


def load(folder: Path, template: dict[str, Any], *, sharded_state: bool, world: World,
         models: ModelFiles) -> dict[str, Any]:
    """The state of the checkpoint ``folder`` (every rank calls it together), for a run whose
    engine state is sharded or not as ``sharded_state`` says. ``template``: the engine's own
    ``state_dict()``, which sharded tensors are loaded into. A one-process checkpoint's model
    files are loaded into ``models`` here; its ``engine`` entry then holds the rest."""
    state = folders.load_state(folder)
    _check(folder, state, sharded_state, world)
    if sharded_state:
        rest = sharded.rest_templates(state, template)
        loaded = sharded.load_shards({**template, sharded.REST: rest} if rest else template,
                                     folder)
        state = sharded.put_dtensors(state, rest)
        state["engine"] = {k: v for k, v in loaded.items() if k != sharded.REST}
    else:
        models.load(folder)
    file = rng_file(folder, world.rank)
    try:
        state["rng"] = torch.load(file, weights_only=True)
    except Exception as e:  # missing, corrupt, or naming a global weights_only refuses
        raise CheckpointError(f"Cannot read {str(file)!r}: {e}") from None
    return state


def _check(folder: Path, state: dict[str, Any], sharded_state: bool, world: World) -> None:
    """Refuse a checkpoint written by another version, or by another number of ranks."""
    if state.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(folder)!r} was written by an earlier version of ppolm, in another layout "
            f"(format {state.get('format', 1)}, this version reads {FORMAT}); resume it with "
            "that version, or start a new run.")
    saved, ranks = state["sharded"], state["world_size"]
    if saved and not sharded_state:
        raise CheckpointError(f"{str(folder)!r} holds the shards of {ranks} ranks; resume it "
                              f"under torchrun on {ranks}, or export its policy in one process "
                              "(ppolm.checkpoint.sharded.export_policy).")
    if sharded_state and not saved:
        raise CheckpointError(f"{str(folder)!r} was written by one process; resume it without "
                              "torchrun (or start a new run).")
    if sharded_state and ranks != world.size:
        raise CheckpointError(f"{str(folder)!r} was written by {ranks} ranks and this run has "
                              f"{world.size}: resume on {ranks} (exact resume keeps the world "
                              "size).")
