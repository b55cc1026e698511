"""TensorBoard event files (``report_to: [tensorboard]``)."""

from __future__ import annotations

import shutil
from typing import Any

from ppolm.observe.callbacks import Trainer
from ppolm.observe.trackers.base import Tracker, markdown_table


class TensorBoardTracker(Tracker):
    """Event files under output_dir/tensorboard (``tensorboard --logdir`` on it); the sample
    table as Markdown text."""

    name = "tensorboard"

    def open(self, trainer: Trainer, resume: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = self.output_dir / "tensorboard"
        if not resume:
            shutil.rmtree(log_dir, ignore_errors=True)      # an earlier run's events
        self.writer = SummaryWriter(str(log_dir))

    def log(self, values: dict[str, float], step: int, samples: list[dict[str, Any]] | None
            ) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        if samples:
            self.writer.add_text("samples", markdown_table(samples), step)
        self.writer.flush()            # a crash loses nothing the state file says was logged

    def close(self) -> None:
        self.writer.close()
