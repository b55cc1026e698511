"""A reward-model run's checkpoints: the model's weights, AdamW's state and the step, written
atomically through ``ppolm.checkpoint.folders`` (output_dir/checkpoints/iter-NNNNNNN). The
pair order and the learning rate are functions of the step and the seed, so these three are
all an exact resume needs (dropout is off). Under FSDP2 (``sharded``) every rank writes its
shards of the weights and of AdamW's state with DCP (``ppolm.checkpoint.sharded``, as the PPO
Trainer's distributed engine) into the folder's ``models/``, and rank 0 the step beside them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ppolm.checkpoint import folders, sharded
from ppolm.config.reward_model import RewardModelConfig
from ppolm.errors import CheckpointError, ConfigError
from ppolm.observe.metrics import truncate_metrics
from ppolm.parallel.world import World
from ppolm.policies.reward_model import RewardModel


class RunState:
    """The step, and the checkpoint files of a run (every rank calls ``save`` together; rank
    0 writes, the ranks hold the same weights under DDP; ``sharded``: under FSDP2, each rank
    its shards)."""

    def __init__(self, config: RewardModelConfig, world: World, model: RewardModel,
                 optimizer: torch.optim.Optimizer, metrics_path: Path | None,
                 sharded: bool = False) -> None:
        self.config, self.world, self.model, self.optimizer = config, world, model, optimizer
        self.metrics_path, self.sharded = metrics_path, sharded
        self.output_dir = Path(config.output_dir) if config.output_dir is not None else None
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs: ``model`` (weights), ``optimizer`` (AdamW's state), ``step``;
        under FSDP2 this rank's shards (DTensors, the optimizer's state keyed by names)."""
        if self.sharded:
            model, optimizer = get_state_dict(self.model, self.optimizer)
            return {"model": model, "optimizer": optimizer, "step": self.step}
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (copied: nothing is shared with its source)."""
        self._load(copy.deepcopy(state))

    def _load(self, state: dict[str, Any]) -> None:
        try:
            if self.sharded:
                set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                               optim_state_dict=state["optimizer"])
            else:
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
        state, tmp = self.state_dict(), folders.temporary(final)
        self.world.on_main(lambda: folders.fresh(tmp), "preparing the checkpoint folder")
        if self.sharded:           # every rank its shards; rank 0's file the step alone
            sharded.save_shards({sharded.MODELS: state.pop("model"),
                                 "optimizer": state.pop("optimizer")}, tmp)
            state.update(sharded=True, world_size=self.world.size)
            self.world.barrier()

        def write() -> None:
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
        folder = Path(path) if path is not None else self.newest()
        state = folders.load_state(folder)
        self._check(folder, state)
        if self.sharded:           # the shards loaded in place into this run's own state
            own = self.state_dict()
            loaded = sharded.load_shards({sharded.MODELS: own["model"],
                                          "optimizer": own["optimizer"]}, folder)
            state = {"model": loaded[sharded.MODELS], "optimizer": loaded["optimizer"],
                     "step": state["step"]}
        self._load(state)          # (read from files: nothing shared with anyone)
        if self.metrics_path is not None:
            truncate_metrics(self.metrics_path, self.step)
        return self.step

    def _check(self, folder: Path, state: dict[str, Any]) -> None:
        """Refuse a checkpoint of FSDP2's shards in a run that is not sharded the same way,
        and the other way round."""
        ranks = state.get("world_size")
        if state.get("sharded") and not self.sharded:
            raise CheckpointError(f"{str(folder)!r} holds the FSDP2 shards of {ranks} ranks: "
                                  f"resume it under torchrun on {ranks} ranks with "
                                  "distributed='fsdp'.")
        if self.sharded and not state.get("sharded"):
            raise CheckpointError(f"{str(folder)!r} holds whole weights (one process or DDP): "
                                  "resume it with distributed='ddp' (or in one process).")
        if self.sharded and ranks != self.world.size:
            raise CheckpointError(f"{str(folder)!r} was written by {ranks} ranks and this run "
                                  f"has {self.world.size}: resume on {ranks} (exact resume "
                                  "keeps the world size).")

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
