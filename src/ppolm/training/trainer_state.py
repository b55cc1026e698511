"""The Trainer's state and files: ``state_dict``/``load_state_dict`` (everything a resume
needs), checkpoints written and resumed, and the refusal to mix a new run with an earlier one in
the same output_dir. A base class of ``ppolm.Trainer``: the loop lives in ``trainer.py``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppolm.checkpoint import export
from ppolm.checkpoint import folders as checkpoint
from ppolm.checkpoint import sharded as dcp
from ppolm.config.ppo import PPOConfig
from ppolm.engines.base import Engine
from ppolm.errors import CheckpointError, ConfigError
from ppolm.observe.callbacks import CallbackList
from ppolm.observe.metrics import MetricsWriter, truncate_metrics
from ppolm.parallel.world import World
from ppolm.policies.base import Policy
from ppolm.policies.value import ValueHead
from ppolm.rollout.env import TextGenerationEnv
from ppolm.training.averaging import TailAverage
from ppolm.training.kl_control import KLController
from ppolm.training.seeding import rng_state, set_rng_state


class TrainerState:
    """State and checkpoint files of a Trainer (the attributes below are set by ``Trainer``)."""

    config: PPOConfig
    env: TextGenerationEnv
    policy: Policy
    value_head: ValueHead | None
    engine: Engine
    scheduler: torch.optim.lr_scheduler.LambdaLR
    kl_ctl: KLController
    average: TailAverage
    sample_gen: torch.Generator
    shuffle_gen: torch.Generator
    device: torch.device
    iteration: int
    bad_updates: int
    output_dir: Path | None
    metrics: MetricsWriter
    callbacks: CallbackList
    world: World

    # --- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: the models' trainable state, the engine's (optimizer),
        the schedule, the KL controller, the prompt order, the weight average, every random
        generator and the counters."""
        return {
            "policy": self.policy.state_dict(),
            "value_head": self.value_head.state_dict() if self.value_head is not None else {},
            "engine": self.engine.state_dict(), **self.state_dict_rest(),
        }

    def state_dict_rest(self) -> dict[str, Any]:
        """``state_dict`` without the models and the engine's optimizer."""
        return {
            "iteration": self.iteration, "bad_updates": self.bad_updates,
            "scheduler": self.scheduler.state_dict(),
            "kl": self.kl_ctl.state_dict(), "env": self.env.state_dict(),
            "average": self.average.state_dict(),
            "rng": rng_state(sample=self.sample_gen, shuffle=self.shuffle_gen),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (``policy`` may be left out when the policy's
        weights were loaded another way). The state is copied: this Trainer shares no tensor
        with the one that gave it."""
        state = copy.deepcopy(state)
        try:
            if "policy" in state:
                self.policy.load_state_dict(state["policy"])
            if self.value_head is not None:
                self.value_head.load_state_dict(state["value_head"])
            self.engine.load_state_dict(state["engine"])
            self._load_rest(state)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"The saved state does not fit this run: {e}") from None

    def _load_rest(self, state: dict[str, Any]) -> None:
        """The state beside the models and the optimizer."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl"])
        self.env.load_state_dict(state["env"])
        self.average.load_state_dict(state["average"], self.device)
        set_rng_state(state["rng"], sample=self.sample_gen, shuffle=self.shuffle_gen)
        self.iteration, self.bad_updates = state["iteration"], state["bad_updates"]

    # --- files -------------------------------------------------------------------------------
    def save(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint (default: output_dir/checkpoints/iter-NNNNNNN, keeping the newest
        ``keep_checkpoints``): the policy's own files (with LoRA its adapters) and the
        tokenizer under ``policy/``, the rest of ``state_dict()``, the config. Returns its
        folder."""
        if path is None and self.output_dir is None:
            raise ConfigError("trainer.save() needs a path, or an output_dir in the config.")
        folder = self._checkpoints()
        final = Path(path) if path else folder / f"iter-{self.iteration:07d}"
        if self.world.distributed:
            self._save_sharded(final)
        else:
            self._save_one(final)
        if path is None and self.world.is_main:
            checkpoint.prune(folder, self.config.keep_checkpoints)
        self.callbacks.on_save(self, final)
        return final

    def _save_one(self, final: Path) -> None:
        state = self.state_dict()
        del state["policy"]                          # written as the policy's own files

        def write(tmp: Path) -> None:
            self.policy.save(tmp / "policy")
            export.save_tokenizer(self.env.tokenizer, tmp / "policy")
            checkpoint.save_state(state, tmp)
            self.config.to_yaml(tmp / "config.yaml")

        checkpoint.write_atomic(final, write, str(self.iteration))

    def _trained(self) -> nn.Module:
        return dcp.models(self.policy, self.value_head)

    def _rest(self) -> dict[str, Any]:
        state = self.state_dict_rest()
        del state["rng"]
        return state

    def _save_sharded(self, final: Path) -> None:
        dcp.save(final, self._trained(), self.engine.optimizer, self._rest(),
                 rng_state(sample=self.sample_gen, shuffle=self.shuffle_gen),
                 self.config.to_yaml, str(self.iteration))

    def save_model(self, path: str | Path, merge: bool = True) -> Path:
        """Write the policy as a Hugging Face model folder that ``AutoModelForCausalLM``,
        ``AutoTokenizer`` and ``pipeline("text-generation", model=path)`` load: weights (LoRA
        merged; ``merge=False``: the adapters alone), tokenizer, generation config, and the
        value head beside them (see ``ppolm.checkpoint.export.save_model``)."""
        return export.save_model(self.policy, self.env.tokenizer, path, self.value_head,
                                 merge=merge)

    def resume(self, path: str | Path | None = None) -> int:
        """Load a checkpoint (default: the newest complete one under output_dir/checkpoints)
        and continue from it on the next ``train()``; returns the iteration reached."""
        if path is None:
            if self.output_dir is None:
                raise ConfigError("trainer.resume() needs a path, or an output_dir in the config.")
            found = checkpoint.latest_checkpoint(self._checkpoints())
            if found is None:
                raise CheckpointError(f"No complete checkpoint under "
                                      f"{str(self._checkpoints())!r} to resume from.")
            path = found
        if self.world.distributed:
            state, rng = dcp.load(Path(path), self._trained(), self.engine.optimizer)
            self._load_rest({**state, "rng": rng})
        else:
            state = checkpoint.load_state(path)
            self.policy.load(Path(path) / "policy")
            self.policy.to(self.device)
            self.load_state_dict(state)
        if self.metrics.path is not None:
            truncate_metrics(self.metrics.path, self.iteration)
        return self.iteration

    def _checkpoints(self) -> Path:
        return (self.output_dir or Path(".")) / "checkpoints"

    def start_fresh(self) -> None:
        """Before a new run's first iteration: refuse to mix it with an earlier run found in
        output_dir (its checkpoints would be resumed, its metrics read as this run's), unless
        ``config.overwrite``, which deletes them."""
        self.world.together(self._start_fresh, "checking output_dir")

    def _start_fresh(self) -> None:
        if self.output_dir is None or self.metrics.path is None:     # (ranks other than 0)
            return
        found = checkpoint.earlier_run(self._checkpoints(), self.metrics.path)
        if found is None:
            return
        if not self.config.overwrite:
            raise ConfigError(
                f"output_dir {str(self.output_dir)!r} holds an earlier run ({found}). Continue "
                "it with --resume (trainer.resume()), start over with overwrite=true (deletes "
                "it), or choose another output_dir.")
        checkpoint.clear_run(self._checkpoints(), self.metrics.path)
