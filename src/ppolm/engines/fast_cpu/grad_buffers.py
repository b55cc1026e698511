"""Persistent gradient buffers: the update's backward passes add into gradients that are
already there, instead of making fresh ones each minibatch.

PyTorch's default is a fresh tensor for every weight's gradient in every minibatch (the
optimizer's ``zero_grad`` drops the old ones). On a CPU each fresh tensor of a megabyte or more
comes from the kernel page by page, page-faulted in and zeroed on first touch, and a product
writing into fresh memory runs slower than into memory already mapped (docs/performance.md).
Here, inside ``GradBuffers.active()`` (the fast engine's update):

* every trained weight keeps its dense gradient from the first minibatch of an update as a
  buffer, zeroed (not reallocated) before each later minibatch, and released after the update
  (the rollout gets the memory back);
* with ``linears=True`` (the engine's choice when malloc does not keep freed memory, see
  ``ppolm.engines.fast_cpu.memory``: with it, fresh gradients cost no faults and these buffers
  cost more than they save), every trained CPU ``nn.Linear`` computes its weight gradient
  as ``grad += g^T x`` straight into that buffer (``_LinearIntoGrad``; the same maths as
  ``nn.Linear``'s backward);
* the LM head does the same (``ppolm.engines.fast_cpu.fused``);
* token-table lookups give sparse gradients (the looked-up rows), which autograd adds in place
  into the buffer; for a table tied to the head that avoids autograd adding a dense and a sparse
  gradient out of place (one more fresh full-table tensor and a copy);
* a table that only lookups write (not tied to the head) has its rows written since the last
  zeroing recorded (a hook on the weight sees every gradient autograd adds): only those rows are
  zeroed before the next minibatch, and the gradient norm reads only those (``rows``), instead of
  a pass over the whole table (49k rows) each time;
* the head's buffer is not zeroed before a minibatch but marked stale: the head's backward
  writes its product over it (``addmm_`` with beta 0), and any other writer zeroes it first
  (``grad_buffer``, or the weight's hook before autograd adds into it).

The optimizer sees the same dense gradients (tested against the default backward). The in-place
part bypasses autograd for those weights: a hook registered on such a weight sees no gradient.
The modules are restored on exit.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

# The weights whose gradient is added into their ``.grad`` in place while registered:
# id -> (the weight, how many open blocks registered it).
_INTO_GRAD: dict[int, tuple[Tensor, int]] = {}
# The weights whose ``.grad`` holds an old gradient that counts as zero (id -> weight): the
# first writer overwrites or zeroes it (``GradBuffers``: the head's buffer between minibatches).
_STALE: dict[int, Tensor] = {}


@contextlib.contextmanager
def accumulate_into_grad(weights: Iterable[Tensor]) -> Iterator[None]:
    """While the block runs, a backward pass through the fused head or a patched linear adds
    the gradient of any of ``weights`` that has a dense ``.grad`` of matching dtype in place
    into it (and gives autograd none); weights without one get theirs the usual way."""
    added = list({id(w): w for w in weights}.values())
    for w in added:
        _INTO_GRAD[id(w)] = (w, _INTO_GRAD[id(w)][1] + 1 if id(w) in _INTO_GRAD else 1)
    try:
        yield
    finally:
        for w in added:
            count = _INTO_GRAD[id(w)][1] - 1
            if count:
                _INTO_GRAD[id(w)] = (w, count)
            else:
                del _INTO_GRAD[id(w)]


def grad_buffer(weight: Tensor, like: Tensor) -> Tensor | None:
    """The ``.grad`` of ``weight`` to add a product of ``like``'s dtype into, or None (then the
    gradient is returned to autograd as usual)."""
    g, beta = grad_buffer_beta(weight, like)
    if g is not None and beta == 0.0:
        g.zero_()
    return g


def grad_buffer_beta(weight: Tensor, like: Tensor) -> tuple[Tensor | None, float]:
    """``grad_buffer`` for a writer that takes a beta (``addmm_(..., beta=beta)``): (the buffer,
    1.0) to add into it, (the buffer, 0.0) when its contents are stale and must be overwritten,
    or (None, 1.0)."""
    entry = _INTO_GRAD.get(id(weight))
    if entry is None or entry[0] is not weight:
        return None, 1.0
    g = weight.grad
    if (g is None or g.layout != torch.strided or g.shape != weight.shape
            or g.dtype != like.dtype or not g.is_contiguous()):
        return None, 1.0
    return g, 0.0 if _STALE.pop(id(weight), None) is not None else 1.0


def _fresh(weight: Tensor) -> None:
    """Zero ``weight.grad`` if it is stale (before autograd or a writer adds into it)."""
    if _STALE.pop(id(weight), None) is not None and weight.grad is not None:
        weight.grad.zero_()


class _LinearIntoGrad(torch.autograd.Function):
    """``F.linear(x, W, b)`` whose backward adds ``g^T x`` into ``W.grad`` when it is a
    registered buffer. Shapes: x (..., I), W (O, I), b (O,) or None -> (..., O)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:
        x, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])                    # (N, O)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).view(*grad_out.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])                              # (N, I)
            into = grad_buffer(weight, g) if x2.dtype == g.dtype else None
            if into is not None:
                into.addmm_(g.t(), x2)
            else:
                grad_w = g.t() @ x2
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


def _linear_into_grad(self: nn.Linear, x: Tensor) -> Tensor:
    if torch.is_autocast_enabled(x.device.type):                        # casts: the usual path
        return nn.functional.linear(x, self.weight, self.bias)
    out: Tensor = _LinearIntoGrad.apply(x, self.weight, self.bias)
    return out


class GradBuffers:
    """The trained ``nn.Embedding`` tables and (with ``linears``) CPU ``nn.Linear`` layers of
    ``modules``, the LM head weights ``heads``, and a persistent dense gradient buffer for each
    of their weights."""

    def __init__(self, *modules: nn.Module, heads: Iterable[Tensor] = (),
                 linears: bool = True) -> None:
        found = {id(m): m for root in modules for m in root.modules()
                 if isinstance(m, nn.Embedding) and m.weight.requires_grad and not m.sparse
                 and m.max_norm is None}      # (max_norm renormalises rows in place: left alone)
        self.embeddings = list(found.values())
        found_linears = {id(m): m for root in modules for m in root.modules()
                         if linears and type(m) is nn.Linear and m.weight.requires_grad
                         and m.weight.device.type == "cpu"}
        self.linears = list(found_linears.values())
        self.heads = list({id(h): h for h in heads if h.requires_grad}.values())
        weights = ([m.weight for m in self.embeddings] + self.heads
                   + [m.weight for m in self.linears])
        self.weights = list({id(w): w for w in weights}.values())     # a tied table once
        # Tables that only lookups write (not a head): their written rows are recorded.
        self._head_ids = {id(h) for h in self.heads}
        self.row_tables = list({id(m.weight): m.weight for m in self.embeddings
                                if id(m.weight) not in self._head_ids}.values())
        self._row_ids = {id(w) for w in self.row_tables}
        self._buffers: dict[Tensor, Tensor] = {}      # weight -> its dense gradient
        # row table -> the row indices written since its buffer was last zeroed (each (n,),
        # repeats allowed), or None once a dense gradient was added (then all rows count).
        self._rows: dict[Tensor, list[Tensor] | None] = {}
        self._hooked = False                          # inside active(): the hooks record

    @property
    def held(self) -> dict[Tensor, Tensor]:
        """Each weight that has a persistent gradient buffer -> that buffer (a copy of the
        mapping; empty between updates)."""
        return dict(self._buffers)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Sparse lookups, linears and the head adding into the buffers while the block runs;
        the modules restored after."""
        for emb in self.embeddings:
            emb.sparse = True
        patched = [lin for lin in self.linears if "forward" not in lin.__dict__]
        for lin in patched:
            lin.forward = types.MethodType(_linear_into_grad, lin)      # type: ignore[method-assign]
        # Row tables are left out of the in-place writers' list: any gradient of theirs goes
        # through autograd, past the hook that records its rows.
        hooks = ([w.register_hook(self._row_hook(w)) for w in self.row_tables]
                 + [h.register_hook(self._stale_hook(h)) for h in self.heads])
        self._hooked = True
        try:
            with accumulate_into_grad(w for w in self.weights if id(w) not in self._row_ids):
                yield
        finally:
            self._hooked = False
            for hook in hooks:
                hook.remove()
            for emb in self.embeddings:
                emb.sparse = False
            for lin in patched:
                del lin.forward
            self._unstale()
            self._rows.clear()             # writes outside the block are not recorded

    def _row_hook(self, w: Tensor) -> Callable[[Tensor], None]:
        def record(grad: Tensor) -> None:            # before autograd adds ``grad`` into w.grad
            rows = self._rows[w] if w in self._rows else [] if w.grad is None else None
            self._rows[w] = rows + [grad._indices()[0]] if rows is not None and grad.is_sparse \
                else None
        return record

    @staticmethod
    def _stale_hook(w: Tensor) -> Callable[[Tensor], None]:
        def fresh(grad: Tensor) -> None:             # before autograd adds ``grad`` into w.grad
            _fresh(w)
        return fresh

    def rows(self, w: Tensor) -> Tensor | None:
        """The distinct rows (k,) outside which ``w.grad`` is zero, when they are known (a row
        table inside ``active()``); else None."""
        rows = self._rows.get(w)
        if rows is None or w.grad is None or w.grad is not self._buffers.get(w):
            return None
        if not rows:
            return torch.zeros(0, dtype=torch.long, device=w.device)
        return torch.unique(torch.cat(rows))

    def zero_grad(self) -> None:
        """After the optimizer's ``zero_grad``: give each weight that has one its buffer,
        zeroed (inside ``active()``: a row table only in the rows written, a head marked
        stale)."""
        for w, buf in self._buffers.items():
            w.grad = buf
            if id(w) in self._row_ids:
                rows = self._rows.get(w)
                if rows is None:
                    buf.zero_()
                elif rows:
                    buf.index_fill_(0, torch.cat(rows), 0.0)
                if self._hooked:
                    self._rows[w] = []
                else:
                    self._rows.pop(w, None)
            elif id(w) in self._head_ids and self._hooked:
                _STALE[id(w)] = w
            else:
                buf.zero_()

    def _unstale(self) -> None:
        """Zero the buffers still marked stale (nothing wrote them: their gradient is 0)."""
        for h in self.heads:
            _fresh(h)

    def release(self) -> None:
        """Drop the buffers (and the gradients they hold); the next minibatch finds them anew."""
        self._unstale()
        for w in self._buffers:
            w.grad = None
        self._buffers.clear()
        self._rows.clear()

    def densify(self) -> None:
        """After the backward passes: a gradient that came out sparse is made dense (as
        optimizers and clipping expect), a stale one zeroed, and every weight keeps its dense
        gradient as its buffer for the next minibatch."""
        self._unstale()
        for w in self.weights:
            g = w.grad
            if g is None:
                continue
            if g.is_sparse:
                g = w.grad = g.to_dense()
            self._buffers[w] = g
