"""The callbacks a RewardModelTrainer adds on its own: a progress bar, the trackers of
``report_to`` and metrics.jsonl (the same tracker and metrics classes as PPO's: a step's row
has an ``iteration``, the step)."""

from __future__ import annotations

from typing import Any

from ppolm.config.reward_model import RewardModelConfig
from ppolm.observe.callbacks import Callback
from ppolm.observe.run_files import MetricsFile
from ppolm.observe.trackers import TRACKER_CLASSES
from ppolm.parallel.world import World


class RewardProgress(Callback):
    """A tqdm bar over the steps, showing the last loss and the last held-out accuracy."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.shown: dict[str, str] = {}

    def on_train_begin(self, trainer: Any) -> None:
        from tqdm.auto import tqdm

        self.on_train_end(trainer, [])
        self.bar = tqdm(total=trainer.total_steps, initial=trainer.iteration, desc="reward model",
                        unit="step", dynamic_ncols=True)

    def on_iteration_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.shown["loss"] = f"{metrics['loss']:.3f}"
        if "eval/accuracy" in metrics:
            self.shown["eval_acc"] = f"{metrics['eval/accuracy']:.3f}"
        self.bar.set_postfix(self.shown)
        self.bar.update(1)

    def on_train_end(self, trainer: Any, history: list[dict[str, Any]]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def default_callbacks(config: RewardModelConfig) -> list[Callback]:
    """Added after the given callbacks, on rank 0 only: the progress bar (``progress``), the
    trackers, metrics.jsonl (last, so it holds what the others add)."""
    if not World.current().is_main:
        return []
    out: list[Callback] = [RewardProgress()] if config.progress else []
    if config.output_dir is not None:
        out += [TRACKER_CLASSES[name](config.output_dir, config.tracker_project)
                for name in config.report_to if name != "none"]
    return [*out, MetricsFile()]
