"""Callbacks: user code at fixed points of the loop (modelled on ``transformers.TrainerCallback``).

Subclass ``Callback`` and override what you need; pass instances as
``Trainer(..., callbacks=[...])``. They are called in order.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from ppolm.config.ppo import PPOConfig
from ppolm.engines.base import Engine
from ppolm.errors import ConfigError
from ppolm.observe.metrics import MetricsWriter
from ppolm.parallel.world import World
from ppolm.policies.base import Policy
from ppolm.policies.value import ValueHead
from ppolm.rollout.env import TextGenerationEnv


class TrainerView(Protocol):
    """What a callback may read from the trainer calling it (``ppolm.Trainer`` is one): the
    run's parts and its progress, and the two ways to write the model. Callbacks are typed
    against this, not the Trainer, so that this module (which the Trainer imports) imports
    nothing of it."""

    @property
    def config(self) -> PPOConfig: ...
    @property
    def env(self) -> TextGenerationEnv: ...
    @property
    def policy(self) -> Policy: ...
    @property
    def value_head(self) -> ValueHead | None: ...
    @property
    def reference(self) -> Policy: ...
    @property
    def engine(self) -> Engine: ...
    @property
    def world(self) -> World: ...
    @property
    def iteration(self) -> int:
        """Iterations completed."""
    @property
    def history(self) -> list[dict[str, Any]]:
        """One metrics row per iteration run by this process."""
    @property
    def last_samples(self) -> list[dict[str, Any]]:
        """The last iteration's first samples (prompt, response, score, kl)."""
    @property
    def output_dir(self) -> Path | None: ...
    @property
    def metrics(self) -> MetricsWriter: ...

    def save(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint (every rank takes part under torchrun)."""
    def save_model(self, path: str | Path, merge: bool = True) -> Path:
        """Write the trained model as a model folder."""


Trainer = TrainerView      # the name the hooks' signatures use


class Callback:
    """Hooks of the training loop; each does nothing unless overridden."""

    def on_train_begin(self, trainer: Trainer) -> None:
        """Before the first iteration of a ``train()`` call (also after a resume)."""

    def on_iteration_end(self, trainer: Trainer, metrics: dict[str, Any]) -> bool | None:
        """After an iteration's metrics are computed and the KL coefficient adapted. Return True
        to stop training after this iteration (a checkpoint is written when the run has an
        output_dir); None or False to go on. ONLY ``True`` stops: any other value (say, the
        ``metrics`` dict) is ignored with a warning, so returning what ``transformers``
        callbacks return does not end a run by accident. A callback may add numbers to
        ``metrics`` (e.g. ``eval/*``): the Trainer's own callbacks (trackers, metrics.jsonl),
        called after the given ones, record them."""
        return None

    def on_save(self, trainer: Trainer, path: Path) -> None:
        """After a checkpoint is complete at ``path``."""

    def on_train_end(self, trainer: Trainer, history: list[dict[str, Any]]) -> None:
        """After the last iteration of a ``train()`` call (``history``: its metric rows)."""


class CallbackList(Callback):
    """Several callbacks called in order; stop when any of them asks to. An exception raised
    in a callback propagates with a note naming the callback and the hook."""

    def __init__(self, callbacks: list[Callback] | None = None) -> None:
        self.callbacks = list(callbacks or [])
        self.warned: set[int] = set()      # callbacks told their return value is ignored
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise ConfigError(f"callbacks must be ppolm.Callback instances, got {cb!r}.")

    def call(self, hook: str, *args: Any) -> list[Any]:
        """Call ``hook`` of every callback in order; their return values."""
        out = []
        for cb in self.callbacks:
            try:
                out.append(getattr(cb, hook)(*args))
            except Exception as e:
                if hasattr(e, "add_note"):           # Python 3.11+
                    e.add_note(f"(raised in callback {type(cb).__name__}.{hook})")
                raise
        return out

    def on_train_begin(self, trainer: Trainer) -> None:
        self.call("on_train_begin", trainer)

    def on_iteration_end(self, trainer: Trainer, metrics: dict[str, Any]) -> bool | None:
        stop = False
        for cb, value in zip(self.callbacks, self.call("on_iteration_end", trainer, metrics),
                             strict=True):
            if value is None or _is_bool(value):
                stop = stop or bool(value)
            elif id(cb) not in self.warned:
                self.warned.add(id(cb))
                warn_user(f"{type(cb).__name__}.on_iteration_end returned a "
                          f"{type(value).__name__}, not True, False or None; only True stops "
                          "training, so the run goes on (return None to go on, True to stop).",
                          UserWarning)
        return stop

    def on_save(self, trainer: Trainer, path: Path) -> None:
        self.call("on_save", trainer, path)

    def on_train_end(self, trainer: Trainer, history: list[dict[str, Any]]) -> None:
        self.call("on_train_end", trainer, history)


def _is_bool(value: Any) -> bool:
    """A Python or NumPy bool (``metrics["kl"] > 5`` computed with NumPy is one)."""
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy"
                                       and kind.__name__ in ("bool", "bool_"))


_PACKAGE = os.path.dirname(os.path.dirname(__file__)) + os.sep   # .../ppolm/, as frames name it


def warn_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first frame outside ppolm (the user's line that
    called ``train()``, not ppolm's internals), with the progress bar cleared while it prints
    so the warning does not land inside the bar. Python 3.12's ``skip_file_prefixes`` does
    the first part; ppolm supports 3.10."""
    from tqdm import tqdm

    frame: FrameType | None = sys._getframe(1)
    level = 2                                 # stacklevel 2: the caller of this function
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    with tqdm.external_write_mode(file=sys.stderr):
        warnings.warn(message, category, stacklevel=level)
