"""The experiment trackers a run may report to (``PPOConfig.report_to``), checked when the
config is built."""

from __future__ import annotations

import importlib.util

from ppolm.errors import ConfigError

#: Each tracker of ``report_to``: the module it imports and the pip package that provides it.
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "trackio": ("trackio", "trackio"), "mlflow": ("mlflow", "mlflow")}


def check_report_to(report_to: list[str], output_dir: str | None) -> None:
    """ConfigError for an unknown tracker, 'none' beside others, a tracker without an
    output_dir, or a tracker whose package is not installed (naming the pip install)."""
    for name in report_to:
        if name != "none" and name not in TRACKERS:
            raise ConfigError(f"report_to: unknown tracker {name!r}; use any of "
                              f"{', '.join(TRACKERS)}, or 'none'.")
    if "none" in report_to and len(report_to) > 1:
        raise ConfigError(f"report_to={report_to} names 'none' beside trackers; give one or "
                          "the other.")
    names = [n for n in report_to if n != "none"]
    if len(set(names)) < len(names):
        raise ConfigError(f"report_to={report_to} names a tracker twice.")
    if names and output_dir is None:
        raise ConfigError(f"report_to={names} needs an output_dir (the trackers' files and "
                          "run ids are kept there).")
    for name in names:
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"report_to={name!r} needs the {package} package: "
                              f"pip install {package}  (or pip install 'ppolm[{name}]').")
