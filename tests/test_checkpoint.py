"""Checkpoints: exact resume (bit-identical weights on CPU), SIGKILL at a random moment,
a kill in the middle of a save, corrupt files."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import toy_trainer
from ppolm import Trainer
from ppolm.training.checkpoint import latest_checkpoint
from ppolm.errors import CheckpointError, ConfigError
from ppolm.training.metrics import read_metrics


def build(out: Path, iterations: int = 4, save_every: int = 2) -> Trainer:
    return toy_trainer(out, iterations=iterations, save_every=save_every)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


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


SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from test_checkpoint import build
from pathlib import Path
import ppolm.training.checkpoint as ck
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


def test_sigkill_at_a_random_moment_then_resume(tmp_path):
    iterations = 6
    ref = build(tmp_path / "ref", iterations=iterations, save_every=1)
    ref.train()
    out = tmp_path / "killed"
    proc = run_script(tmp_path, out, iterations, "fresh")
    deadline = time.time() + 120
    while latest_checkpoint(out / "checkpoints") is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random().uniform(0.0, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(out / "checkpoints") is not None
    assert run_script(tmp_path, out, iterations, "resume").wait(timeout=300) == 0
    final = latest_checkpoint(out / "checkpoints")
    assert final is not None and final.name == f"iter-{iterations:07d}"
    got = torch.load(final / "policy/policy.pt", weights_only=True)["state_dict"]
    assert_same_weights(ref.policy.state_dict(), got)


@pytest.mark.parametrize("kill_at", ["_fsync_tree", "_trainer_state"])
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


def test_corrupt_or_missing_checkpoints(tmp_path):
    t = build(tmp_path / "a", iterations=1, save_every=1)
    with pytest.raises(CheckpointError, match="No complete checkpoint"):
        t.resume()
    t.train()
    ckpt = latest_checkpoint(tmp_path / "a/checkpoints")
    assert ckpt is not None
    (ckpt / "trainer_state.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        build(tmp_path / "a", iterations=1).resume()
    with pytest.raises(CheckpointError, match="not a complete ppolm checkpoint"):
        build(tmp_path / "a").resume(tmp_path)


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
