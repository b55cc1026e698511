"""Tail averaging (``average_last``) under torchrun: each rank averages its own shards of
FSDP2's parameters, the average ends in the policy as in one process, and it goes into the
sharded checkpoint so that a resume inside the tail ends on bitwise the same weights.
(tests/distributed/average_worker.py runs the processes.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_distributed import launch, max_diff

WORKER = Path(__file__).parent / "distributed" / "average_worker.py"


def average_runs(out: Path, strategy: str) -> tuple[dict, dict]:
    """What the worker wrote for one process and for 2 ranks under ``strategy``."""
    for folder, nproc in ((out / "one", None), (out / "two", 2)):
        done = launch(None, folder, nproc, worker=WORKER, STRATEGIES=strategy)
        assert done.returncode == 0, done.stderr[-6000:]
    return (torch.load(out / "one" / "single.pt", weights_only=False),
            torch.load(out / "two" / f"{strategy}.pt", weights_only=False))


def check_average(one: dict, two: dict) -> None:
    assert two["world_size"] == 2
    # the final policy (the average of the last 3 iterates) is one process's
    assert max_diff(one["final"], two["final"]) < 1e-5
    # ...and not the last iterate, which is one process's last iterate
    assert max_diff(one["last_iterate"], two["last_iterate"]) < 1e-5
    final = {k: two["final"][f"policy.{k}"] for k in two["last_iterate"]}
    assert max_diff(final, two["last_iterate"]) > 1e-3
    # a fresh Trainer resumed at iteration 2 (the first of the tail: the average held one
    # iterate) ends on bitwise the weights of the uninterrupted run
    assert two["resumed_at"] == 2 and two["count_at_resume"] == 1
    assert max_diff(two["final"], two["resumed"]) == 0.0


def test_fsdp_averages_each_ranks_shards_into_the_weights_of_one_process(tmp_path):
    one, two = average_runs(tmp_path, "fsdp")
    check_average(one, two)
    # the average's shards are in DCP's files, rank 0's trainer_state.pt names them only
    from ppolm.checkpoint.folders import load_state
    from ppolm.checkpoint.sharded import read_metadata

    checkpoint = tmp_path / "two" / "fsdp" / "checkpoints" / "iter-0000002"
    mean = load_state(checkpoint)["average"]["mean"]
    assert mean and not any(isinstance(v, torch.Tensor) for v in mean.values())
    saved = read_metadata(checkpoint).state_dict_metadata
    assert {f"rest.average.mean.{k}" for k in mean} <= set(saved)


@pytest.mark.slow
def test_ddp_averages_into_the_weights_of_one_process(tmp_path):
    check_average(*average_runs(tmp_path, "ddp"))
