"""A reward-model run's checkpoints: the model's weights, AdamW's state and the step, written
atomically through ``ppolm.checkpoint.folders`` (output_dir/checkpoints/iter-NNNNNNN). The
pair order and the learning rate are functions of the step and the seed, so these three are
all an exact resume needs (dropout is off)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ppolm.checkpoint import folders
from ppolm.config.reward_model import RewardModelConfig
from ppolm.errors import CheckpointError, ConfigError
from ppolm.observe.metrics import truncate_metrics
from ppolm.parallel.world import World
from ppolm.policies.reward_model import RewardModel


class RunState:
    """The step, and the checkpoint files of a run (every rank calls ``save`` together; rank
    0 writes, the ranks hold the same weights under DDP)."""

    def __init__(self, config: RewardModelConfig, world: World, model: RewardModel,
                 optimizer: torch.optim.Optimizer, metrics_path: Path | None) -> None:
        self.config, self.world, self.model, self.optimizer = config, world, model, optimizer
        self.metrics_path = metrics_path
        self.output_dir = Path(config.output_dir) if config.output_dir is not None else None
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs: ``model`` (weights), ``optimizer`` (AdamW's state), ``step``."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (copied: nothing is shared with its source)."""
        state = copy.deepcopy(state)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = int(state["step"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"The saved state does not fit this run: {e}") from None

    def checkpoints(self) -> Path:
        return (self.output_dir or Path(".")) / "checkpoints"

    def save(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint (default: output_dir/checkpoints/iter-NNNNNNN, keeping the newest
        ``keep_checkpoints``); returns its folder."""
        if path is None and self.output_dir is None:
            raise ConfigError("save() needs a path, or an output_dir in the config.")
        final = Path(path) if path is not None else self.checkpoints() / f"iter-{self.step:07d}"
        state = self.state_dict()

        def write() -> None:
            tmp = folders.temporary(final)
            folders.fresh(tmp)
            folders.save_state(state, tmp)
            self.config.to_yaml(tmp / "config.yaml")
            folders.commit(tmp, final, marker=str(self.step))
            if path is None:
                folders.prune(self.checkpoints(), self.config.keep_checkpoints)

        self.world.on_main(write, "writing a checkpoint")
        return final

    def resume(self, path: str | Path | None = None) -> int:
        """Load a checkpoint (default: the newest complete one under output_dir) and cut
        metrics.jsonl back to it; returns the step reached."""
        self.load_state_dict(folders.load_state(path if path is not None else self.newest()))
        if self.metrics_path is not None:
            truncate_metrics(self.metrics_path, self.step)
        return self.step

    def newest(self) -> Path:
        """The newest complete checkpoint under output_dir."""
        found = None if self.output_dir is None else folders.latest_checkpoint(self.checkpoints())
        if found is None:
            where = "output_dir is None" if self.output_dir is None else \
                f"none under {str(self.checkpoints())!r}"
            raise CheckpointError(f"No checkpoint to resume from ({where}): give a path.")
        return found

    def start_fresh(self) -> None:
        """Refuse to mix a new run with an earlier one in output_dir, unless ``overwrite``
        (which deletes it)."""
        self.world.together(self._refuse_earlier_run, "checking output_dir")

    def _refuse_earlier_run(self) -> None:
        metrics = self.metrics_path
        found = None if metrics is None else folders.earlier_run(self.checkpoints(), metrics)
        if found is None or metrics is None:
            return
        if self.config.overwrite:
            folders.clear_run(self.checkpoints(), metrics)
            return
        raise ConfigError(f"output_dir {str(self.output_dir)!r} holds an earlier run ({found}). "
                          "Continue it with --resume (trainer.resume()), start over with "
                          "overwrite=true (deletes it), or choose another output_dir.")
