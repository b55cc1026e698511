"""The progress bar of a run (a callback)."""

from __future__ import annotations

from typing import Any

from ppolm.observe.callbacks import Callback


class ProgressCallback(Callback):
    """The progress bar of a run (``config.progress``; tqdm): the last iteration's reward and
    KL. Added by the Trainer, on rank 0 only."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_train_begin(self, trainer: Any) -> None:
        from tqdm.auto import tqdm

        self.on_train_end(trainer, [])
        self.bar = tqdm(total=trainer.config.iterations, initial=trainer.iteration, desc="ppo",
                        unit="it", dynamic_ncols=True)

    def on_iteration_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(reward=f"{metrics['score_mean']:.3f}", kl=f"{metrics['kl']:.3f}")
            self.bar.update(1)

    def on_train_end(self, trainer: Any, history: list[dict[str, Any]]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
