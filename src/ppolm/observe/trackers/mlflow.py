"""An MLflow run (``report_to: [mlflow]``); the library is imported when the run opens."""

from __future__ import annotations

import os
import time
from typing import Any

from ppolm.observe.callbacks import Trainer
from ppolm.observe.metrics import SAMPLE_COLUMNS
from ppolm.observe.trackers.base import Tracker


class MLflowTracker(Tracker):
    """An MLflow run in the experiment ``project``: in output_dir/mlflow.db (SQLite; artifacts
    under output_dir/mlartifacts) unless MLFLOW_TRACKING_URI names another store
    (``mlflow ui --backend-store-uri sqlite:///.../mlflow.db`` shows a local one); the samples
    as a table artifact ``samples/iter-NNNNNNN.json``."""

    name = "mlflow"

    def open(self, trainer: Trainer, resume: bool) -> None:
        from mlflow.tracking import MlflowClient

        local = self.output_dir.resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{local / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        if resume:
            self.mlflow_run = self.run_id.partition(":")[2]
            self.client.update_run(self.mlflow_run, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(self.project)
        artifacts = None if "MLFLOW_TRACKING_URI" in os.environ else (
            (local / "mlartifacts").as_uri())
        experiment = (found.experiment_id if found is not None else
                      self.client.create_experiment(self.project, artifact_location=artifacts))
        run = self.client.create_run(experiment, run_name=self.run_id)
        self.mlflow_run = run.info.run_id
        self.run_id = f"{self.run_id}:{self.mlflow_run}"       # the name, then MLflow's id
        for key, value in trainer.config.to_dict().items():
            self.client.log_param(self.mlflow_run, key, value)

    def log(self, values: dict[str, float], step: int, samples: list[dict[str, Any]] | None
            ) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.mlflow_run, metrics=[
            Metric(key, value, now, step) for key, value in values.items()])
        if samples:
            columns = {c: [r[c] for r in samples] for c in SAMPLE_COLUMNS}
            self.client.log_table(self.mlflow_run, columns, f"samples/iter-{step:07d}.json")

    def close(self) -> None:
        self.client.set_terminated(self.mlflow_run)
