"""The Bradley-Terry loss, its margin and centring terms and its diagnostics, against values
computed by hand."""

from __future__ import annotations

import pytest
import torch

from ppolm.maths.preference import (
    bradley_terry_loss,
    mean_margin,
    pair_accuracy,
    score_statistics,
)

# Two pairs: the first ranked right by 1, the second wrong by 1.
CHOSEN = [2.0, 0.0]
REJECTED = [1.0, 1.0]


def scores() -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(CHOSEN, dtype=torch.float64, requires_grad=True),
            torch.tensor(REJECTED, dtype=torch.float64, requires_grad=True))


def test_the_loss_is_the_mean_negative_log_likelihood_of_the_pairs():
    c, r = scores()
    out = bradley_terry_loss(c, r)
    # (log(1 + e^-1) + log(1 + e^1)) / 2
    assert out.loss.item() == pytest.approx(0.8132616875182228, abs=1e-12)
    assert out.bradley_terry.item() == out.loss.item() and out.centering.item() == 0.0
    out.loss.backward()
    # d/dc_i = -sigmoid(-(c_i - r_i)) / B;  d/dr_i the opposite
    expect = torch.tensor([-0.13447071068499755, -0.36552928931500245], dtype=torch.float64)
    assert c.grad is not None and r.grad is not None
    assert torch.allclose(c.grad, expect, atol=1e-12)
    assert torch.allclose(r.grad, -expect, atol=1e-12)


def test_the_margin_is_taken_off_the_difference():
    c, r = scores()
    out = bradley_terry_loss(c, r, margin=torch.tensor([0.5, 0.5], dtype=torch.float64))
    # differences 0.5 and -1.5: (log(1 + e^-0.5) + log(1 + e^1.5)) / 2
    assert out.loss.item() == pytest.approx(1.0877451310814297, abs=1e-12)
    out.loss.backward()
    sig = torch.sigmoid(-torch.tensor([0.5, -1.5], dtype=torch.float64))
    assert c.grad is not None and torch.allclose(c.grad, -sig / 2, atol=1e-12)


def test_the_centring_term_is_c_times_the_mean_squared_sum():
    c, r = scores()
    out = bradley_terry_loss(c, r, center_rewards_coefficient=0.1)
    # sums 3 and 1: 0.1 * (9 + 1) / 2 = 0.5
    assert out.centering.item() == pytest.approx(0.5, abs=1e-12)
    assert out.loss.item() == pytest.approx(0.8132616875182228 + 0.5, abs=1e-12)
    out.loss.backward()
    # the centring gradient 2 c (c_i + r_i) / B = 0.3 and 0.1, on chosen and rejected alike
    bt = torch.tensor([-0.13447071068499755, -0.36552928931500245], dtype=torch.float64)
    assert c.grad is not None and r.grad is not None
    assert torch.allclose(c.grad, bt + torch.tensor([0.3, 0.1], dtype=torch.float64))
    assert torch.allclose(r.grad, -bt + torch.tensor([0.3, 0.1], dtype=torch.float64))


def test_the_loss_stays_finite_for_large_differences():
    c = torch.tensor([1000.0, -1000.0])
    r = torch.zeros(2)
    out = bradley_terry_loss(c, r)
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(500.0)


def test_accuracy_counts_ties_as_wrong_and_margin_is_the_mean_difference():
    c = torch.tensor([2.0, 0.0, 1.0, 3.0])
    r = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert pair_accuracy(c, r).item() == 0.5
    assert mean_margin(c, r).item() == pytest.approx((1 - 1 + 0 + 3) / 4)


def test_normalisation_statistics():
    mean, std = score_statistics(torch.tensor([1.0, 3.0]))
    assert (mean, std) == (2.0, 1.0)
    assert score_statistics(torch.tensor([4.0, 4.0])) == (4.0, 1.0)


def test_wrong_shapes_are_refused():
    with pytest.raises(ValueError, match="both be"):
        bradley_terry_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), margin=torch.zeros(3))
