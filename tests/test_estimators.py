"""Critic-free estimators against hand-computed values and plain-Python loop references."""

from __future__ import annotations

import math

import pytest
import torch

from ppolm.errors import DataError
from ppolm.maths.estimators import (
    dr_grpo_advantages,
    group_mean_baseline,
    group_std,
    grpo_advantages,
    leave_one_out_baseline,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    returns_to_go,
    rloo_advantages,
    zero_signal_groups,
    zero_signal_share,
)
from ppolm.maths.rewards import token_rewards

F64 = torch.float64


def right_mask(lengths, T):
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=F64)


def per_token(values, mask):
    """Expected (B, T): values[b] on each valid token of row b, 0 elsewhere (by loops)."""
    return torch.tensor([[values[b] if mask[b][t] else 0.0 for t in range(mask.shape[1])]
                         for b in range(mask.shape[0])], dtype=F64)


# ---- loop references ---------------------------------------------------------------------

def loop_stats(scores, k):
    """Per episode: group mean, unbiased group std, leave-one-out mean (plain Python)."""
    s = [float(x) for x in scores]
    means, stds, loos = [], [], []
    for i in range(len(s)):
        g0 = (i // k) * k
        group = s[g0:g0 + k]
        mean = sum(group) / k
        means.append(mean)
        stds.append(math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1)) if k > 1 else 0.0)
        others = [group[j] for j in range(k) if g0 + j != i]
        loos.append(sum(others) / len(others) if others else float("nan"))
    return means, stds, loos


def loop_returns(rewards, mask):
    B, T = rewards.shape
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        running = 0.0
        for t in reversed(range(T)):
            if mask[b][t]:
                running += float(rewards[b][t])
                out[b][t] = running
    return torch.tensor(out, dtype=F64)


def loop_whiten(x, mask):
    vals = [float(x[b][t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b][t]]
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    return torch.tensor([[(float(x[b][t]) - mean) / math.sqrt(var + 1e-8) if mask[b][t] else 0.0
                          for t in range(x.shape[1])] for b in range(x.shape[0])], dtype=F64)


# ---- hand-computed small groups -----------------------------------------------------------

SCORES_K3 = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], dtype=F64)
MASK_K3 = right_mask([3, 1, 2, 4, 2, 3], 4)     # ragged, right padded
SCORES_K2 = torch.tensor([2.0, 0.0, 1.0, 3.0], dtype=F64)
MASK_K2 = right_mask([2, 4, 1, 3], 4)


def test_group_statistics_by_hand():
    third = 1 / 3
    assert torch.allclose(group_mean_baseline(SCORES_K3, 3),
                          torch.tensor([third] * 3 + [1.0] * 3, dtype=F64))
    # group 0: deviations 2/3, -1/3, -1/3 -> sum of squares 2/3, / (k - 1) = 1/3
    assert torch.allclose(group_std(SCORES_K3, 3),
                          torch.tensor([math.sqrt(third)] * 3 + [0.0] * 3, dtype=F64))
    assert torch.allclose(leave_one_out_baseline(SCORES_K3, 3),
                          torch.tensor([0.0, 0.5, 0.5, 1.0, 1.0, 1.0], dtype=F64))
    assert torch.allclose(group_std(SCORES_K2, 2),
                          torch.tensor([math.sqrt(2)] * 4, dtype=F64))
    assert torch.allclose(leave_one_out_baseline(SCORES_K2, 2),
                          torch.tensor([0.0, 2.0, 3.0, 1.0], dtype=F64))


def test_grpo_by_hand_k3():
    a = 1 / math.sqrt(1 / 3)          # (2/3) / sqrt(1/3) = 1.1547..., (1/3) / sqrt(1/3) = 0.577
    adv = grpo_advantages(SCORES_K3, MASK_K3, 3, eps=0.0)
    assert torch.allclose(adv, per_token([2 / 3 * a, -1 / 3 * a, -1 / 3 * a, 0, 0, 0], MASK_K3))
    assert adv[0, :3].tolist() == pytest.approx([1.1547005] * 3)
    assert adv[0, 3] == 0 and adv[1, 1:].eq(0).all()             # padding


def test_grpo_eps_is_added_to_the_std():
    adv = grpo_advantages(SCORES_K2, MASK_K2, 2, eps=0.5)
    s = math.sqrt(2) + 0.5
    assert torch.allclose(adv, per_token([1 / s, -1 / s, -1 / s, 1 / s], MASK_K2))


def test_dr_grpo_and_rloo_by_hand():
    assert torch.allclose(dr_grpo_advantages(SCORES_K3, MASK_K3, 3),
                          per_token([2 / 3, -1 / 3, -1 / 3, 0, 0, 0], MASK_K3))
    assert torch.allclose(rloo_advantages(SCORES_K3, MASK_K3, 3),
                          per_token([1.0, -0.5, -0.5, 0, 0, 0], MASK_K3))
    assert torch.allclose(dr_grpo_advantages(SCORES_K2, MASK_K2, 2),
                          per_token([1.0, -1.0, -1.0, 1.0], MASK_K2))
    assert torch.allclose(rloo_advantages(SCORES_K2, MASK_K2, 2),
                          per_token([2.0, -2.0, -2.0, 2.0], MASK_K2))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_outcome_estimators_match_loops(k):
    n_groups, T = 4, 6
    scores = torch.randn(n_groups * k, dtype=F64)
    lengths = torch.randint(1, T + 1, (n_groups * k,)).tolist()
    mask = right_mask(lengths, T)
    means, stds, loos = loop_stats(scores, k)
    s = scores.tolist()
    assert torch.allclose(grpo_advantages(scores, mask, k),
                          per_token([(s[i] - means[i]) / (stds[i] + 1e-6)
                                     for i in range(len(s))], mask))
    assert torch.allclose(dr_grpo_advantages(scores, mask, k),
                          per_token([s[i] - means[i] for i in range(len(s))], mask))
    assert torch.allclose(rloo_advantages(scores, mask, k),
                          per_token([s[i] - loos[i] for i in range(len(s))], mask))
    assert torch.allclose(group_std(scores, k), torch.tensor(stds, dtype=F64))


def test_rloo_identity_k_over_k_minus_1_times_centred():
    for k in (2, 3, 4, 8):
        scores = torch.randn(5 * k, dtype=F64)
        mask = torch.ones(5 * k, 3, dtype=F64)
        centred = scores - group_mean_baseline(scores, k)
        assert torch.allclose(rloo_advantages(scores, mask, k)[:, 0], k / (k - 1) * centred)


def test_left_padding_and_full_rows_are_fine():
    left = right_mask([3, 1, 2, 4, 2, 3], 4).flip(1)
    full = torch.ones(6, 4, dtype=F64)
    for mask in (left, full):
        adv = dr_grpo_advantages(SCORES_K3, mask, 3)
        assert torch.allclose(adv, per_token([2 / 3, -1 / 3, -1 / 3, 0, 0, 0], mask))


# ---- groups without signal ----------------------------------------------------------------

@pytest.mark.parametrize("value,k", [(0.9, 3), (0.9, 7), (0.3, 6), (0.1, 7), (1.0, 2)])
def test_equal_reward_groups_give_exactly_zero(value, k):
    # float32 0.9 * 3: the naive r - mean is ~6e-8, and GRPO's / (std + eps) makes it ~0.05
    scores = torch.cat([torch.full((k,), value), torch.arange(k, dtype=torch.float32)])
    mask = torch.ones(2 * k, 5)
    for adv in (grpo_advantages(scores, mask, k), dr_grpo_advantages(scores, mask, k),
                rloo_advantages(scores, mask, k)):
        assert torch.equal(adv[:k], torch.zeros(k, 5))
        assert adv[k:].abs().sum() > 0
    assert zero_signal_groups(scores, k).tolist() == [True, False]


def test_zero_signal_groups_and_share():
    assert zero_signal_groups(SCORES_K3, 3).tolist() == [False, True]
    assert zero_signal_share(SCORES_K3, 3) == 0.5
    assert zero_signal_groups(SCORES_K2, 2).tolist() == [False, False]
    assert zero_signal_share(SCORES_K2, 2) == 0.0
    scores = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    assert zero_signal_groups(scores, 2).tolist() == [True, True, False]
    assert zero_signal_share(scores, 2) == pytest.approx(2 / 3)
    assert zero_signal_groups(torch.tensor([0.3, 2.0]), 1).tolist() == [True, True]


def test_group_size_one_has_no_signal():
    scores, mask = torch.tensor([0.3, 2.0, -1.0]), torch.ones(3, 2)
    assert torch.equal(grpo_advantages(scores, mask, 1), torch.zeros(3, 2))
    assert torch.equal(dr_grpo_advantages(scores, mask, 1), torch.zeros(3, 2))
    assert torch.equal(group_std(scores, 1), torch.zeros(3))


def test_integer_and_bool_scores_become_floats():
    adv = dr_grpo_advantages(torch.tensor([1, 0, 0, 1, 1, 1]), torch.ones(6, 2), 3)
    assert adv.is_floating_point()
    assert torch.allclose(adv[:, 0], torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]))
    assert zero_signal_share(torch.tensor([True, True, False, True]), 2) == 0.5


# ---- REINFORCE++ --------------------------------------------------------------------------

def kl_rewards(scores, mask, seed=1):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(mask.shape, generator=g, dtype=F64)
    ref = -torch.rand(mask.shape, generator=g, dtype=F64)
    rewards = token_rewards(scores, mask, logprobs=logprobs, ref_logprobs=ref, kl_coef=0.1)
    return rewards, logprobs, ref


def test_returns_by_hand():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 7.0], [0.5, 0.0, 3.0, 3.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=F64)   # padding rewards ignored
    assert torch.allclose(returns_to_go(rewards, mask),
                          torch.tensor([[0.9, 0.8, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]], dtype=F64))


def test_reinforce_pp_matches_loops():
    mask = MASK_K3
    rewards, _, _ = kl_rewards(SCORES_K3, mask)
    rewards = rewards + (1 - mask) * 5.0                     # garbage on padding is ignored
    adv, ret = reinforce_pp_advantages(rewards, mask)
    assert torch.allclose(ret, loop_returns(rewards, mask))
    assert torch.allclose(adv, loop_whiten(ret, mask))
    n = mask.sum()
    mean = (adv * mask).sum() / n
    std = torch.sqrt(((adv - mean) ** 2 * mask).sum() / (n - 1))
    assert abs(float(mean)) < 1e-9 and float(std) == pytest.approx(1.0, abs=1e-6)
    assert adv[mask == 0].eq(0).all() and ret[mask == 0].eq(0).all()


def test_reinforce_pp_baseline_by_loops():
    mask = MASK_K3
    rewards, logprobs, ref = kl_rewards(SCORES_K3, mask)
    adv, ret = reinforce_pp_baseline_advantages(rewards, SCORES_K3, mask, 3)
    # rebuild the centred per-token rewards from their parts, row by row
    means, _, _ = loop_stats(SCORES_K3, 3)
    B, T = mask.shape
    centred = torch.zeros(B, T, dtype=F64)
    for b in range(B):
        valid = [t for t in range(T) if mask[b][t]]
        for t in valid:
            centred[b, t] = -0.1 * float(logprobs[b, t] - ref[b, t])
        centred[b, valid[-1]] += float(SCORES_K3[b]) - means[b]
    assert torch.allclose(ret, loop_returns(centred, mask))
    assert torch.allclose(adv, loop_whiten(ret, mask))
    # the baseline shifts every valid token's return by -group mean
    _, plain = reinforce_pp_advantages(rewards, mask)
    assert torch.allclose(ret, (plain - torch.tensor(means, dtype=F64)[:, None]) * mask)
    # and equals REINFORCE++ on the token rewards of the centred scores (OpenRLHF's route)
    centred_scores = SCORES_K3 - group_mean_baseline(SCORES_K3, 3)
    other = token_rewards(centred_scores, mask, logprobs=logprobs, ref_logprobs=ref, kl_coef=0.1)
    adv2, ret2 = reinforce_pp_advantages(other, mask)
    assert torch.allclose(adv, adv2) and torch.allclose(ret, ret2)


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [grpo_advantages, dr_grpo_advantages, rloo_advantages])
def test_bad_inputs(fn):
    mask = torch.ones(6, 4)
    with pytest.raises(DataError, match="1-D"):
        fn(torch.zeros(6, 1), mask, 3)
    with pytest.raises(DataError, match="whole number of groups"):
        fn(torch.zeros(6), mask, 4)
    with pytest.raises(DataError, match="whole number of groups"):
        fn(torch.zeros(0), torch.ones(0, 4), 2)
    for bad in (0, -3, 1.5, True):
        with pytest.raises(DataError, match="group_size"):
            fn(torch.zeros(6), mask, bad)
    with pytest.raises(DataError, match="mask must be"):
        fn(torch.zeros(6), torch.ones(5, 4), 3)
    with pytest.raises(DataError, match="mask must be"):
        fn(torch.zeros(6), torch.ones(6), 3)


def test_rloo_needs_two_per_group():
    with pytest.raises(DataError, match="at least 2"):
        rloo_advantages(torch.zeros(3), torch.ones(3, 2), 1)
    with pytest.raises(DataError, match="at least 2"):
        leave_one_out_baseline(torch.zeros(3), 1)


def test_reinforce_pp_bad_shapes():
    with pytest.raises(DataError, match="one \\(B, T\\) shape"):
        reinforce_pp_advantages(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(DataError, match="one \\(B, T\\) shape"):
        reinforce_pp_advantages(torch.zeros(3), torch.ones(3))
    with pytest.raises(DataError, match="mask must be"):
        reinforce_pp_baseline_advantages(torch.zeros(4, 3), torch.zeros(6), torch.ones(4, 3), 2)
    with pytest.raises(DataError, match="one \\(B, T\\) shape"):
        reinforce_pp_baseline_advantages(torch.zeros(4, 2), torch.zeros(4), torch.ones(4, 3), 2)
    with pytest.raises(DataError, match="whole number of groups"):
        reinforce_pp_baseline_advantages(torch.zeros(4, 3), torch.zeros(4), torch.ones(4, 3), 3)
