"""Seconds per named phase of an iteration, and the progress bar of a run (a callback)."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from ppolm.training.callbacks import Callback


class Timer:
    """Seconds per named phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[name] += time.perf_counter() - t0

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def total(self) -> float:
        return time.perf_counter() - self.start


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
