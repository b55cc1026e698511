"""Trackers in real (tiny) runs, read back with each library's own reader (or, for W&B, its
offline file): the same scalars at the same steps as metrics.jsonl, the sample tables, one name
list for all, no step logged twice after a resume, and clear errors for a bad ``report_to``."""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path

import pytest

from conftest import toy_trainer
from ppolm import Callback, PPOConfig
from ppolm.config.report_to import TRACKERS
from ppolm.errors import ConfigError
from ppolm.observe.metrics import (
    METRIC_NAMES,
    METRIC_PREFIXES,
    SAMPLE_COLUMNS,
    read_metrics,
    scalars,
)

# Timings differ between a run and its resumed repeat; every other number is the same.
TIMINGS = ("time_", "tokens_per_s", "episodes_per_s")


def run(out, **overrides):
    """A 3-iteration toy run, samples at 1, 2 and 3; returns its metrics.jsonl rows."""
    settings = dict(iterations=3, save_every=0, log_samples_every=2, health_checks=False)
    trainer = toy_trainer(out, **{**settings, **overrides})
    trainer.train()
    return read_metrics(Path(out) / "metrics.jsonl")


# --- readers: (name, step, value) of everything a tracker holds -------------------------------
def read_tensorboard(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(out) / "tensorboard"), size_guidance={"scalars": 0,
                                                                          "tensors": 0})
    acc.Reload()
    logged = [(tag, e.step, e.value) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]
    tables = {e.step: e.tensor_proto.string_val[0].decode()
              for tag in acc.Tags()["tensors"] if tag.startswith("samples")
              for e in acc.Tensors(tag)}
    return logged, tables


def wandb_records(path):
    """The protobuf records of a W&B offline run file (a LevelDB-style log of 32 KiB blocks
    after a 7-byte ':W&B' header), read with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:                       # block trailer
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4) and buf:                         # a FULL record, or the LAST part
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def finished_records(path, seconds=60.0):
    """The records of a W&B run file once its ``exit`` record is there: ``run.finish()`` may
    return before wandb's service process has written the last of it."""
    deadline = time.monotonic() + seconds
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record"
        time.sleep(0.2)


def read_wandb(out):
    logged, tables = [], {}
    for file in sorted(Path(out).glob("wandb/offline-run-*/run-*.wandb")):
        for record in finished_records(file):
            if record.WhichOneof("record_type") != "history":
                continue
            step, items = record.history.step.num, {}
            for item in record.history.item:             # a table: nested keys samples/...
                key = item.key or "/".join(item.nested_key)
                items[key] = json.loads(item.value_json)
            if "samples/_type" in items:
                tables[step] = items["samples/path"]
            logged += [(k, step, v) for k, v in items.items()
                       if not k.startswith(("_", "samples/"))]
    return logged, tables


def read_mlflow(out, names):
    from mlflow.tracking import MlflowClient

    state = json.loads((Path(out) / "trackers.json").read_text())["mlflow"]
    run_id = state["run_id"].partition(":")[2]
    client = MlflowClient(f"sqlite:///{Path(out).resolve() / 'mlflow.db'}")
    logged = [(k, m.step, m.value) for k in names for m in client.get_metric_history(run_id, k)]
    tables = {int(a.path[-12:-5]): a.path for a in client.list_artifacts(run_id, "samples")}
    return logged, tables


def read_trackio(out, project):
    from trackio.sqlite_storage import SQLiteStorage

    name = json.loads((Path(out) / "trackers.json").read_text())["trackio"]["run_id"]
    logged, tables = [], {}
    for row in SQLiteStorage.get_logs(project, name):
        step = row["step"]
        if "samples" in row:
            tables[step] = row["samples"]
        logged += [(k, step, v) for k, v in row.items() if isinstance(v, float)]
    return logged, tables


@pytest.fixture(scope="session")
def trackio_dir(tmp_path_factory):
    """trackio keeps its databases where TRACKIO_DIR said when it was first imported: point it
    at a temporary folder before that."""
    if "trackio" in sys.modules:
        pytest.skip("trackio was imported before its folder could be set")
    folder = tmp_path_factory.mktemp("trackio")
    old = os.environ.get("TRACKIO_DIR")
    os.environ["TRACKIO_DIR"] = str(folder)
    try:
        pytest.importorskip("trackio")
    finally:
        if old is None:
            del os.environ["TRACKIO_DIR"]
        else:
            os.environ["TRACKIO_DIR"] = old
    return folder


def read_back(tracker, out, names, project):
    if tracker == "tensorboard":
        return read_tensorboard(out)
    if tracker == "wandb":
        return read_wandb(out)
    if tracker == "mlflow":
        return read_mlflow(out, names)
    return read_trackio(out, project)


def by_name(logged):
    out: dict[str, dict[int, float]] = {}
    for name, step, value in logged:
        assert step not in out.setdefault(name, {}), f"{name} logged twice at step {step}"
        out[name][step] = value
    return out


def expected(rows):
    """{name: {step: value}} of metrics.jsonl, as trackers receive it."""
    out: dict[str, dict[int, float]] = {}
    for row in rows:
        for name, value in scalars(row).items():
            out.setdefault(name, {})[row["iteration"]] = value
    return out


# --- the tests ---------------------------------------------------------------------------------
def test_the_metric_names_cover_what_an_iteration_logs(tmp_path):
    rows = run(tmp_path / "gae", iterations=1)
    rows += run(tmp_path / "grpo", iterations=1, advantage_estimator="grpo", kl_mode="loss",
                samples_per_prompt=2)
    names = {k for row in rows for k in row}
    assert names - set(METRIC_NAMES) == {k for k in names if k.startswith(METRIC_PREFIXES)}
    assert {"explained_variance", "zero_signal_groups", "score_std", "loss"} <= names


def test_tensorboard_holds_the_jsonl_scalars_at_the_same_steps(tmp_path):
    rows = run(tmp_path, report_to=["tensorboard"])
    assert [row["iteration"] for row in rows] == [1, 2, 3]
    logged, tables = read_tensorboard(tmp_path)
    got, want = by_name(logged), expected(rows)
    assert set(got) == set(want) and "kl" in got and "iteration" not in got
    for name, steps in want.items():
        assert got[name] == pytest.approx(steps, rel=1e-6, abs=1e-12), name   # float32
    assert sorted(tables) == [1, 2, 3]
    assert tables[1].splitlines()[0] == "| " + " | ".join(SAMPLE_COLUMNS) + " |"


def test_samples_jsonl_holds_the_first_every_nth_and_last_iteration(tmp_path):
    run(tmp_path, iterations=5, log_samples_every=2)
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2, 4, 5]
    sample = lines[0]["samples"][0]
    assert list(sample) == list(SAMPLE_COLUMNS) and len(lines[0]["samples"]) == 8
    assert isinstance(sample["response"], str) and isinstance(sample["kl"], float)
    run(tmp_path / "never", iterations=2, log_samples_every=0)
    assert not (tmp_path / "never" / "samples.jsonl").exists()


class CrashAt(Callback):
    """Raises at the end of iteration ``at``, before the trackers log it (a killed run)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_iteration_end(self, trainer, metrics):
        if metrics["iteration"] == self.at:
            raise RuntimeError("killed")


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "mlflow", "trackio"])
def test_a_resumed_run_continues_the_tracker_run_without_logging_a_step_twice(
        tracker, tmp_path, request):
    if tracker == "trackio":
        request.getfixturevalue("trackio_dir")     # before trackio is imported
    pytest.importorskip(TRACKERS[tracker][0])
    project = f"ppolm-test-{tmp_path.name}"
    settings = dict(iterations=4, save_every=2, report_to=[tracker], log_samples_every=2,
                    health_checks=False, tracker_project=project)
    first = toy_trainer(tmp_path, **settings)
    first.callbacks.callbacks.insert(0, CrashAt(4))
    with pytest.raises(RuntimeError, match="killed"):
        first.train()              # logged 1-3; the checkpoint is at 2
    first.callbacks.on_train_end(first, [])       # what the process's exit would close
    run_id = json.loads((tmp_path / "trackers.json").read_text())[tracker]["run_id"]

    resumed = toy_trainer(tmp_path, **settings)
    assert resumed.resume() == 2
    resumed.train()                # runs 3 (logged already) and 4
    state = json.loads((tmp_path / "trackers.json").read_text())[tracker]
    assert state == {"run_id": run_id, "last_step": 4}

    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4]
    want = expected(rows)
    logged, tables = read_back(tracker, tmp_path, list(want), project)
    got = by_name(logged)                              # fails on a step logged twice
    assert set(got) == set(want)
    for name, steps in want.items():
        assert sorted(got[name]) == [1, 2, 3, 4], name
        if not name.startswith(TIMINGS):               # resume is exact
            assert got[name] == pytest.approx(steps, rel=1e-6, abs=1e-12), name
    assert sorted(tables) == [1, 2, 4]


def test_a_missing_tracker_package_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(TRACKERS, "wandb", ("ppolm_no_such_module", "wandb"))
    with pytest.raises(ConfigError, match=r"pip install wandb .*ppolm\[wandb\]"):
        PPOConfig(report_to=["wandb"], output_dir="out")


@pytest.mark.parametrize("report_to,output_dir,match", [
    (["tensorbord"], "out", "unknown tracker 'tensorbord'"),
    (["none", "tensorboard"], "out", "'none' beside trackers"),
    (["tensorboard", "tensorboard"], "out", "twice"),
    (["tensorboard"], None, "needs an output_dir"),
])
def test_a_bad_report_to_is_refused(report_to, output_dir, match):
    with pytest.raises(ConfigError, match=match):
        PPOConfig(report_to=report_to, output_dir=output_dir)
    PPOConfig(report_to=["none"])                      # no tracker needs no output_dir


class AddsMetric(Callback):
    def on_iteration_end(self, trainer, metrics):
        metrics["custom/twice_kl"] = 2 * metrics["kl"]


def test_a_metric_a_callback_adds_reaches_the_jsonl_and_the_trackers(tmp_path):
    trainer = toy_trainer(tmp_path, iterations=2, save_every=0, report_to=["tensorboard"],
                          health_checks=False)
    trainer.callbacks.callbacks.insert(0, AddsMetric())
    trainer.train()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["custom/twice_kl"] for row in rows] == [2 * row["kl"] for row in rows]
    got = by_name(read_tensorboard(tmp_path)[0])
    assert sorted(got["custom/twice_kl"]) == [1, 2]


def test_the_tracker_settings_survive_a_yaml_round_trip(tmp_path):
    config = PPOConfig(output_dir=str(tmp_path), report_to=["tensorboard"], log_samples_every=5,
                       tracker_project="p", health_checks=False)
    config.to_yaml(tmp_path / "config.yaml")
    assert PPOConfig.from_yaml(tmp_path / "config.yaml") == config
    assert config.override(["report_to=[none]"]).report_to == ["none"]
    with pytest.raises(ConfigError, match="log_samples_every=-1"):
        PPOConfig(log_samples_every=-1)


class StopAt(Callback):
    def on_iteration_end(self, trainer, metrics):
        return metrics["iteration"] == 3


def test_a_run_stopped_early_records_the_samples_of_its_last_iteration(tmp_path):
    trainer = toy_trainer(tmp_path, iterations=6, save_every=0, log_samples_every=10,
                          health_checks=False)
    trainer.callbacks.callbacks.insert(0, StopAt())
    trainer.train()
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 3]
