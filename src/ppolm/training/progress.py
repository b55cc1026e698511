"""Seconds per named phase of an iteration, and the progress bar of a run."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any


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


class ProgressBar:
    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def update(self, row: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(reward=f"{row['score_mean']:.3f}", kl=f"{row['kl']:.3f}")
            self.bar.update(1)


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, initial: int) -> Iterator[ProgressBar]:
    if not enabled:
        yield ProgressBar(None)
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc="ppo", unit="it", dynamic_ncols=True)
    try:
        yield ProgressBar(bar)
    finally:
        bar.close()
