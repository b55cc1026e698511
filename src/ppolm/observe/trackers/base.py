"""Where the metrics go: metrics.jsonl (always), samples.jsonl, and the experiment trackers of
``PPOConfig.report_to`` (one module each in this package).
Each is a ``Callback``; the Trainer adds them after the user's callbacks
(``ppolm.observe.default_callbacks``), so that metrics a callback adds to the row (e.g.
``eval/*``) reach every one of them.

Every tracker records the same numbers as metrics.jsonl (``metrics.scalars`` of the row) at
the step ``iteration``. A tracker keeps its run id and the last step it logged in
output_dir/trackers.json: a resumed run continues the same tracker run, and steps it has
already logged (iterations run again after the checkpoint; resume is exact, so their numbers
are the same) are not logged twice.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from ppolm.errors import ConfigError
from ppolm.observe.callbacks import Callback, Trainer
from ppolm.observe.metrics import SAMPLE_COLUMNS, scalars
from ppolm.observe.run_files import samples_due

STATE_FILE = "trackers.json"


class Tracker(Callback):
    """An experiment tracker: opens (or resumes) its run at the start of ``train()``, logs
    each iteration's scalars (and the sample table when due) at step ``iteration``, closes at
    the end. Subclasses say how: ``open``, ``log``, ``close``."""

    name = "tracker"

    def __init__(self, output_dir: str | Path, project: str = "ppolm") -> None:
        self.output_dir, self.project = Path(output_dir), project
        self.is_open = False
        self.run_id = ""
        self.last_step = 0

    # --- what a tracker implements ------------------------------------------------------------
    def open(self, trainer: Trainer, resume: bool) -> None:
        """Start the run ``self.run_id``, or continue it when ``resume``."""
        raise NotImplementedError

    def log(self, values: dict[str, float], step: int, samples: list[dict[str, Any]] | None
            ) -> None:
        """Record the scalars, and the table of samples (rows of SAMPLE_COLUMNS) if given."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # --- the hooks ----------------------------------------------------------------------------
    def on_train_begin(self, trainer: Trainer) -> None:
        if self.is_open:
            return
        saved = _read_state(self.output_dir).get(self.name)
        resume = trainer.iteration > 0 and saved is not None
        if resume and saved is not None:
            self.run_id, self.last_step = saved["run_id"], int(saved["last_step"])
        else:
            self.run_id, self.last_step = f"{self.output_dir.name}-{uuid.uuid4().hex[:8]}", 0
        self.open(trainer, resume)
        self.is_open = True
        self.save_state()

    def on_iteration_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        step = int(metrics["iteration"])
        if step <= self.last_step:          # logged before the run was resumed
            return
        due = samples_due(trainer, step) and bool(trainer.last_samples)
        self.log(scalars(metrics), step, trainer.last_samples if due else None)
        self.last_step = step
        self.save_state()

    def on_train_end(self, trainer: Trainer, history: list[dict[str, Any]]) -> None:
        if self.is_open:
            self.close()
            self.is_open = False

    def save_state(self) -> None:
        state = _read_state(self.output_dir)
        state[self.name] = {"run_id": self.run_id, "last_step": self.last_step}
        tmp = self.output_dir / f".{STATE_FILE}.tmp"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.output_dir / STATE_FILE)


def _read_state(output_dir: Path) -> dict[str, Any]:
    path = output_dir / STATE_FILE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise ConfigError(f"{str(path)!r} is not valid JSON; delete it to start new tracker "
                          "runs.") from None
    return state if isinstance(state, dict) else {}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Sample rows as a Markdown table (for trackers that show text)."""
    def cell(v: Any) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(SAMPLE_COLUMNS) + " |", "|---" * len(SAMPLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(r[c]) for c in SAMPLE_COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def table_data(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [[r[c] for c in SAMPLE_COLUMNS] for r in rows]


class RunTracker(Tracker):
    """A tracker whose library gives a run with ``log(dict, step=)`` and ``finish()`` and a
    ``Table(columns=, data=)`` class (W&B, and trackio, which copies its API)."""

    library: Any
    run: Any

    def log(self, values: dict[str, float], step: int, samples: list[dict[str, Any]] | None
            ) -> None:
        table = (self.library.Table(columns=list(SAMPLE_COLUMNS), data=table_data(samples))
                 if samples else None)
        self.run.log({**values, **({"samples": table} if table else {})}, step=step)

    def close(self) -> None:
        self.run.finish()
