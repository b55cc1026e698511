"""Critic-free advantage estimators for group sampling (k responses per prompt).

Layout: each prompt is sampled ``group_size`` (k) times and the B = n_groups * k episodes of a
batch are grouped contiguously: episodes ``[g*k, (g+1)*k)`` share prompt g. ``scores`` (B,) is
each response's scalar reward, ``mask`` (B, T) is 1 on response tokens (padding anywhere).
Every advantage tensor is (B, T) and 0 on padding.

A group whose rewards are all equal carries no learning signal for grpo, dr_grpo and rloo: its
advantages are exactly 0 (not merely rounding-small: with float32 scores [0.9, 0.9, 0.9] the
naive r - mean is 6e-8, which GRPO's division by std + eps would blow up to 0.05). The group
statistics below return the group's common value (mean, leave-one-out mean) and an exact 0
(std) for such groups, so this holds by construction. ``zero_signal_groups`` finds them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ppolm.errors import DataError
from ppolm.maths.advantages import whiten
from ppolm.maths.rewards import last_token_index


def _groups(scores: Tensor, group_size: int, min_size: int = 1) -> Tensor:
    """Validate and view the scores as (n_groups, k). Integer / bool scores become floats."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < min_size:
        need = "at least 2 (the leave-one-out baseline needs the k - 1 others)" if min_size > 1 \
            else "a positive int"
        raise DataError(f"group_size must be {need}; got {group_size!r}.")
    if scores.dim() != 1:
        raise DataError(f"scores must be 1-D (B,), one per response; got shape "
                        f"{tuple(scores.shape)}.")
    B = scores.shape[0]
    if B == 0 or B % group_size:
        raise DataError(f"the batch of {B} scores is not a whole number of groups of "
                        f"group_size={group_size}: B must be n_prompts * group_size, with each "
                        "prompt's responses contiguous.")
    if not scores.is_floating_point():
        scores = scores.to(torch.get_default_dtype())
    return scores.view(B // group_size, group_size)


def _check_mask(mask: Tensor, B: int, what: str = "scores") -> None:
    if mask.dim() != 2 or mask.shape[0] != B:
        raise DataError(f"mask must be (B, T) with B = {B} rows (one per {what} row); got "
                        f"shape {tuple(mask.shape)}.")


def _equal(groups: Tensor) -> Tensor:
    """(n_groups, k) -> (n_groups, 1) bool: every reward of the group is the same."""
    return (groups.amax(1, keepdim=True) == groups.amin(1, keepdim=True))


def _broadcast(per_seq: Tensor, mask: Tensor) -> Tensor:
    """(B,) -> (B, T): the same value on every response token, 0 on padding."""
    return per_seq[:, None] * mask.to(per_seq.dtype)


def zero_signal_groups(scores: Tensor, group_size: int) -> Tensor:
    """Groups whose rewards are all equal (incl. every group of size 1): for grpo, dr_grpo and
    rloo their advantages are exactly 0, so they add nothing but tokens to the batch (DAPO's
    dynamic sampling drops them). Shapes: scores (B,) -> (n_groups,) bool."""
    return _equal(_groups(scores, group_size)).squeeze(1)


def zero_signal_share(scores: Tensor, group_size: int) -> float:
    """The share of the batch's groups with no signal (``zero_signal_groups``), in [0, 1]."""
    return float(zero_signal_groups(scores, group_size).float().mean())


def group_mean_baseline(scores: Tensor, group_size: int) -> Tensor:
    """Each episode's group mean, (1/k) sum_j r_j over its group (exactly the common value
    when the group's rewards are all equal). Shapes: scores (B,) -> (B,)."""
    g = _groups(scores, group_size)                                   # (G, k)
    mean = torch.where(_equal(g), g[:, :1], g.mean(1, keepdim=True))  # (G, 1)
    return mean.expand_as(g).reshape(-1)


def group_std(scores: Tensor, group_size: int) -> Tensor:
    """Each episode's group standard deviation, UNBIASED (divides by k - 1), as torch.std's
    default and as DeepSeekMath's GRPO is implemented in veRL, TRL and OpenRLHF.

    Exactly 0 for a group whose rewards are all equal, and for groups of size 1 (where the
    unbiased estimate is undefined; veRL instead uses mean 0, std 1 there, i.e. the raw score as
    the advantage; here such a group simply has no signal). Shapes: scores (B,) -> (B,).
    """
    g = _groups(scores, group_size)                                   # (G, k)
    if group_size == 1:
        return torch.zeros_like(scores, dtype=g.dtype)
    std = torch.where(_equal(g), torch.zeros_like(g[:, :1]), g.std(1, keepdim=True))
    return std.expand_as(g).reshape(-1)


def leave_one_out_baseline(scores: Tensor, group_size: int) -> Tensor:
    """Each episode's mean of the OTHER k - 1 rewards of its group, (sum_j r_j - r_i) / (k - 1)
    (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"). Needs k >= 2.
    Shapes: scores (B,) -> (B,)."""
    g = _groups(scores, group_size, min_size=2)                       # (G, k)
    loo = (g.sum(1, keepdim=True) - g) / (group_size - 1)
    return torch.where(_equal(g), g, loo).reshape(-1)


def grpo_advantages(scores: Tensor, mask: Tensor, group_size: int, eps: float = 1e-6
                    ) -> Tensor:
    """GRPO with outcome supervision (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300,
    sec. 4.1.2 "Outcome Supervision RL with GRPO"; the A_{i,t} of the GRPO objective, eq. 3):

        A_{i,t} = (r_i - mean(r_group)) / (std(r_group) + eps)     for every token t of o_i

    std unbiased (``group_std``); eps added to the std as veRL does (1e-6 there too). A group
    with std 0 (all rewards equal) gets exactly 0, even with eps = 0.
    Shapes: scores (B,), mask (B, T) -> advantages (B, T), 0 on padding.
    """
    _check_mask(mask, scores.shape[0])
    mean, std = group_mean_baseline(scores, group_size), group_std(scores, group_size)
    centred = scores.to(mean.dtype) - mean                                   # (B,)
    adv = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return _broadcast(adv, mask)


def dr_grpo_advantages(scores: Tensor, mask: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
    Perspective", arXiv 2503.20783, Fig. 1 and sec. 3.2 "Dr. GRPO"): GRPO's advantage without
    the division by the group std (which up-weights questions that are too easy or too hard),
    on every token:

        A_{i,t} = r_i - mean(r_group)

    Its other change, no 1/|o_i| per-response length normalisation, is the loss aggregation
    "seq-mean-token-sum-norm" (``ppolm.maths.aggregation``).
    Shapes: scores (B,), mask (B, T) -> advantages (B, T), 0 on padding.
    """
    _check_mask(mask, scores.shape[0])
    mean = group_mean_baseline(scores, group_size)
    return _broadcast(scores.to(mean.dtype) - mean, mask)


def rloo_advantages(scores: Tensor, mask: Tensor, group_size: int) -> Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE
    Style Optimization for Learning from Human Feedback in LLMs", arXiv 2402.14740, the RLOO
    estimator of sec. 3, after Kool et al. 2019): the baseline of each response is the mean of
    the other k - 1 of its group, so it does not depend on the response itself and the
    estimate stays unbiased:

        A_{i,t} = r_i - 1/(k-1) sum_{j != i} r_j   ( = k/(k-1) * (r_i - mean(r_group)) )

    Needs k >= 2. Shapes: scores (B,), mask (B, T) -> advantages (B, T), 0 on padding.
    """
    _check_mask(mask, scores.shape[0])
    baseline = leave_one_out_baseline(scores, group_size)
    return _broadcast(scores.to(baseline.dtype) - baseline, mask)


def returns_to_go(rewards: Tensor, mask: Tensor) -> Tensor:
    """Undiscounted (gamma = 1) returns: R_t = sum of the rewards of the row's valid tokens
    t' >= t. Rewards on padding are ignored; padding gets 0.
    Shapes: rewards, mask (B, T) -> (B, T)."""
    if rewards.dim() != 2 or rewards.shape != mask.shape:
        raise DataError(f"rewards and mask must share one (B, T) shape; got "
                        f"{tuple(rewards.shape)} and {tuple(mask.shape)}.")
    m = mask.to(rewards.dtype)
    return (rewards * m).flip(1).cumsum(1).flip(1) * m


def reinforce_pp_advantages(rewards: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large
    Language Models", arXiv 2501.03262, as implemented in OpenRLHF): no critic; the per-token
    rewards hold the score at the last token and -kl_coef * KL_t on every token (as
    ``ppolm.maths.rewards.token_rewards`` makes them), the returns are their gamma = 1 sums to
    go, and the advantages are the returns whitened over ALL the batch's valid tokens:

        R_t = sum_{t' >= t} r_t'          A_t = (R_t - mean(R)) / std(R)    (``whiten``)

    Whitening over the batch (not the micro-batch, not the rank) is what makes it "++": the
    statistics must be the global ones. Shapes: rewards, mask (B, T) -> advantages (B, T),
    returns (B, T), 0 on padding.
    """
    returns = returns_to_go(rewards, mask)
    return whiten(returns, mask.to(returns.dtype)), returns


def reinforce_pp_baseline_advantages(rewards: Tensor, scores: Tensor, mask: Tensor,
                                     group_size: int) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline (Hu 2025, REINFORCE++, the group-baseline variant of OpenRLHF's
    ``reinforce_baseline``): the group mean of the scores is subtracted first, then it is
    REINFORCE++ (``reinforce_pp_advantages``).

    ``rewards`` (B, T) already holds each row's score at its last valid token plus the
    per-token KL terms (``token_rewards(scores, mask, logprobs=..., ref_logprobs=...,
    kl_coef=...)``, without reward whitening). Exactly:

        r'_t = r_t - mean(scores of the row's group) * [t == the row's last valid token]
        R_t  = sum_{t' >= t} r'_t'   (= the REINFORCE++ return minus the group mean, on every
                                      valid token, since the last token is in every sum)
        A    = whiten(R) over the batch's valid tokens

    The score itself is not re-read from ``rewards``: only its group mean comes from
    ``scores``. A row with no valid token stays all 0. Shapes: rewards (B, T), scores (B,),
    mask (B, T) -> advantages (B, T), returns (B, T), 0 on padding.
    """
    _check_mask(mask, scores.shape[0], "scores")
    if rewards.shape != mask.shape:
        raise DataError(f"rewards and mask must share one (B, T) shape; got "
                        f"{tuple(rewards.shape)} and {tuple(mask.shape)}.")
    baseline = group_mean_baseline(scores, group_size).to(rewards.dtype)     # (B,)
    last = last_token_index(mask)                                            # (B,)
    centred = rewards.scatter_add(1, last[:, None], -baseline[:, None])      # (B, T)
    return reinforce_pp_advantages(centred, mask)
