"""Checkpoints (written by trainer.save(), read by trainer.resume()): exact resume
(bit-identical weights on CPU), the Trainer's state dict round trip in memory, SIGKILL at a
random moment of a run that had not finished, a kill in the middle of a save, corrupt files,
runs that write no files at all, and the refusal to mix two runs in one output_dir."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import toy_trainer
from ppolm import PPOConfig, Trainer, ValueHead
from ppolm.checkpoint.export import load_value_head
from ppolm.checkpoint.folders import COMPLETE, STATE_FILE, latest_checkpoint, load_state
from ppolm.errors import CheckpointError, ConfigError
from ppolm.observe.metrics import read_metrics

# What the iterations of two identical runs must agree on (times excluded).
COMPARED = ("score_mean", "reward_mean", "kl", "kl_coef", "policy_loss", "value_loss",
            "entropy", "approx_kl", "grad_norm", "lr")


def build(out: Path, iterations: int = 4, save_every: int = 2) -> Trainer:
    return toy_trainer(out, iterations=iterations, save_every=save_every)


def in_memory(iterations: int = 3, **overrides) -> Trainer:
    """The toy trainer with the default run settings: no output_dir, nothing saved."""
    return toy_trainer(None, **{"iterations": iterations, "output_dir": None, "save_every": 0,
                                **overrides})


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert {k: x[k] for k in COMPARED} == {k: y[k] for k in COMPARED}, x["iteration"]


def test_resume_is_bit_identical(tmp_path):
    full = build(tmp_path / "full")
    full.train()
    part = build(tmp_path / "part")
    part.config.iterations = 2
    part.train()
    resumed = build(tmp_path / "part")          # a fresh process would build the same way
    assert resumed.resume() == 2
    resumed.train()
    assert_same_weights(full.policy.state_dict(), resumed.policy.state_dict())
    assert_same_weights(full.value_head.state_dict(), resumed.value_head.state_dict())
    assert resumed.kl_ctl.value == full.kl_ctl.value
    rows = read_metrics(tmp_path / "part/metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert_same_rows(rows, read_metrics(tmp_path / "full/metrics.jsonl"))


def test_a_checkpoint_holds_the_policy_files_the_state_dict_and_the_config(tmp_path):
    t = build(tmp_path, iterations=2, save_every=2)
    t.train()
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt is not None and ckpt.name == "iter-0000002"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["policy", "value_head.safetensors", STATE_FILE, "rng-rank-0.pt", "config.yaml",
         COMPLETE])
    assert (ckpt / "policy/policy.pt").is_file()
    state = load_state(ckpt)
    # the models are their own files; the generators are the rank's own file
    assert set(state) == set(t.state_dict()) - {"rng"} | {"format", "sharded", "world_size"}
    assert set(state["engine"]) == {"optimizer"}
    assert state["iteration"] == 2 and not state["sharded"] and state["world_size"] == 1
    assert torch.equal(load_value_head(ckpt).linear.weight, t.value_head.linear.weight)
    assert PPOConfig.from_yaml(ckpt / "config.yaml") == t.config
    assert set(yaml.safe_load((ckpt / "config.yaml").read_text())) == {"algorithm", "system",
                                                                        "run"}
    # an explicit path works without output_dir too, and resume() reads it back
    other = in_memory(iterations=2)
    assert other.save(tmp_path / "explicit") == tmp_path / "explicit"
    again = in_memory(iterations=2)
    assert again.resume(tmp_path / "explicit") == 0
    assert_same_weights(again.policy.state_dict(), other.policy.state_dict())


@pytest.mark.parametrize("engine", ["plain", "fast_cpu"])
def test_state_dict_round_trip_in_memory(engine):
    # (stopping after 2 of 3 iterations by lowering config.iterations: no weight average here,
    # whose window follows config.iterations; test_averaging resumes inside it)
    first = in_memory(iterations=3, engine=engine)
    first.config.iterations = 2
    first.train()
    second = in_memory(iterations=3, engine=engine)
    assert not same_weights(first.policy.state_dict(), second.policy.state_dict())
    # A state dict holds the trainer's live tensors (as torch's do): copy it to hand it on.
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    assert second.iteration == 2 and second.kl_ctl.value == first.kl_ctl.value
    assert_same_weights(first.policy.state_dict(), second.policy.state_dict())
    first.config.iterations = second.config.iterations = 3
    a = first.train()[-1]                        # one more iteration each
    b = second.train()[-1]
    assert a["iteration"] == b["iteration"] == 3
    assert_same_rows([a], [b])
    assert_same_weights(first.policy.state_dict(), second.policy.state_dict())
    assert_same_weights(first.value_head.state_dict(), second.value_head.state_dict())
    assert first.kl_ctl.value == second.kl_ctl.value


def test_state_dict_round_trip_without_a_copy():
    """load_state_dict copies what it is given: two live trainers share no tensor."""
    first = in_memory(iterations=3, engine="plain")
    first.config.iterations = 2
    first.train()
    second = in_memory(iterations=3, engine="plain")
    second.load_state_dict(first.state_dict())
    first.config.iterations = second.config.iterations = 3
    first.train()
    second.train()
    assert_same_weights(first.policy.state_dict(), second.policy.state_dict())


def test_default_config_trains_twice_in_one_process_and_writes_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert PPOConfig().output_dir is None
    first = in_memory(iterations=2)
    h1 = first.train()
    second = in_memory(iterations=2)               # the same run again: not refused
    h2 = second.train()
    assert len(h1) == len(h2) == 2
    assert_same_rows(h1, h2)
    assert list(tmp_path.iterdir()) == []          # no metrics, no checkpoints, nothing
    with pytest.raises(ConfigError, match="needs a path, or an output_dir"):
        first.save()
    with pytest.raises(ConfigError, match="needs a path, or an output_dir"):
        first.resume()
    assert list(tmp_path.iterdir()) == []


SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from test_checkpoint import build
from pathlib import Path
import ppolm.checkpoint.folders as ck
kill_at = os.environ.get("KILL_AT")
if kill_at:
    real = getattr(ck, kill_at)
    def crash(*a, **k):
        # die in the middle of a save, after the first checkpoint is safely written
        if ck.latest_checkpoint(Path(sys.argv[1]) / "checkpoints") is not None:
            os.kill(os.getpid(), 9)
        return real(*a, **k)
    setattr(ck, kill_at, crash)
t = build(Path(sys.argv[1]), iterations=int(sys.argv[2]), save_every=1)
if sys.argv[3] == "resume":
    t.resume()
t.train()
"""


def run_script(tmp_path: Path, out: Path, iterations: int, mode: str, env=None):
    script = tmp_path / "run_train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    return subprocess.Popen([sys.executable, str(script), str(out), str(iterations), mode],
                            env={**os.environ, **(env or {})})


def metric_rows(path: Path) -> list[dict]:
    """The complete lines of a metrics file being written."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def test_sigkill_at_a_random_moment_then_resume(tmp_path):
    iterations = 6
    ref = build(tmp_path / "ref", iterations=iterations, save_every=1)
    ref.train()
    out = tmp_path / "killed"
    # A random moment: after a random iteration k (1..iterations-2, so at least two remain)
    # has its checkpoint, a random part of one iteration's time (measured in the killed run).
    rng = random.Random()
    k = rng.randint(1, iterations - 2)
    share = rng.uniform(0.0, 1.0)
    proc = run_script(tmp_path, out, iterations, "fresh")
    deadline = time.time() + 300

    def saved() -> int:
        newest = latest_checkpoint(out / "checkpoints")
        return int(newest.name.split("-")[1]) if newest is not None else 0

    while saved() < k and proc.poll() is None:
        assert time.time() < deadline, "the run did not start"
        time.sleep(0.02)
    rows = metric_rows(out / "metrics.jsonl")
    time.sleep(share * min(r["time_total"] for r in rows))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    # The kill happened before the run ended: neither all metrics nor the last checkpoint.
    done = len(metric_rows(out / "metrics.jsonl"))
    newest = latest_checkpoint(out / "checkpoints")
    assert k <= done < iterations, (k, share, done)
    assert newest is not None and int(newest.name.split("-")[1]) < iterations, (k, share)
    assert run_script(tmp_path, out, iterations, "resume").wait(timeout=300) == 0
    final = latest_checkpoint(out / "checkpoints")
    assert final is not None and final.name == f"iter-{iterations:07d}"
    got = torch.load(final / "policy/policy.pt", weights_only=True)["state_dict"]
    assert_same_weights(ref.policy.state_dict(), got)
    # every iteration logged once, as the uninterrupted run logged it
    assert_same_rows(read_metrics(out / "metrics.jsonl"), ref.history)


@pytest.mark.parametrize("kill_at", ["_fsync_tree", "save_state"])
def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, kill_at):
    out = tmp_path / "out"
    proc = run_script(tmp_path, out, 4, "fresh", env={"KILL_AT": kill_at})
    assert proc.wait(timeout=300) == -signal.SIGKILL
    ckpts = out / "checkpoints"
    assert any(p.name.startswith(".tmp-") for p in ckpts.iterdir()), "the save was cut short"
    good = latest_checkpoint(ckpts)
    assert good is not None and good.name == "iter-0000001"
    resumed = build(out, iterations=4, save_every=1)
    assert resumed.resume() == 1
    resumed.train()
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
    assert [r["iteration"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_corrupt_or_missing_checkpoints(tmp_path):
    t = build(tmp_path / "a", iterations=1, save_every=1)
    with pytest.raises(CheckpointError, match="No complete checkpoint"):
        t.resume()
    t.train()
    ckpt = latest_checkpoint(tmp_path / "a/checkpoints")
    assert ckpt is not None
    (ckpt / STATE_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        build(tmp_path / "a", iterations=1).resume()
    with pytest.raises(CheckpointError, match="not a complete ppolm checkpoint"):
        build(tmp_path / "a").resume(tmp_path)


def test_checkpoints_of_another_layout_or_world_are_refused_clearly(tmp_path):
    t = build(tmp_path, iterations=1, save_every=1)
    t.train()
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    state = load_state(ckpt)
    # a sharded checkpoint (torchrun) resumed in one process
    torch.save({**state, "sharded": True, "world_size": 2}, ckpt / STATE_FILE)
    with pytest.raises(CheckpointError, match="shards of 2 ranks.*export_policy"):
        build(tmp_path, iterations=1).resume()
    # an earlier version's layout (value head and generators inside trainer_state.pt)
    old = {k: v for k, v in state.items() if k not in ("format", "sharded", "world_size")}
    torch.save(old, ckpt / STATE_FILE)
    with pytest.raises(CheckpointError, match="earlier version of ppolm"):
        build(tmp_path, iterations=1).resume()


def test_a_value_head_pt_of_an_earlier_version_is_still_read(tmp_path):
    """(export_policy wrote value_head.pt, the head's state dict, before it wrote
    value_head.safetensors as save_model does)."""
    head = ValueHead(8, init_std=0.5)
    torch.save(head.state_dict(), tmp_path / "value_head.pt")
    assert torch.equal(load_value_head(tmp_path).linear.weight, head.linear.weight)
    (tmp_path / "value_head.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="Cannot read the value head"):
        load_value_head(tmp_path)


def test_corrupt_gguf_file_is_a_checkpoint_error(tmp_path):
    pytest.importorskip("gguf")
    from ppolm.policies.pretrained import load_gguf

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00\xff" * 64)
    with pytest.raises(CheckpointError, match="broken.gguf"):
        load_gguf(bad, cache_dir=tmp_path / "cache")


def test_new_run_refuses_an_output_dir_with_an_earlier_run(tmp_path):
    first = build(tmp_path, iterations=2)
    first.train()
    old = latest_checkpoint(tmp_path / "checkpoints")
    again = build(tmp_path, iterations=2)
    with pytest.raises(ConfigError) as err:
        again.train()
    msg = str(err.value)
    assert str(tmp_path) in msg and old.name in msg and "--resume" in msg and "overwrite" in msg
    assert latest_checkpoint(tmp_path / "checkpoints") == old      # nothing touched
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2

    over = build(tmp_path, iterations=1)
    over.config.overwrite = True
    over.train()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1]                   # only the new run's line
    assert latest_checkpoint(tmp_path / "checkpoints").name == "iter-0000001"
    assert not (tmp_path / "checkpoints" / old.name).exists()


def test_metrics_alone_of_an_earlier_run_are_refused_too(tmp_path):
    # a run killed before its first checkpoint left only metrics lines
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"iteration": 1}) + "\n")
    with pytest.raises(ConfigError, match="metrics in metrics.jsonl"):
        build(tmp_path, iterations=1).train()
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1
