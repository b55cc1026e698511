"""Sparse gradients for trained embedding lookups, added into persistent dense buffers.

A minibatch looks up a few hundred rows of a token-embedding table with tens of thousands of
rows (SmolLM2's: 49,152 x 576). ``nn.Embedding``'s default backward makes a zeroed gradient of
the whole table for every micro-batch and scatters those rows into it: on a CPU a fresh
allocation that is page-faulted in and filled every time. With ``sparse=True`` the backward
returns only the looked-up rows, and autograd adds them in place into a dense gradient that is
already there:

* a table tied to the LM head gets the head's dense gradient anyway; the rows are added into it;
* a table whose gradient came out sparse in a minibatch (nothing else gave it a dense one: a
  separate critic's table, position embeddings) gets a persistent dense buffer from then on,
  zeroed (not reallocated) before each minibatch.

The optimizer sees the same dense gradient either way (tested against the default backward),
so AdamW, clipping and weight decay are unchanged. The flag is set only inside ``update``'s
context and restored after, so the user's modules are left as they were given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class SparseLookups:
    """The trained ``nn.Embedding`` modules of ``modules``, and dense gradient buffers for the
    weights that need one."""

    def __init__(self, *modules: nn.Module) -> None:
        found = {id(m): m for root in modules for m in root.modules()
                 if isinstance(m, nn.Embedding) and m.weight.requires_grad and not m.sparse
                 and m.max_norm is None}      # (max_norm renormalises rows in place: left alone)
        self.embeddings = list(found.values())
        self._buffers: dict[nn.Embedding, torch.Tensor] = {}   # its weight's dense gradient

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Sparse backward for the lookups while the block runs; the flags restored after."""
        for m in self.embeddings:
            m.sparse = True
        try:
            yield
        finally:
            for m in self.embeddings:
                m.sparse = False

    def zero_grad(self) -> None:
        """After the optimizer's ``zero_grad``: give each weight that needs one its buffer,
        zeroed."""
        for m, buf in self._buffers.items():
            m.weight.grad = buf.zero_()

    def densify(self) -> None:
        """After the backward passes: a gradient that came out sparse is made dense (as
        optimizers and clipping expect), and its weight gets a buffer for the next minibatch."""
        for m in self.embeddings:
            g = m.weight.grad
            if g is not None and g.is_sparse:
                m.weight.grad = self._buffers[m] = g.to_dense()
