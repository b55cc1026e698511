"""Pure functions: generalised advantage estimation and masked statistics.

Nothing here knows about the buffer, the trainer or the config: each function takes tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ppolm.errors import DataError


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is 1. Shapes: x, mask broadcastable; reduces ``dim`` (or all)."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (0 where there are none)."""
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the masked positions (scalar)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked positions; padding positions come out as 0.

    With ``shift_mean=False`` only the scale changes (used for rewards, where the mean carries
    the signal). Shapes: x, mask (B, T) -> (B, T).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over the masked positions (nan if Var is 0)."""
    var_ret = masked_var(returns, mask)
    if var_ret == 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var_ret)


def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
                lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    For the real tokens t of an episode, with V = 0 after its last real token:
        delta_t = r_t + gamma * V_{t'} - V_t          (t' the next real token)
        A_t     = delta_t + gamma * lam * A_{t'}
        R_t     = A_t + V_t
    Padding positions are skipped (so left, right or interior padding all work) and get 0.
    Vectorised over the batch; one step per token position.

    Shapes: rewards, values, mask (B, T) -> advantages (B, T), returns (B, T).
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise DataError(f"compute_gae needs rewards, values and mask of one (B, T) shape; got "
                        f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}.")
    m = mask.to(values.dtype)
    B, T = rewards.shape
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(B)       # V of the next real token (0 past the episode's end)
    next_adv = values.new_zeros(B)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        real = m[:, t]
        advantages[:, t] = adv * real
        next_value = torch.where(real.bool(), values[:, t], next_value)
        next_adv = torch.where(real.bool(), adv, next_adv)
    returns = (advantages + values) * m
    return advantages, returns
