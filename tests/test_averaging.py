"""Tail averaging: the running mean is the arithmetic mean, the final policy is the mean of the
last N iterates (which training itself never sees), and a resume in the middle of the tail
continues the same average."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import toy_trainer
from ppolm import PPOConfig, Trainer
from ppolm.errors import ConfigError
from ppolm.training.averaging import TailAverage, swap_weights, trainable_weights


def build(out: Path, average_last: int, iterations: int = 5) -> Trainer:
    return toy_trainer(out, iterations=iterations, average_last=average_last, save_every=1,
                       learning_rate=3e-3, lr_schedule="constant", adaptive_kl=False)


def weights_at(out: Path, iteration: int) -> dict[str, torch.Tensor]:
    """The policy's trainable weights in the checkpoint of ``iteration`` (read by a Trainer of
    the same settings: a resume refuses another average_last)."""
    t = build(out.parent / "loader", average_last=3)
    t.resume(out / "checkpoints" / f"iter-{iteration:07d}")
    return {k: v.detach().clone() for k, v in trainable_weights(t.policy).items()}


def test_running_mean_is_the_mean():
    torch.manual_seed(1)
    lin = nn.Linear(3, 2)
    lin.bias.requires_grad_(False)              # frozen: not averaged
    avg, seen = TailAverage(), []
    for _ in range(4):
        with torch.no_grad():
            lin.weight.normal_()
        seen.append(lin.weight.detach().clone())
        avg.add(lin)
    assert set(avg.mean) == {"weight"} and avg.count == 4
    torch.testing.assert_close(avg.mean["weight"], torch.stack(seen).mean(0))


def test_swap_weights_round_trip_and_mismatch():
    lin = nn.Linear(3, 2)
    before = {k: v.detach().clone() for k, v in trainable_weights(lin).items()}
    new = {k: torch.full_like(v, 7.0) for k, v in before.items()}
    old = swap_weights(lin, new)
    assert all(torch.equal(old[k], before[k]) for k in before)
    assert torch.equal(lin.weight, new["weight"])
    swap_weights(lin, old)
    assert all(torch.equal(v, before[k]) for k, v in trainable_weights(lin).items())
    with pytest.raises(ValueError, match="missing"):
        swap_weights(lin, {"weight": new["weight"]})


def test_final_policy_is_the_mean_of_the_last_iterates(tmp_path):
    avg = build(tmp_path / "avg", average_last=3)
    avg.train()
    plain = build(tmp_path / "plain", average_last=0)
    plain.train()
    # Training never sees the average: the last iterate is the plain run's final policy.
    assert avg.last_iterate is not None and plain.last_iterate is None
    for k, v in trainable_weights(plain.policy).items():
        assert torch.equal(avg.last_iterate[k], v), k
    # The final policy (and its checkpoint) is the mean of iterates 3, 4 and 5.
    w3, w4 = weights_at(tmp_path / "avg", 3), weights_at(tmp_path / "avg", 4)
    saved = weights_at(tmp_path / "avg", 5)
    for k, v in trainable_weights(avg.policy).items():
        mean = (w3[k] + w4[k] + avg.last_iterate[k]) / 3
        torch.testing.assert_close(v, mean, rtol=1e-6, atol=1e-7)
        assert torch.equal(saved[k], v)
        assert not torch.equal(v, avg.last_iterate[k])      # the average did change it


def test_resume_inside_the_tail_continues_the_average(tmp_path):
    full = build(tmp_path / "full", average_last=3)
    full.train()
    resumed = build(tmp_path / "full", average_last=3)
    assert resumed.resume(tmp_path / "full/checkpoints/iter-0000004") == 4
    assert resumed.average.count == 2
    resumed.config.overwrite = False
    resumed.train()
    for k, v in trainable_weights(full.policy).items():
        assert torch.equal(trainable_weights(resumed.policy)[k], v), k


@pytest.mark.parametrize("n", [-1, 6])
def test_average_last_out_of_range(n):
    with pytest.raises(ConfigError, match="average_last"):
        PPOConfig(iterations=5, average_last=n)
