"""The callbacks a Trainer adds on its own, from its config: health checks, the trackers of
``report_to``, samples.jsonl and metrics.jsonl."""

from __future__ import annotations

from ppolm.config.ppo import PPOConfig
from ppolm.observe.callbacks import Callback
from ppolm.observe.health import HealthMonitor
from ppolm.observe.progress import ProgressCallback
from ppolm.observe.run_files import MetricsFile, SamplesFile
from ppolm.observe.trackers import TRACKER_CLASSES, Tracker
from ppolm.parallel.world import World


def make_trackers(config: PPOConfig) -> list[Tracker]:
    """The trackers ``config.report_to`` names, in its order (the config refuses trackers
    without an output_dir)."""
    if config.output_dir is None:
        return []
    return [TRACKER_CLASSES[name](config.output_dir, config.tracker_project)
            for name in config.report_to if name != "none"]


def default_callbacks(config: PPOConfig, given: list[Callback]) -> list[Callback]:
    """The callbacks a Trainer adds after the ``given`` ones, in the main process only: the
    progress bar (``progress``), a HealthMonitor (``health_checks``, unless one is given), the
    trackers, samples.jsonl and metrics.jsonl (last, so that it holds every metric the others
    added)."""
    out: list[Callback] = []
    if not World.current().is_main:
        return out
    if config.progress:
        out.append(ProgressCallback())
    if config.health_checks and not any(isinstance(cb, HealthMonitor) for cb in given):
        out.append(HealthMonitor())
    out += make_trackers(config)
    if config.output_dir is not None:
        out.append(SamplesFile(config.output_dir))
    out.append(MetricsFile())
    return out
