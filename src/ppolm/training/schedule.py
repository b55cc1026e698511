"""The learning-rate schedule."""

from __future__ import annotations

import math


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based) of ``total``: a linear
    warm-up over the first ``warmup`` steps, then the schedule over the rest."""
    if step < warmup:
        return (step + 1) / warmup
    frac = min((step - warmup) / max(total - warmup, 1), 1.0)
    if schedule == "linear":
        return 1.0 - frac
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    return 1.0
