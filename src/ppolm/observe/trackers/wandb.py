"""A Weights & Biases run (``report_to: [wandb]``); the library is imported when the run
opens."""

from __future__ import annotations

import os

from ppolm.observe.callbacks import Trainer
from ppolm.observe.trackers.base import RunTracker


class WandbTracker(RunTracker):
    """A W&B run under output_dir/wandb, offline unless the environment sets WANDB_MODE
    (``wandb sync`` uploads an offline run later); the samples as a ``wandb.Table``."""

    name = "wandb"

    def open(self, trainer: Trainer, resume: bool) -> None:
        import wandb

        self.library = wandb
        self.run = wandb.init(project=self.project, id=self.run_id, name=self.output_dir.name,
                              dir=str(self.output_dir), config=trainer.config.to_dict(),
                              mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
                              resume="allow" if resume else None, reinit="create_new",
                              settings=wandb.Settings(silent=True))
