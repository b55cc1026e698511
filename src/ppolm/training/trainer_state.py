"""A Trainer's state and its checkpoints: ``TrainerState`` (``trainer.state``) holds the
counters, gives everything a resume needs as one ``state_dict`` (the engine's: the trained
models and the optimizer; the schedule, the KL controller, the prompt order, the weight average,
every random generator), writes and resumes checkpoints through ``ppolm.checkpoint.layout``
(files and dicts only), and refuses to mix a new run with an earlier one in one output_dir."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ppolm.checkpoint import folders, layout
from ppolm.checkpoint.export import ModelFiles
from ppolm.config.ppo import PPOConfig
from ppolm.config.resume import check_checkpoint_config
from ppolm.engines.base import Engine
from ppolm.errors import CheckpointError, ConfigError
from ppolm.observe.metrics import truncate_metrics
from ppolm.parallel.world import World
from ppolm.policies.base import Policy
from ppolm.policies.value import ValueHead
from ppolm.rollout.env import TextGenerationEnv
from ppolm.training.averaging import TailAverage
from ppolm.training.kl_control import KLController
from ppolm.training.seeding import rng_state, set_rng_state


class TrainerState:
    """The state of a run and its checkpoint files.

    Args:
        config: the run's PPOConfig (output_dir, keep_checkpoints, overwrite; written as
            config.yaml).
        world: the ranks of the run.
        engine: the engine, set up (its ``state_dict``: the trained models and the optimizer;
            ``sharded``: how its state is written).
        env: the environment (its prompt order; its tokenizer goes beside the policy).
        policy, value_head: the trained models (their own files in a one-process checkpoint).
        scheduler, kl_ctl, average: the learning-rate schedule, the KL controller, the weight
            average.
        generators: the Trainer's own random generators, by name.
        metrics_path: metrics.jsonl (cut back to the checkpoint on resume); None on the ranks
            that write none.
    """

    def __init__(self, config: PPOConfig, world: World, engine: Engine, env: TextGenerationEnv,
                 policy: Policy, value_head: ValueHead | None,
                 scheduler: torch.optim.lr_scheduler.LambdaLR, kl_ctl: KLController,
                 average: TailAverage, generators: dict[str, torch.Generator],
                 metrics_path: Path | None) -> None:
        self.config, self.world, self.engine, self.env = config, world, engine, env
        self.models = ModelFiles(policy, value_head, env.tokenizer)
        self.scheduler, self.kl_ctl, self.average = scheduler, kl_ctl, average
        self.generators = generators
        self.metrics_path = metrics_path
        self.output_dir = Path(config.output_dir) if config.output_dir is not None else None
        self.iteration = 0            # iterations completed
        self.bad_updates = 0          # non-finite updates in a row

    # --- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: the engine's state (``engine``: the trained models'
        weights and the optimizer's state), the schedule, the KL controller, the prompt order,
        the weight average, this rank's random generators (``rng``) and the counters."""
        return {
            "engine": self.engine.state_dict(),
            "iteration": self.iteration, "bad_updates": self.bad_updates,
            "scheduler": self.scheduler.state_dict(),
            "kl": self.kl_ctl.state_dict(), "env": self.env.state_dict(),
            "average": self.average.state_dict(),
            "rng": rng_state(**self.generators),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned. The state is copied: this run shares no
        tensor with the one that gave it."""
        self._load(copy.deepcopy(state))

    def _load(self, state: dict[str, Any]) -> None:
        try:
            self.engine.load_state_dict(state["engine"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.kl_ctl.load_state_dict(state["kl"])
            self.env.load_state_dict(state["env"])
            self.average.load_state_dict(state["average"], self.engine.device)
            set_rng_state(state["rng"], **self.generators)
            self.iteration, self.bad_updates = state["iteration"], state["bad_updates"]
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"The saved state does not fit this run: {e}") from None

    # --- files -------------------------------------------------------------------------------
    def save(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint (default: output_dir/checkpoints/iter-NNNNNNN, keeping the newest
        ``keep_checkpoints``; layout in ``ppolm.checkpoint.layout``). Every rank calls it
        together. Returns its folder."""
        if path is None and self.output_dir is None:
            raise ConfigError("trainer.save() needs a path, or an output_dir in the config.")
        root = self.checkpoints()
        final = Path(path) if path else root / f"iter-{self.iteration:07d}"
        layout.save(final, self.state_dict(), sharded_state=self.engine.sharded,
                    world=self.world, models=self.models, write_config=self.config.to_yaml,
                    marker=str(self.iteration))
        if path is None:
            self.world.on_main(lambda: folders.prune(root, self.config.keep_checkpoints),
                               "pruning old checkpoints")
        return final

    def resume(self, path: str | Path | None = None) -> int:
        """Load a checkpoint (default: the newest complete one under output_dir/checkpoints)
        to continue from it; returns the iteration reached."""
        if path is None:
            if self.output_dir is None:
                raise ConfigError("trainer.resume() needs a path, or an output_dir in the config.")
            path = folders.latest_checkpoint(self.checkpoints())
            if path is None:
                raise CheckpointError(f"No complete checkpoint under "
                                      f"{str(self.checkpoints())!r} to resume from.")
        check_checkpoint_config(path, self.config)   # refuse settings a resume may not change
        # (read from files: nothing shared, no copy needed)
        self._load(layout.load(Path(path), self.engine.state_dict(),
                               sharded_state=self.engine.sharded, world=self.world,
                               models=self.models))
        self.use_config_learning_rate()
        if self.metrics_path is not None:
            truncate_metrics(self.metrics_path, self.iteration)
        return self.iteration

    def use_config_learning_rate(self) -> None:
        """The config's learning rate from the next optimizer step on: the loaded schedule and
        optimizer hold the saved run's (a resume may change it, ``ppolm.config.resume``)."""
        s, lr = self.scheduler, self.config.learning_rate
        s.base_lrs = [lr] * len(s.base_lrs)
        for group, factor in zip(s.optimizer.param_groups, s.lr_lambdas, strict=True):
            group["initial_lr"], group["lr"] = lr, lr * factor(s.last_epoch)   # as LambdaLR

    def checkpoints(self) -> Path:
        """The folder of the run's checkpoints."""
        return (self.output_dir or Path(".")) / "checkpoints"

    def start_fresh(self) -> None:
        """Before a new run's first iteration: refuse to mix it with an earlier run found in
        output_dir (its checkpoints would be resumed, its metrics read as this run's), unless
        ``config.overwrite``, which deletes them."""
        self.world.together(self._start_fresh, "checking output_dir")

    def _start_fresh(self) -> None:
        if self.output_dir is None or self.metrics_path is None:     # (ranks other than 0)
            return
        found = folders.earlier_run(self.checkpoints(), self.metrics_path)
        if found is None:
            return
        if not self.config.overwrite:
            raise ConfigError(
                f"output_dir {str(self.output_dir)!r} holds an earlier run ({found}). Continue "
                "it with --resume (trainer.resume()), start over with overwrite=true (deletes "
                "it), or choose another output_dir.")
        folders.clear_run(self.checkpoints(), self.metrics_path)
