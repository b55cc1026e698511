"""Checkpoint files: folders written atomically, found, pruned and read back. Files and dicts
only; what goes into a checkpoint is the Trainer's ``state_dict`` (and its policy's files).

A checkpoint is a folder ``iter-NNNNNNN``. It is written into a temporary folder beside it,
fsynced, marked complete, then renamed into place: a crash mid-save leaves no folder that looks
complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ppolm.errors import CheckpointError

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.pt"


def temporary(final: Path) -> Path:
    """The temporary folder beside ``final`` that a checkpoint is written into before
    ``commit`` (the same name on every rank of a run: they write into one folder)."""
    return final.parent / f".tmp-{final.name}"


def fresh(folder: Path) -> None:
    """Make ``folder`` an empty folder (deleting what a killed save left there)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def commit(tmp: Path, final: Path, marker: str = "") -> Path:
    """Mark the written folder ``tmp`` complete, fsync it and move it to ``final``."""
    (tmp / COMPLETE).write_text(marker)
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def save_state(state: dict[str, Any], folder: Path) -> None:
    """Write a state dict into a checkpoint folder."""
    torch.save(state, folder / STATE_FILE)


def load_state(folder: str | Path) -> dict[str, Any]:
    """The state dict of a complete checkpoint folder (CheckpointError otherwise)."""
    folder = Path(folder)
    if not (folder / COMPLETE).is_file():
        raise CheckpointError(f"{str(folder)!r} is not a complete ppolm checkpoint.")
    file = folder / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"Checkpoint file {str(file)!r} is missing.")
    try:
        # weights_only: tensors and Python values only; unpickling runs no code from the file
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means a corrupt file
        raise CheckpointError(f"Checkpoint file {str(file)!r} is corrupt: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(file)!r} does not hold a ppolm trainer state.")
    return state


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint under ``folder`` (None if there is none)."""
    root = Path(folder)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("iter-*") if (p / COMPLETE).is_file())
    return done[-1] if done else None


def prune(folder: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop temporary folders of killed saves."""
    folder = Path(folder)
    done = sorted(p for p in folder.glob("iter-*") if (p / COMPLETE).is_file())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in folder.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def earlier_run(checkpoints: Path, metrics: Path) -> str | None:
    """What of an earlier run is found (a checkpoint, or metrics), in words; None if nothing."""
    found = latest_checkpoint(checkpoints)
    if found is not None:
        return f"checkpoint {found.name}"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return f"metrics in {metrics.name}"
    return None


def clear_run(checkpoints: Path, metrics: Path) -> None:
    """Delete an earlier run's checkpoints and metrics."""
    shutil.rmtree(checkpoints, ignore_errors=True)
    metrics.unlink(missing_ok=True)


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
