"""Random generators: seeding them all, and their state for an exact resume."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(**generators: torch.Generator) -> dict[str, Any]:
    """The global generators' states and those of ``generators`` (by name)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(), "numpy": _numpy_state(),
        **{name: g.get_state() for name, g in generators.items()},
    }


def set_rng_state(state: dict[str, Any], **generators: torch.Generator) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    for name, g in generators.items():
        g.set_state(state[name])


def _numpy_state() -> tuple[str, list[int], int, int, float]:
    """NumPy's generator state in Python numbers (its key as a list, not an array): a file of
    them loads with ``torch.load(weights_only=True)``, which runs no code."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return str(name), np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)
