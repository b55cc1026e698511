"""A trackio run (``report_to: [trackio]``); the library is imported when the run opens."""

from __future__ import annotations

from ppolm.observe.callbacks import Trainer
from ppolm.observe.trackers.base import RunTracker


class TrackioTracker(RunTracker):
    """A trackio run (local: its database under TRACKIO_DIR, by default
    ~/.cache/huggingface/trackio; ``trackio show`` opens the dashboard), named by the run id;
    the samples as a ``trackio.Table``."""

    name = "trackio"

    def open(self, trainer: Trainer, resume: bool) -> None:
        import trackio

        self.library = trackio
        self.run = trackio.init(project=self.project, name=self.run_id,
                                config=trainer.config.to_dict(),
                                resume="allow" if resume else "never", embed=False,
                                auto_log_gpu=False, auto_log_cpu=False)
