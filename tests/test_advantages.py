"""GAE and masked statistics against plain-Python references and hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from ppolm import compute_gae, masked_mean, masked_var, whiten
from ppolm.errors import DataError


def gae_loop(rewards, values, mask, gamma, lam):
    """Reference: per row, over its real tokens only, V = 0 after the last one."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        real = [t for t in range(T) if mask[b][t]]
        gae, next_v = 0.0, 0.0
        for t in reversed(real):
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            gae = delta + gamma * lam * gae
            adv[b][t] = gae
            next_v = values[b][t]
    ret = [[(adv[b][t] + values[b][t]) if mask[b][t] else 0.0 for t in range(T)]
           for b in range(B)]
    return adv, ret


def ragged_mask(lengths, T, side):
    mask = torch.zeros(len(lengths), T)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, T - n:] = 1
    return mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.5, 0.0)])
def test_gae_matches_python_loop(side, gamma, lam):
    g = torch.Generator().manual_seed(1)
    B, T = 7, 11
    lengths = [1, 11, 5, 3, 8, 10, 2]
    mask = ragged_mask(lengths, T, side)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64) * mask
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv, ret = compute_gae(rewards, values, mask.double(), gamma, lam)
    ref_adv, ref_ret = gae_loop(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    assert torch.allclose(adv, torch.tensor(ref_adv, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ret, torch.tensor(ref_ret, dtype=torch.float64), atol=1e-12)
    assert (adv[mask == 0] == 0).all()


def test_gae_left_and_right_padding_agree():
    g = torch.Generator().manual_seed(2)
    lengths, T = [4, 6, 2], 6
    r = torch.randn(3, T, generator=g)
    v = torch.randn(3, T, generator=g)
    right = ragged_mask(lengths, T, "right")
    a_r, _ = compute_gae(r * right, v, right, 1.0, 0.95)
    # Move each row's real tokens to the end (left padding) and compare per token.
    left = ragged_mask(lengths, T, "left")
    r_l, v_l = torch.zeros_like(r), torch.zeros_like(v)
    for b, n in enumerate(lengths):
        r_l[b, T - n:], v_l[b, T - n:] = r[b, :n], v[b, :n]
    a_l, _ = compute_gae(r_l, v_l, left, 1.0, 0.95)
    for b, n in enumerate(lengths):
        assert torch.allclose(a_r[b, :n], a_l[b, T - n:], atol=1e-6)


def test_gamma_lam_one_gives_reward_to_go():
    r = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.5, -1.0, 0.0, 0.0]])
    v = torch.tensor([[0.3, -0.2, 0.7, 9.0], [1.0, 2.0, 9.0, 9.0]])
    m = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = compute_gae(r, v, m, gamma=1.0, lam=1.0)
    assert torch.allclose(ret, torch.tensor([[6.0, 5.0, 3.0, 0.0], [-0.5, -1.0, 0.0, 0.0]]))
    assert torch.allclose(adv, (ret - v) * m)


def test_gae_hand_computed():
    # T = 2, gamma = 0.5, lam = 0.5: delta_1 = r1 - v1 = 1 - 0.5 = 0.5 (episode ends),
    # delta_0 = r0 + 0.5 * v1 - v0 = 0 + 0.25 - 1 = -0.75, A_0 = -0.75 + 0.25 * 0.5 = -0.625.
    adv, ret = compute_gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.5]]),
                           torch.ones(1, 2), gamma=0.5, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[-0.625, 0.5]]))
    assert torch.allclose(ret, torch.tensor([[0.375, 1.0]]))


def test_gae_refuses_mismatched_shapes():
    with pytest.raises(DataError, match="one \\(B, T\\) shape"):
        compute_gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_masked_statistics_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, -50.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(x, m) == pytest.approx(2.0)
    assert masked_var(x, m) == pytest.approx(1.0)          # unbiased var of 1, 2, 3
    w = whiten(x, m)
    assert w[m.bool()].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    assert (w[~m.bool()] == 0).all()
    keep = whiten(x, m, shift_mean=False)
    assert keep[m.bool()].tolist() == pytest.approx([1.0, 2.0, 3.0], abs=1e-6)
