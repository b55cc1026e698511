"""Frozen lower layers run once per rollout: the probe that decides whether a policy's split
trunk (its view's ``trunk_bottom`` / ``trunk_top``) may be used, and the sampler-side recorder
of the frozen layers' output."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ppolm.engines.fast_cpu.views import FastView


@torch.no_grad()
def frozen_split(view: FastView, reference: FastView | None, device: torch.device | str,
                 enabled: bool = True) -> tuple[int, bool]:
    """The depth of the frozen lower layers of ``view``'s policy that can run once per batch
    (0: none), and whether ``reference``'s model has the same lower layers (then it can reuse
    their output too). A split is used only if, on a probe, it gives the whole trunk's hidden
    states."""
    depth = view.frozen_depth() if enabled else 0
    if depth == 0:
        return 0, False
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, view.policy.vocab_size, (2, 6), generator=gen).to(device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0                                     # a left-padded row
    whole, _ = view.policy.trunk(ids, mask)
    split = view.trunk_top(view.trunk_bottom(ids, mask, depth), ids, mask, depth)
    real = mask.bool()
    if not torch.allclose(whole[real], split[real], rtol=1e-4, atol=1e-5):
        return 0, False
    if reference is None:
        return depth, False
    try:
        ours = view.bottom_parameters(depth)
        theirs = reference.bottom_parameters(depth)
    except NotImplementedError:
        return depth, False
    shared = len(ours) == len(theirs) and all(
        a.shape == b.shape and torch.equal(a, b.to(a.device))
        for a, b in zip(ours, theirs, strict=True))
    return depth, shared


class BottomRecorder:
    """A decoding-step trunk that keeps the frozen layers' output of every fed token (from the
    same pass, ``view.trunk_and_bottom``), so the rollout needs no pass of its own over them.
    """

    def __init__(self, view: FastView, depth: int) -> None:
        self.view, self.depth = view, depth
        self.parts: list[Tensor] = []                                   # (B, Lnew, H) each

    def __call__(self, ids: Tensor, mask: Tensor, cache: Any) -> tuple[Tensor, Any]:
        hidden, bottom, cache = self.view.trunk_and_bottom(ids, mask, self.depth, cache=cache,
                                                           use_cache=True)
        self.parts.append(bottom)
        return hidden, cache

    def bottom(self, length: int) -> Tensor | None:
        """The output at all ``length`` positions of the sampled sequences; the last token,
        never fed, gets zeros (nothing causal reads it). None if the steps do not cover
        ``length - 1`` positions. Shapes: -> (B, length, H)."""
        if not self.parts or sum(p.shape[1] for p in self.parts) != length - 1:
            return None
        last = self.parts[0].new_zeros(self.parts[0].shape[0], 1, self.parts[0].shape[-1])
        return torch.cat([*self.parts, last], dim=1)
