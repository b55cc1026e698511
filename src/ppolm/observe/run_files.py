"""The run's own record in output_dir: metrics.jsonl (every iteration) and samples.jsonl
(the recorded iterations' first samples), both callbacks, both cut back to the checkpoint on
resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ppolm.observe.callbacks import Callback, Trainer
from ppolm.observe.metrics import MetricsWriter, truncate_metrics


def samples_due(trainer: Trainer, iteration: int) -> bool:
    """Whether an iteration records its samples: the first, every ``log_samples_every``-th
    and the last of the run."""
    every = trainer.config.log_samples_every
    return bool(every) and (iteration == 1 or iteration % every == 0
                            or iteration == trainer.config.iterations)


class MetricsFile(Callback):
    """Appends each iteration's row to metrics.jsonl (the crash-safe record that resume
    truncates to the checkpoint), after the other callbacks have added their metrics."""

    def on_iteration_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        writer: MetricsWriter = trainer.metrics
        writer.write(metrics)


class SamplesFile(Callback):
    """samples.jsonl in output_dir: one line per recorded iteration, ``{"iteration": k,
    "samples": [rows of SAMPLE_COLUMNS]}``; cut back to the checkpoint on resume like the
    metrics."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / "samples.jsonl"
        self.written = 0          # the last iteration written

    def on_train_begin(self, trainer: Trainer) -> None:
        if trainer.iteration == 0:
            self.path.unlink(missing_ok=True)
        else:
            truncate_metrics(self.path, trainer.iteration)
        self.written = trainer.iteration

    def on_iteration_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if samples_due(trainer, metrics["iteration"]):
            self.write(trainer, metrics["iteration"])

    def on_train_end(self, trainer: Trainer, history: list[dict[str, Any]]) -> None:
        stopped_early = history and self.written < trainer.iteration
        if stopped_early and trainer.config.log_samples_every:      # its last iteration too
            self.write(trainer, trainer.iteration)

    def write(self, trainer: Trainer, iteration: int) -> None:
        if not trainer.last_samples or self.written == iteration:
            return
        MetricsWriter(self.path).write({"iteration": iteration,
                                        "samples": trainer.last_samples})
        self.written = iteration
