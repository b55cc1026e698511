"""The LM head, token logprobs and entropy in one autograd function, with one full-vocabulary
tensor.

PPO needs, for each response token, ``log softmax(z / temperature)[token]`` (with gradient) and
the entropy of that distribution (a statistic). Written with plain torch ops, autograd keeps the
logits, makes temporaries for the temperature division, the logsumexp and the entropy, and builds
the gradient of the logits from three more full-vocabulary tensors (softmax, a scattered
one-hot, their sum). With a vocabulary of 49k those copies cost as much time as the head's matmul.

Here the forward pass makes the logits once, turns them in place into the softmax, and keeps only
that for the backward pass, where it becomes the gradient of the logits in place:

    p = softmax(z),  d logp[token] / dz = onehot(token) - p

The entropy, ``H = lse - sum(p * z)``, comes from the same tensors at the cost of one
dot product per row. Its gradient is not provided: ``forward_response`` uses the plain path when
the entropy is part of the loss (``ent_coef > 0``).

On CPU the logits are made transposed, ``W @ h.T`` of shape (V, R), and the softmax statistics
are taken down the columns: BLAS makes the product of a many-row matrix with a few hundred
vectors faster this way round, and the backward products keep the layout (docs/performance.md).
On CUDA the row-major layout is kept.

Inside ``ppolm.engines.fast_cpu.grad_buffers.accumulate_into_grad`` (the fast engine's update),
the backward pass adds the head's weight gradient in place into the weight's existing ``.grad``,
a persistent buffer, instead of returning a fresh (V, H) tensor for autograd to add there, and
writes it over the buffer (beta 0) when the buffer's contents are stale, so the buffer needs no
zeroing pass of its own (see ``ppolm.engines.fast_cpu.grad_buffers``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ppolm.engines.fast_cpu.grad_buffers import grad_buffer_beta


def head_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor,
                  temperature: float) -> tuple[Tensor, Tensor]:
    """Logprobs of ``tokens`` and entropies under ``softmax((hidden @ weight.T + bias) / T)``.

    Shapes: hidden (R, H), weight (V, H), bias (V,) or None, tokens (R,) -> logprobs (R,),
    entropy (R,) in float32. The entropy carries no gradient.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        out: tuple[Tensor, Tensor] = _HeadLogprobs.apply(hidden, weight, bias, tokens,
                                                         1.0 / temperature)
        return out
    logprobs, entropy, _ = _forward(hidden, weight, bias, tokens, 1.0 / temperature,
                                    keep_probs=False)
    return logprobs, entropy


# Elements per block of logits made at once without gradient (16 MiB in float32), and per chunk
# of rows whose softmax statistics are taken while they sit in cache (2 MiB).
_BLOCK = 1 << 22
_CHUNK = 1 << 19
# Devices on which the logits are made transposed, (V, R) (see the module docstring), and the
# elements per block of them made at once without gradient (64 MiB: the product runs at half
# speed against a few dozen columns, and re-reads the whole head for each block).
_COLUMN_DEVICES = {"cpu"}
_COLUMN_BLOCK = 1 << 24


def _columns(hidden: Tensor) -> bool:
    return hidden.device.type in _COLUMN_DEVICES


def _forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor,
             inv_temp: float, keep_probs: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logprobs, entropy, softmax or None).

    With ``keep_probs`` one (R, V) tensor is made, and ends as the softmax; without, the logits
    are made a block of rows at a time into one reused buffer.
    """
    if bias is None and inv_temp != 1.0:
        hidden = hidden * inv_temp                       # (R, H): cheaper than scaling (R, V)
    R, V = hidden.shape[0], weight.shape[0]
    if _columns(hidden):
        return _forward_columns(hidden, weight, bias, tokens, inv_temp, keep_probs)
    if keep_probs:
        z = _logits(hidden, weight, bias, inv_temp, None)            # (R, V)
        logprobs, entropy = _softmax_stats_(z, tokens)
        return logprobs, entropy, z
    blocks = -(-R // max(1, _BLOCK // V))
    rows = -(-R // blocks)                               # even blocks: no thin last block
    same = hidden.dtype == weight.dtype == torch.float32 and (bias is None or
                                                            bias.dtype == torch.float32)
    buf = torch.empty(rows, V, device=hidden.device) if same else None
    parts = []
    for start in range(0, R, rows):
        h = hidden[start: start + rows]
        z = _logits(h, weight, bias, inv_temp, None if buf is None else buf[: h.shape[0]])
        parts.append(_softmax_stats_(z, tokens[start: start + rows], keep=False))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), None


def _forward_columns(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor,
                     inv_temp: float, keep_probs: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """``_forward`` with the logits made transposed, (V, R); the softmax it keeps is (V, R).

    Without ``keep_probs``, a block of rows of ``hidden`` at a time (a block of columns)."""
    R, V = hidden.shape[0], weight.shape[0]
    if keep_probs:
        zt = _logits(hidden, weight, bias, inv_temp, transposed=True)   # (V, R)
        logprobs, entropy = _softmax_stats_t_(zt, tokens)
        return logprobs, entropy, zt
    rows = max(1, _COLUMN_BLOCK // V)
    parts = [_softmax_stats_t_(_logits(hidden[a: a + rows], weight, bias, inv_temp,
                                       transposed=True), tokens[a: a + rows], keep=False)
             for a in range(0, R, rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), None


def _softmax_stats_t_(zt: Tensor, tokens: Tensor, keep: bool = True) -> tuple[Tensor, Tensor]:
    """``_softmax_stats_`` down the columns of ``zt`` (V, R), which becomes their softmax
    (with ``keep``; else it is left overwritten).

    Shapes: zt (V, R), tokens (R,) -> (R,), (R,)."""
    picked, log_s, ez = _stats_(zt, tokens, 0, keep)
    return picked - log_s, log_s - ez


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, inv_temp: float,
            out: Tensor | None = None, transposed: bool = False) -> Tensor:
    """(hidden @ weight.T + bias) * inv_temp (the scale already in ``hidden`` without a bias),
    at least float32, into ``out`` when given; with ``transposed``, its transpose
    ``weight @ hidden.T (+ bias[:, None])``. Shapes: (R, H), (V, H) -> (R, V), or (V, R)."""
    if transposed:
        z = (weight @ hidden.t() if bias is None
             else torch.addmm(bias[:, None], weight, hidden.t()))
    elif out is not None:
        z = (torch.mm(hidden, weight.t(), out=out) if bias is None
             else torch.addmm(bias, hidden, weight.t(), out=out))
    else:
        z = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()                                    # softmax statistics in float32
    if bias is not None and inv_temp != 1.0:
        z.mul_(inv_temp)
    return z


def _softmax_stats_(z: Tensor, tokens: Tensor, keep: bool = True) -> tuple[Tensor, Tensor]:
    """Logprobs of ``tokens`` and entropies of ``softmax(z)``; turns ``z`` into that softmax
    (with ``keep``; else ``z`` is left overwritten).

    Works through a few rows at a time, so each row is read from memory once and written once:
    with m = max z, e = exp(z - m), s = sum e:  logp = z[token] - m - log s,
    H = log s - sum(e * (z - m)) / s.  Shapes: z (R, V), tokens (R,) -> (R,), (R,).
    """
    R, V = z.shape
    rows = max(1, _CHUNK // V)
    parts = [_stats_(z[a: a + rows], tokens[a: a + rows], -1, keep) for a in range(0, R, rows)]
    picked, log_s, ez = (torch.cat(p) for p in zip(*parts, strict=True))
    return picked - log_s, log_s - ez


def _stats_(z: Tensor, tokens: Tensor, dim: int, keep: bool = True
            ) -> tuple[Tensor, Tensor, Tensor]:
    """(z[token] - m, log s, sum p (z - m)) of the distributions along ``dim`` of ``z``, with
    m = max z, e = exp(z - m), s = sum e, p = e / s; ``z`` becomes p with ``keep`` (without,
    z - m: no pass writes the softmax nobody reads).

    Shapes: z (R, V) with dim -1, or (V, R) with dim 0; tokens (R,) -> three (R,)."""
    z.sub_(z.amax(dim, keepdim=True))                                # shifted: max 0
    picked = z.gather(dim, tokens.unsqueeze(dim)).squeeze(dim)
    e = torch.exp(z)
    s = e.sum(dim, keepdim=True)
    if not keep:
        return picked, torch.log(s.squeeze(dim)), e.mul_(z).sum(dim) / s.squeeze(dim)
    ez = z.mul_(e).sum(dim) / s.squeeze(dim)                         # sum p (z - m)
    torch.div(e, s, out=z)                                           # the softmax, in place
    return picked, torch.log(s.squeeze(dim)), ez


def _cpu_autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype CPU autocast runs products in, when it is on and ``x`` is a CPU float32
    tensor; else None."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return None


class _HeadLogprobs(torch.autograd.Function):
    # Under CUDA autocast the backward matmuls run in the forward's precision (bf16).
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor,
                inv_temp: float) -> tuple[Tensor, Tensor]:
        # Under CPU autocast (PPOConfig.cpu_bf16) the logits and the hidden state's gradient are
        # products in its dtype: the weight is cast here once and kept for the backward pass,
        # which autocast does not cover on CPU. The softmax statistics, the gradient of the
        # logits and the weight's gradient (a product written into its float32 buffer, cheaper
        # than a bf16 one cast back) stay float32.
        ctx.hidden_dtype, low = hidden.dtype, _cpu_autocast_dtype(hidden)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.master = weight if low is not None else None      # the float32 weight
        if low is not None:
            weight = weight.to(low)
            logprobs, entropy, probs = _forward(hidden.to(low), weight,
                                                None if bias is None else bias.to(low), tokens,
                                                inv_temp, keep_probs=True)
        else:
            logprobs, entropy, probs = _forward(hidden, weight, bias, tokens, inv_temp,
                                                keep_probs=True)
        ctx.save_for_backward(hidden, weight, probs, tokens)
        ctx.has_bias, ctx.inv_temp, ctx.columns = bias is not None, inv_temp, _columns(hidden)
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, grad_logprobs: Tensor, _grad_entropy: Tensor) -> tuple[Any, ...]:
        hidden, weight, probs, tokens = ctx.saved_tensors
        g = grad_logprobs.to(probs.dtype)
        # d logp / dz = onehot - p, scaled by the upstream gradient; built in place in `probs`
        # (a second backward through this graph is refused by autograd's version check).
        # With columns, `probs` is (V, R) and so is grad_z: grad_z.t() below is the (R, V) one.
        if ctx.columns:
            grad_z = probs.mul_(-g[None, :])
            grad_z.scatter_add_(0, tokens[None, :], g[None, :])
            grad_z = grad_z.t()
        else:
            grad_z = probs.mul_(-g[:, None])
            grad_z.scatter_add_(-1, tokens[:, None], g[:, None])
        if grad_z.dtype != weight.dtype and ctx.master is None:     # a model held in bf16
            grad_z = grad_z.to(weight.dtype)
        if ctx.has_bias:
            # z = (h W^T + b) * s: the scale goes on the gradient of z
            if ctx.inv_temp != 1.0:
                grad_z.mul_(ctx.inv_temp)
            x = hidden
        else:
            # z = (h * s) W^T: the scale goes on the gradient of h
            x = hidden * ctx.inv_temp if ctx.inv_temp != 1.0 else hidden
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # under CPU autocast: grad_z (float32) cast for the product with the cast weight
            grad_hidden = grad_z.to(weight.dtype) @ weight
            if not ctx.has_bias and ctx.inv_temp != 1.0:
                grad_hidden.mul_(ctx.inv_temp)
            grad_hidden = grad_hidden.to(ctx.hidden_dtype)
        if ctx.needs_input_grad[1]:
            weight = weight if ctx.master is None else ctx.master   # (CPU autocast: float32)
            into, beta = (grad_buffer_beta(weight, grad_z) if x.dtype == grad_z.dtype
                          else (None, 1.0))
            if into is not None:                          # += grad_z^T x, no fresh (V, H);
                into.addmm_(grad_z.t(), x, beta=beta)     # over a stale buffer: = (beta 0)
            else:
                grad_weight = grad_z.t() @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_z.sum(0).to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None
