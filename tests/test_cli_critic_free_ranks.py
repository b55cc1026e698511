"""A critic-free run from the command line on 2 ranks under torchrun (gloo on the CPU): the
run spec builds no value head for such an estimator, so the run starts and every rank agrees."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]


# grpo in the default suite; the other critic-free estimators (the same code path, another
# advantage function) with the slow tests.
ESTIMATORS = ["grpo", *(pytest.param(e, marks=pytest.mark.slow)
                        for e in ("dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"))]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_critic_free_on_two_ranks_from_the_command_line(tmp_path, estimator):
    out = tmp_path / "run"
    done = subprocess.run(
        [*TORCHRUN, "2", "-m", "ppolm", "train", f"output_dir={out}", "progress=false",
         "iterations=2", "batch_size=8", "minibatch_size=4", "ppo_epochs=1",
         "samples_per_prompt=4", f"advantage_estimator={estimator}", "model.hidden_size=16",
         "model.n_layers=1"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-6000:]
    assert "on 2 ranks (ddp)" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all("explained_variance" not in r or r["explained_variance"] is None for r in rows)
    saved = yaml.safe_load((out / "run.yaml").read_text())
    assert saved["ppo"]["advantage_estimator"] == estimator and saved["model"]["value"] == "auto"
    assert (out / "checkpoints" / "iter-0000002" / "COMPLETE").is_file()
