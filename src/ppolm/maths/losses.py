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


RATIO_LEVELS = ("token", "sequence")


def sequence_log_ratio(log_ratio: Tensor, mask: Tensor) -> Tensor:
    """Each sequence's length-normalised log ratio, (1/|y_i|) sum_t log r_{i,t}: the log of
    GSPO's sequence ratio s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|). A row with no valid token
    gets 0. Shapes: (B, T), (B, T) -> (B,)."""
    m = mask.to(log_ratio.dtype)
    return (log_ratio * m).sum(1) / m.sum(1).clamp(min=1)


def truncated_is_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor,
                         cap: float) -> Tensor:
    """Truncated importance weights (Yao et al. 2025) for rollouts sampled under other numerics
    than training computes with: w_t = min(pi_old(a_t) / pi_rollout(a_t), cap), 0 on padding,
    no gradient. Shapes: (B, T) x 3 -> (B, T)."""
    if not cap > 0:
        raise DataError(f"the truncation cap must be > 0; got {cap!r}.")
    w = torch.exp(old_logprobs - rollout_logprobs).clamp(max=cap)
    return (w * mask.to(w.dtype)).detach()


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                clip_range: float = 0.2, num_tokens: Tensor | float | None = None,
                aggregate: Callable[[Tensor], Tensor] | None = None, *,
                clip_range_high: float | None = None, ratio_level: str = "token",
                weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate objective (Schulman et al. 2017), as a loss to minimise.

        ratio_t = exp(logp_t - logp_old_t)
        L = mean_t w_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps_low, 1 + eps_high))

    ``clip_range`` is eps_low and, unless ``clip_range_high`` is given, eps_high too; a larger
    eps_high is DAPO's clip-higher (Yu et al. 2025), letting unlikely tokens that earn a positive
    advantage grow further.

    ``ratio_level="sequence"``: GSPO (Zheng et al. 2025). Every token of sequence i takes the
    sequence's length-normalised ratio s_i = exp((1/|y_i|) sum_t log ratio_t) as its value, with
    the gradient of GSPO-token, s_i * grad log pi(a_t): sg[s_i] * pi(a_t) / sg[pi(a_t)]. The
    whole sequence is clipped or not together; with advantages constant over a sequence and the
    seq-mean-token-mean aggregation, loss and gradient are those of GSPO's sequence objective.

    ``weights`` (B, T), no gradient: per-token factors on the loss terms, such as the truncated
    importance weights of ``truncated_is_weights``; None: all 1.

    Stats: approx_kl = mean((ratio - 1) - log ratio) (the k3 estimator of KL(old || new),
    always on the token ratios; exactly 0 when ratio is 1), clipfrac = share of tokens where
    the clipped term is the one used, ratio_max_dev = max |ratio - 1| (of the ratios used).

    ``aggregate`` (per-token terms (B, T) -> the loss) replaces the token mean, e.g.
    ``ppolm.maths.aggregation.aggregate_loss`` with another mode.

    Shapes: all inputs (B, T); returns a scalar loss.
    """
    if ratio_level not in RATIO_LEVELS:
        raise DataError(f"unknown ratio_level {ratio_level!r}; use 'token' or 'sequence'.")
    high = clip_range if clip_range_high is None else clip_range_high
    log_ratio = logprobs - old_logprobs
    if ratio_level == "sequence":
        seq = sequence_log_ratio(log_ratio, mask)                          # (B,)
        used = logprobs - logprobs.detach() + seq.detach()[:, None]        # (B, T)
    else:
        used = log_ratio
    ratio = torch.exp(used)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)                      # (B, T)
    if weights is not None:
        per_token = per_token * weights
    loss = aggregate(per_token) if aggregate is not None else _mean(per_token, mask, num_tokens)
    with torch.no_grad():
        token_ratio = torch.exp(log_ratio)
        stats = {
            "approx_kl": masked_mean((token_ratio - 1) - log_ratio, mask),
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
