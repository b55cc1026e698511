"""Pure PPO loss functions. Each returns ``(loss, stats)``; stats are detached scalars.

Every mean is over the valid (masked) tokens. ``num_tokens`` lets a caller that accumulates
gradients over micro-batches normalise by the token count of the whole minibatch, so that
accumulated gradients equal those of one big batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ppolm.errors import DataError
from ppolm.maths.advantages import masked_mean, masked_sum


def _mean(x: Tensor, mask: Tensor, num_tokens: Tensor | float | None) -> Tensor:
    return masked_mean(x, mask) if num_tokens is None else masked_sum(x, mask) / num_tokens


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                clip_range: float = 0.2, num_tokens: Tensor | float | None = None,
                aggregate: Callable[[Tensor], Tensor] | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate objective (Schulman et al. 2017), as a loss to minimise.

        ratio_t = exp(logp_t - logp_old_t)
        L = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))

    Stats: approx_kl = mean((ratio - 1) - log ratio) (the k3 estimator of KL(old || new); exactly
    0 when ratio is 1), clipfrac = share of tokens where the clipped term is the one used,
    ratio_max_dev = max |ratio - 1|.

    ``aggregate`` (per-token terms (B, T) -> the loss) replaces the token mean, e.g.
    ``ppolm.maths.aggregation.aggregate_loss`` with another mode.

    Shapes: all inputs (B, T); returns a scalar loss.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)                      # (B, T)
    loss = aggregate(per_token) if aggregate is not None else _mean(per_token, mask, num_tokens)
    with torch.no_grad():
        stats = {
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "ratio_max_dev": ((ratio - 1).abs() * mask).max(),
        }
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_range_value: float | None = 0.2, num_tokens: Tensor | float | None = None
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (OpenAI baselines / TRL):

        V_clip = V_old + clip(V - V_old, -c, c)
        L = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)

    With ``clip_range_value=None`` it is the plain 0.5 * mean (V - R)^2.
    Shapes: all inputs (B, T); returns a scalar loss.
    """
    err = (values - returns) ** 2
    if clip_range_value is None:
        loss = 0.5 * _mean(err, mask, num_tokens)
        clipfrac = torch.zeros((), device=values.device)
    else:
        v_clip = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
        err_clip = (v_clip - returns) ** 2
        loss = 0.5 * _mean(torch.maximum(err, err_clip), mask, num_tokens)
        clipfrac = masked_mean((err_clip > err).float().detach(), mask)
    return loss, {"value_clipfrac": clipfrac}


def entropy(logits: Tensor, mask: Tensor, num_tokens: Tensor | float | None = None) -> Tensor:
    """Mean entropy of the token distributions. Shapes: logits (B, T, V), mask (B, T) -> ()."""
    ent = token_entropy(torch.log_softmax(logits.float(), dim=-1))   # (B, T)
    return _mean(ent, mask, num_tokens)


def token_entropy(logp: Tensor) -> Tensor:
    """Entropy of each distribution from its log-probabilities. Shapes: (..., V) -> (...)."""
    return -(logp.exp() * logp).sum(-1)


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[token], by gather minus logsumexp (no full log-softmax copy).

    Shapes: logits (B, T, V), tokens (B, T) -> (B, T).
    """
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' logprobs.

        k1 = log p - log p_ref                 (unbiased, can be negative per token)
        k2 = (log p - log p_ref)^2 / 2
        k3 = (r - 1) - log r, r = p_ref / p    (unbiased, always >= 0; Schulman's blog)

    Shapes: (B, T), (B, T) -> (B, T).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1', 'k2' or 'k3' (the exact "
                     "'full' KL needs the whole distributions: see full_kl).")


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str = "k1"
                ) -> Tensor:
    """KL estimate per response: the sum of the per-token estimator (k1 = log p - log p_ref
    by default, the unbiased estimate of the KL of whole responses) over its tokens.

    Shapes: logprobs, ref_logprobs, mask (B, T) -> (B,).
    """
    if not logprobs.shape == ref_logprobs.shape == mask.shape or logprobs.dim() != 2:
        raise DataError(f"sequence_kl needs three (B, T) tensors; got {tuple(logprobs.shape)}, "
                        f"{tuple(ref_logprobs.shape)}, {tuple(mask.shape)}.")
    return (kl_penalty(logprobs, ref_logprobs, estimator) * mask).sum(1)


def full_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Exact per-token KL(pi || pi_ref) = sum_v pi(v) (log pi(v) - log pi_ref(v)), over the
    whole vocabulary: the expectation of k1 over the next token, with no sampling noise. Its
    gradient pulls every token's probability toward the reference, not only the sampled one's.

    Shapes: log-softmax (..., V), (..., V) -> (...).
    """
    return (logp.exp() * (logp - ref_logp)).sum(-1)
