"""Checkpoints: everything a run needs to continue exactly, written atomically.

A checkpoint is a folder ``iter-NNNNNNN`` holding the policy, the value head, the trainer state
(optimizer, scheduler, KL controller, every random generator, the iteration counter, the
position in the prompt order and the running weight average) and the config. It is written
into a temporary folder beside it, fsynced, marked complete, then renamed into place: a crash
mid-save leaves no folder that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ppolm.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from ppolm.training.trainer import Trainer

COMPLETE = "COMPLETE"


def checkpoint_dir(trainer: Trainer) -> Path:
    return Path(trainer.config.output_dir) / "checkpoints"


def save_checkpoint(trainer: Trainer, path: str | Path | None = None) -> Path:
    """Write the trainer's full state; returns the checkpoint folder."""
    final = Path(path) if path else checkpoint_dir(trainer) / f"iter-{trainer.iteration:07d}"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trainer.policy.save(tmp / "policy")
    torch.save(trainer.value_head.state_dict(), tmp / "value_head.pt")
    torch.save(_trainer_state(trainer), tmp / "trainer_state.pt")
    trainer.config.to_yaml(tmp / "config.yaml")
    (tmp / COMPLETE).write_text(str(trainer.iteration))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if path is None:
        _prune(final.parent, trainer.config.keep_checkpoints)
    return final


def start_fresh(trainer: Trainer) -> None:
    """Before a new run's first iteration: refuse to mix it with an earlier run found in
    output_dir (its checkpoints would be resumed, its metrics read as this run's), unless
    ``config.overwrite``, which deletes them."""
    folder, metrics = checkpoint_dir(trainer), trainer.metrics.path
    found = latest_checkpoint(folder)
    has_metrics = metrics.is_file() and metrics.stat().st_size > 0
    if found is None and not has_metrics:
        return
    if not trainer.config.overwrite:
        what = f"checkpoint {found.name}" if found else f"metrics in {metrics.name}"
        raise ConfigError(
            f"output_dir {trainer.config.output_dir!r} holds an earlier run ({what}). Continue "
            "it with --resume (trainer.resume()), start over with overwrite=true (deletes it), "
            "or choose another output_dir.")
    shutil.rmtree(folder, ignore_errors=True)
    metrics.unlink(missing_ok=True)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint under ``folder`` (None if there is none)."""
    root = Path(folder)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("iter-*") if (p / COMPLETE).is_file())
    return done[-1] if done else None


def load_checkpoint(trainer: Trainer, path: str | Path | None = None) -> Path:
    """Restore the trainer's full state from ``path`` (default: the newest complete one)."""
    if path is None:
        found = latest_checkpoint(checkpoint_dir(trainer))
        if found is None:
            raise CheckpointError(f"No complete checkpoint under {str(checkpoint_dir(trainer))!r}"
                                  " to resume from.")
        path = found
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{str(path)!r} is not a complete ppolm checkpoint.")
    trainer.policy.load(path / "policy")
    trainer.policy.to(trainer.device)
    trainer.value_head.load_state_dict(_load(path / "value_head.pt"))
    state = _load(path / "trainer_state.pt")
    try:
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.kl_ctl.load_state_dict(state["kl"])
        trainer.env.load_state_dict(state["env"])
        trainer.iteration, trainer.bad_updates = state["iteration"], state["bad_updates"]
        # (checkpoints from before tail averaging have no "average": an empty one)
        trainer.average.load_state_dict(state.get("average", {"count": 0, "mean": {}}),
                                        trainer.device)
        _set_rng(trainer, state["rng"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"Checkpoint {str(path)!r} does not fit this run: {e}") from None
    _truncate_metrics(trainer.metrics.path, trainer.iteration)
    return path


def _trainer_state(trainer: Trainer) -> dict[str, Any]:
    return {
        "iteration": trainer.iteration, "bad_updates": trainer.bad_updates,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "kl": trainer.kl_ctl.state_dict(), "env": trainer.env.state_dict(),
        "average": trainer.average.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(), "numpy": np.random.get_state(),
            "sample": trainer.sample_gen.get_state(), "shuffle": trainer.shuffle_gen.get_state(),
        },
    }


def _set_rng(trainer: Trainer, rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    trainer.sample_gen.set_state(rng["sample"])
    trainer.shuffle_gen.set_state(rng["shuffle"])


def _load(file: Path) -> Any:
    if not file.is_file():
        raise CheckpointError(f"Checkpoint file {str(file)!r} is missing.")
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # any unpickling failure means a corrupt file
        raise CheckpointError(f"Checkpoint file {str(file)!r} is corrupt: {e}") from None


def _prune(folder: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop temporary folders of killed saves."""
    done = sorted(p for p in folder.glob("iter-*") if (p / COMPLETE).is_file())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in folder.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metric lines of iterations after ``iteration`` (written by a run that crashed
    before its next checkpoint), so a resumed run's metrics.jsonl has each iteration once."""
    if not path.is_file():
        return
    from ppolm.training.metrics import read_metrics

    rows = [r for r in read_metrics(path) if r.get("iteration", 0) <= iteration]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
