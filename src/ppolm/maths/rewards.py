"""Per-token rewards from the scores: where the score goes, reward whitening, the KL penalty."""

from __future__ import annotations

import torch
from torch import Tensor

from ppolm.maths.advantages import masked_var, whiten
from ppolm.maths.losses import kl_penalty


def last_token_index(mask: Tensor) -> Tensor:
    """The index of each row's last response token. Shapes: (B, T) -> (B,) long."""
    return (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)


def whiten_scores(scores: Tensor, token_scores: Tensor | None, mask: Tensor
                  ) -> tuple[Tensor, Tensor | None]:
    """Scores whitened over the batch, keeping their mean: ``s -> (s - mean) / std + mean``.
    Per-token increments (prefix shaping) are each divided by the std, and the shift lands on
    the last token, so each row's increments still add up to its whitened score.

    Shapes: scores (B,), token_scores (B, T) or None, mask (B, T) -> (B,), (B, T) or None."""
    ones = torch.ones_like(scores)
    whitened = whiten(scores, ones, shift_mean=False)
    if token_scores is None:
        return whitened, None
    std = torch.sqrt(masked_var(scores, ones) + 1e-8)
    token_scores = token_scores / std
    last = last_token_index(mask)
    token_scores = token_scores.scatter_add(
        1, last[:, None], (whitened - token_scores.sum(1))[:, None]) * mask
    return whitened, token_scores


def token_rewards(scores: Tensor, mask: Tensor, *, token_scores: Tensor | None = None,
                  logprobs: Tensor | None = None, ref_logprobs: Tensor | None = None,
                  kl_coef: float = 0.0, kl_estimator: str = "k1",
                  whiten_rewards: bool = False) -> Tensor:
    """The per-token rewards PPO's advantages are computed from.

    * The score sits on the last response token; with ``token_scores`` (prefix shaping) each
      token gets its increment instead (they add up to the score).
    * ``whiten_rewards``: the scores whitened over the batch first (``whiten_scores``).
    * With ``logprobs`` and ``ref_logprobs`` (the KL in the reward), every response token also
      gets ``-kl_coef * KL_t``, KL_t by ``kl_estimator`` (k1, k2 or k3) on the sampled token.

    Shapes: scores (B,), mask (B, T), token_scores / logprobs / ref_logprobs (B, T) -> (B, T),
    0 on padding.
    """
    if whiten_rewards:
        scores, token_scores = whiten_scores(scores, token_scores, mask)
    if logprobs is not None and ref_logprobs is not None:
        rewards = -kl_coef * kl_penalty(logprobs, ref_logprobs, kl_estimator) * mask
    else:
        rewards = torch.zeros_like(mask)
    if token_scores is not None:
        return rewards + token_scores * mask
    return rewards.scatter_add(1, last_token_index(mask)[:, None], scores[:, None])


def score_increments(phi: Tensor, scores: Tensor, mask: Tensor) -> Tensor:
    """Per-token rewards from prefix scores: token ``t`` gets ``phi[t + 1] - phi[t]``, with
    ``phi[0] = 0`` (the empty response) and the response's own score in place of ``phi[n]``
    (``n`` its last token + 1). They add up to ``scores`` exactly. This is potential-based
    shaping, ``F = Phi(s') - Phi(s)`` with ``Phi`` = the reward of the text so far (0 at the
    start and after the end), so the optimal policy is unchanged (Ng et al. 1999).

    Shapes: phi (B, T) from ``prefix_scores``, scores (B,), mask (B, T) -> (B, T); 0 on padding.
    """
    m = mask.to(phi.dtype)
    last = last_token_index(m)                                          # (B,)
    nxt = torch.cat([phi[:, 1:], torch.zeros_like(phi[:, :1])], 1)      # phi[t + 1]   (B, T)
    nxt = nxt.scatter(1, last[:, None], scores.to(phi.dtype)[:, None])  # the score at the end
    return (nxt - phi) * m


def turn_token_scores(scores: Tensor, turn_rewards: Tensor, mask: Tensor) -> Tensor:
    """The per-token scores of a multi-turn episode: each turn's reward where it already sits
    (its turn's last model token) plus the final score on the episode's last model token. A
    row adds up to its total reward, ``scores + turn_rewards.sum(1)``.

    Shapes: scores (B,), turn_rewards (B, T), mask (B, T) -> (B, T), 0 off the mask."""
    m = mask.to(turn_rewards.dtype)
    last = last_token_index(mask)
    return (turn_rewards * m).scatter_add(1, last[:, None], scores.to(turn_rewards.dtype)[:, None])


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0
                     ) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025), a reward term of each response by its
    length: 0 up to ``max_len - buffer`` tokens, then falling linearly to ``-factor`` at
    ``max_len`` (the longest a response can be):

        R(n) = -factor * clamp((n - (max_len - buffer)) / buffer, 0, 1)

    A response the budget cut off gets the whole ``-factor``; one that ends just inside the
    buffer a little of it, so length is discouraged before it costs the answer.
    Shapes: lengths (B,) -> (B,) float."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer={buffer} must be in [1, max_len={max_len}].")
    over = (lengths.float() - (max_len - buffer)) / buffer
    return -factor * over.clamp(0.0, 1.0)
