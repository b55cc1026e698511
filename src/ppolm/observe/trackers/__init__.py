"""Experiment trackers, one module each; ``TRACKER_CLASSES`` maps the names of
``PPOConfig.report_to`` to them."""

from __future__ import annotations

from ppolm.observe.trackers.base import RunTracker, Tracker, markdown_table
from ppolm.observe.trackers.mlflow import MLflowTracker
from ppolm.observe.trackers.tensorboard import TensorBoardTracker
from ppolm.observe.trackers.trackio import TrackioTracker
from ppolm.observe.trackers.wandb import WandbTracker

TRACKER_CLASSES: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker,
    "mlflow": MLflowTracker}

__all__ = ["TRACKER_CLASSES", "MLflowTracker", "RunTracker", "TensorBoardTracker", "Tracker",
           "TrackioTracker", "WandbTracker", "markdown_table"]
