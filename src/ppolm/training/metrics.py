"""Per-iteration metrics: one JSON line each, appended and flushed at once."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

#: The metric names every iteration logs (reward parts add ``reward/<name>``).
METRIC_NAMES = (
    "iteration", "reward_mean", "reward_std", "score_mean", "kl", "kl_coef", "entropy",
    "approx_kl", "clipfrac", "ratio_dev_first", "policy_loss", "value_loss", "value_clipfrac",
    "explained_variance", "grad_norm", "lr", "skipped_updates", "epochs_done",
    "response_length", "eos_fraction", "tokens_per_s", "episodes_per_s",
    "time_generate", "time_reward", "time_forward", "time_advantages", "time_train", "time_total",
)


class MetricsWriter:
    """Appends one JSON object per line to ``path``; flushed so a crash loses at most the
    line being written. With ``path`` None nothing is written."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None

    def write(self, row: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in row.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a metrics.jsonl file back (a torn last line is ignored)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
