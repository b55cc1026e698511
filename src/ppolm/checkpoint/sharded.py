"""Checkpoints of a run on several processes, with ``torch.distributed.checkpoint`` (DCP).

A folder ``iter-NNNNNNN`` holds:

* ``models/``: DCP's files: the policy and value head (``policy.*``, ``value_head.*``) and the
  AdamW state; under FSDP2 each rank writes its own shards, under DDP the replicated tensors are
  written once;
* ``trainer_state.pt`` (rank 0): the schedule, KL controller, prompt order, weight average and
  counters, with the world size;
* ``rng-rank-K.pt``: each rank's random generators (each rank samples its own episodes);
* ``config.yaml`` and the ``COMPLETE`` marker.

Every rank writes into the same temporary folder; when all are done (a barrier) rank 0 marks it
complete and renames it into place, as ``ppolm.checkpoint.folders.write_atomic`` does in one
process. ``export_policy`` turns such a checkpoint into the policy's own files
(``save_pretrained`` for a transformers model) in one process.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ppolm.checkpoint import folders as checkpoint
from ppolm.errors import CheckpointError
from ppolm.policies.base import Policy
from ppolm.policies.value import ValueHead

MODELS = "models"


def models(policy: Policy, value_head: ValueHead | None) -> nn.Module:
    """The trained modules under the names a distributed checkpoint uses (no copy)."""
    found: dict[str, nn.Module] = {"policy": policy}
    if value_head is not None:
        found["value_head"] = value_head
    return nn.ModuleDict(found)


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng-rank-{rank}.pt"


def save(final: Path, trained: nn.Module, optimizer: torch.optim.Optimizer,
         state: dict[str, Any], rng: dict[str, Any], write_config: Any, marker: str) -> None:
    """Write a checkpoint folder ``final`` from every rank (see the module docstring);
    ``state`` (rank 0's) is the Trainer's state without models and optimizer."""
    rank = dist.get_rank()
    tmp = final.parent / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(trained, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / MODELS))
    torch.save(rng, rng_file(tmp, rank))
    if rank == 0:
        checkpoint.save_state({**state, "world_size": dist.get_world_size()}, tmp)
        write_config(tmp / "config.yaml")
    dist.barrier()
    if rank == 0:
        checkpoint.commit(tmp, final, marker)
    dist.barrier()


def load(folder: Path, trained: nn.Module, optimizer: torch.optim.Optimizer
         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the models and optimizer of a checkpoint folder written by ``save`` in place;
    returns the Trainer's state and this rank's random generators."""
    state = checkpoint.load_state(folder)
    saved, world = state.get("world_size"), dist.get_world_size()
    if saved is None:
        raise CheckpointError(f"{str(folder)!r} was written by one process; resume it without "
                              "torchrun (or start a new run).")
    if saved != world:
        raise CheckpointError(f"{str(folder)!r} was written by {saved} ranks and this run has "
                              f"{world}: resume on {saved} (exact resume keeps the world size).")
    model_state, optim_state = get_state_dict(trained, optimizer)
    saved_keys = dcp.FileSystemReader(str(folder / MODELS)).read_metadata().state_dict_metadata
    missing = [k for k in model_state if f"model.{k}" not in saved_keys]
    if missing:
        raise CheckpointError(f"{str(folder)!r} lacks weights this run's models have "
                              f"({', '.join(missing[:3])}...): it is another run's checkpoint.")
    # DCP loads in place into the tensors of these dicts. get_state_dict gives AdamW state to
    # every parameter, while a parameter that never had a gradient (a critic's unused LM head)
    # has none in the checkpoint: partial loads are allowed for that (such a state is zero
    # and AdamW skips parameters without gradients).
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder / MODELS),
             planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(trained, optimizer, model_state_dict=model_state,
                   optim_state_dict=optim_state)
    rng = torch.load(rng_file(folder, dist.get_rank()), weights_only=False)
    return state, rng


def export_policy(folder: str | Path, policy: Policy, value_head: ValueHead | None,
                  out: str | Path) -> Path:
    """In one process: load the trained weights of a distributed checkpoint ``folder`` into
    ``policy`` (and ``value_head``), built as the run built them, and write the policy's own
    files into ``out`` (``save_pretrained`` for a transformers model; the value head beside
    it as ``value_head.pt``). Returns ``out``."""
    folder, out = Path(folder), Path(out)
    if not (folder / checkpoint.COMPLETE).is_file() or not (folder / MODELS).is_dir():
        raise CheckpointError(f"{str(folder)!r} is not a complete distributed ppolm checkpoint.")
    trained = models(policy, value_head)
    state = {"model": trained.state_dict()}
    dcp.load(state, checkpoint_id=str(folder / MODELS))
    trained.load_state_dict(state["model"])
    policy.save(out)
    if value_head is not None:
        torch.save(value_head.state_dict(), out / "value_head.pt")
    return out
