"""AdamW that skips the rows of token tables no gradient has ever reached.

A token table that only lookups write (a separate critic's input embeddings, or any policy's
input embeddings not tied to its head) gets a gradient in the rows of the tokens of the
minibatch only: a few hundred of 49k rows. AdamW still reads and writes the whole table and its
two moment tensors every step (7 passes over the table's size). For a row whose gradient
and both moments are zero, AdamW without weight decay changes nothing:

    m' = b1 m + (1 - b1) g = 0,   v' = b2 v + (1 - b2) g^2 = 0,
    p' = p - lr m'_hat / (sqrt(v'_hat) + eps) = p

so only the rows that have had a gradient at some step need the update. This AdamW runs
PyTorch's fused kernel on those rows only (gathered, updated, written back), and the plain
fused step on every other parameter: the same kernel on the same numbers, so parameters and
moments are bitwise those of ``torch.optim.AdamW(fused=True)`` (tested). The state dict has the
usual layout, so checkpoints are interchangeable with plain AdamW's.

Used for such tables only when every group is fused, without weight decay, amsgrad or
maximize; otherwise everything takes the plain step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with lazily updated ``row_tables`` (see the module docstring).

    Args:
        params, **kwargs: as for ``torch.optim.AdamW``.
        row_tables: parameters (2-d) whose gradient is zero outside the rows written by lookups.
        rows: ``rows(table)`` gives the distinct rows of the current gradient that may be
            nonzero (``GradBuffers.rows``), or None when any row may be.
    """

    def __init__(self, params: Iterable[Any], *, row_tables: Iterable[Tensor] = (),
                 rows: Callable[[Tensor], Tensor | None] | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        plain = any(not g.get("fused") or g["weight_decay"] != 0 or g["amsgrad"]
                    or g["maximize"] for g in self.param_groups)
        in_groups = {id(p): g for g in self.param_groups for p in g["params"]}
        self.row_tables = [] if plain else [t for t in row_tables
                                            if id(t) in in_groups and t.dim() == 2]
        self._rows = rows
        self._seen: dict[int, Tensor] = {}   # table -> (rows,) bool: had a gradient at some step

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        held = [(t, t.grad) for t in self.row_tables]
        for t, _ in held:
            t.grad = None                    # the plain step skips parameters without a gradient
        try:
            # torch's step itself, without the hook wrapper it gets once any plain AdamW exists:
            # this step (wrapped the same way) runs the step hooks once, around all of it
            plain = torch.optim.AdamW.step
            loss = getattr(plain, "__wrapped__", plain)(self, closure)
        finally:
            for t, g in held:
                t.grad = g
        # (looked up each step: load_state_dict replaces the group dicts)
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        for t, g in held:
            if g is not None:
                self._step_rows(t, g, groups[id(t)])
        return loss

    def _step_rows(self, table: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        state = self.state[table]
        if not state:                        # as torch's AdamW initialises a fused parameter
            state["step"] = torch.zeros((), dtype=torch.float32, device=table.device)
            state["exp_avg"] = torch.zeros_like(table, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(table, memory_format=torch.preserve_format)
        m, v, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
        seen = self._seen.get(id(table))
        if seen is None:                     # new, or after load_state_dict: from the moments
            seen = (m != 0).any(1) | (v != 0).any(1)
            self._seen[id(table)] = seen
        now = self._rows(table) if self._rows is not None else None
        if now is None or grad.is_sparse:
            seen.fill_(True)
        else:
            seen[now] = True
        idx = seen.nonzero().squeeze(1)
        full = idx.numel() == table.shape[0]
        p, g, mr, vr = ((table, grad, m, v) if full else
                        (x.index_select(0, idx) for x in (table, grad, m, v)))
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        beta1, beta2 = group["betas"]
        step.add_(1)
        torch._fused_adamw_([p], [g], [mr], [vr], [], [step], amsgrad=False, lr=group["lr"],
                            beta1=float(beta1), beta2=float(beta2),
                            weight_decay=group["weight_decay"], eps=group["eps"],
                            maximize=False, grad_scale=grad_scale, found_inf=found_inf)
        if found_inf is not None:
            step.sub_(found_inf)
        if not full:
            table.index_copy_(0, idx, p)
            m.index_copy_(0, idx, mr)
            v.index_copy_(0, idx, vr)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._seen.clear()                   # rebuilt from the loaded moments at the next step
