"""Linear maps over weights packed once into oneDNN's blocked layout, for the decoding steps.

Why: a decoding step multiplies a few rows (the batch) by every weight matrix of the model. The
kernel ``F.linear`` takes on a CPU (a GEMM over the weight as stored) reaches a fraction of the
machine's rate at these shapes, and re-reads the weight in an unfriendly order at every call;
oneDNN's kernel over a weight reordered once into its own layout is about twice as fast there
(docs/performance.md, "Decoding over packed weights"). The weights change after every
update, so they are packed once per rollout (about a copy of the weights).

Numbers: float32 products sum in another order than ``F.linear``'s, so they equal it to float32
rounding (about 1e-6 relative), not bitwise; bf16 products (a weight cast to bf16, as autocast
casts it) equal autocast's ``F.linear``. Used only on CPU tensors where torch has the oneDNN
operators (``available``); anything else keeps ``F.linear``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def available() -> bool:
    """Whether this torch has oneDNN's packed linear operators."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


class PackedLinear:
    """``F.linear(x, weight, bias)`` over ``weight`` packed once (see the module docstring);
    the input is cast to the weight's dtype, as autocast casts it. Shapes: (..., in) ->
    (..., out)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        self.bias = bias.detach() if bias is not None else None
        self.dtype = weight.dtype

    def __call__(self, x: Tensor) -> Tensor:
        out: Tensor = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed,
                                                         self.bias, "none", [], "")
        return out


def packs(weight: Tensor) -> bool:
    """Whether ``weight`` can be packed: a CPU float32 or bf16 matrix, oneDNN present."""
    return (weight.device.type == "cpu" and weight.dim() == 2
            and weight.dtype in (torch.float32, torch.bfloat16) and available())


def linear(weight: Tensor, bias: Tensor | None, pack: bool) -> Callable[[Tensor], Tensor]:
    """A linear map over ``weight``: packed where ``pack`` and ``packs(weight)``, else
    ``F.linear``. Shapes: (..., in) -> (..., out)."""
    if pack and packs(weight):
        return PackedLinear(weight, bias)
    return lambda x: F.linear(x, weight, bias)
