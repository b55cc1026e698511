"""Global-norm gradient clipping in two cheap passes: the norm, then the optimizer step.

``torch.nn.utils.clip_grad_norm_`` reads every gradient for the norm, then multiplies every
gradient by ``min(1, max_norm / (norm + 1e-6))`` in place, even when that factor is 1. Here:

* the norm is ``sqrt(sum_i <g_i, g_i>)``, each dot product by BLAS over the flattened gradient
  (for a token table whose written rows are known, over those rows only) and the sum in
  float64: faster on CPU than ``torch.linalg.vector_norm`` per tensor, and more accurate
  (docs/performance.md);
* the factor is applied only when it is below 1, and then inside AdamW's fused kernel (which
  divides each gradient by a ``grad_scale`` as it reads it, as it does for mixed-precision loss
  scaling), so no pass of its own; other optimizers get the usual in-place multiplication.

The step equals clip-then-step up to float rounding (tested).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

EPS = 1e-6          # as torch.nn.utils.clip_grad_norm_: factor = max_norm / (norm + EPS)


def grad_norm(params: list[torch.nn.Parameter],
              rows: Callable[[Tensor], Tensor | None] | None = None) -> Tensor:
    """The L2 norm of all gradients of ``params`` together (0-d, float64); 0 when none.

    ``rows(p)``, when given and not None, names the distinct rows outside which ``p.grad`` is
    zero (``GradBuffers.rows``): only those are read."""
    squares = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            g = g.coalesce().values()
        elif rows is not None and (support := rows(p)) is not None:
            g = g.index_select(0, support)
        if g.dtype in (torch.float32, torch.float64) and g.is_contiguous():
            flat = g.view(-1)
            squares.append(torch.dot(flat, flat).to(torch.float64))
        else:
            squares.append(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2)
    if not squares:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()


def clip_factor(norm: float, max_norm: float | None) -> float:
    """``min(1, max_norm / (norm + 1e-6))``; 1 without a limit."""
    if max_norm is None:
        return 1.0
    return min(1.0, max_norm / (norm + EPS))


def step_with_factor(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                     factor: float) -> None:
    """``optimizer.step()`` as if every gradient had been multiplied by ``factor`` first."""
    if factor == 1.0:
        optimizer.step()
        return
    fused = all(g.get("fused") for g in optimizer.param_groups)
    if fused and isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and not hasattr(
            optimizer, "grad_scale"):
        device = next(p.device for p in params if p.grad is not None)
        optimizer.grad_scale = torch.tensor(1.0 / factor, device=device)   # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale                  # type: ignore[attr-defined]
        return
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)
    optimizer.step()
