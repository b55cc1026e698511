"""Tail averaging: end training with the mean of the policy's weights over its last iterations.

PPO's last iterate carries the noise of its last few minibatches, and on a language model that
noise can cost KL to the reference without buying reward. When the late iterates scatter around
a fixed point, the uniform mean of the weights after each of the last N iterations keeps the
direction the updates agree on and averages much of the noise out (stochastic weight averaging,
Izmailov et al. 2018; weight averaging along an RLHF run, Ramé et al. 2024, "WARP"); when they
drift (an adaptive KL coefficient swinging the policy), the mean lags. docs/maths.md, "Tail
averaging", has the argument and what it did on the SmolLM2 task (part of the example's
default since runs A0-A2). Only trainable parameters are averaged; frozen ones are the same in
every iterate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def trainable_weights(module: nn.Module) -> dict[str, Tensor]:
    """The module's trainable parameters by name (the tensors themselves, not copies)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def swap_weights(module: nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copy ``weights`` (name -> tensor, the module's trainable parameters) into ``module``;
    returns copies of the values they replace, so a second swap undoes the first."""
    params = trainable_weights(module)
    if set(weights) != set(params):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise ValueError(f"weights do not fit the module's trainable parameters (missing "
                         f"{missing[:3]}, unexpected {extra[:3]})")
    old = {}
    for name, p in params.items():
        old[name] = p.detach().clone()
        p.copy_(weights[name])
    return old


class TailAverage:
    """The running uniform mean of a module's trainable weights over the calls to ``add``.

    After k calls with weights w_1..w_k, ``mean`` holds (w_1 + ... + w_k) / k (in float32,
    whatever the parameters' dtype), updated as m <- m + (w_k - m) / k.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: dict[str, Tensor] = {}

    @torch.no_grad()
    def add(self, module: nn.Module) -> None:
        self.count += 1
        for name, p in trainable_weights(module).items():
            w = p.detach().float()
            if name not in self.mean:
                self.mean[name] = w.clone()
            else:
                self.mean[name].lerp_(w, 1.0 / self.count)      # m + (w - m) / k, no temporary

    def swap_in(self, module: nn.Module) -> dict[str, Tensor]:
        """Give ``module`` the mean; returns the weights it had (the last iterate)."""
        if not self.count:
            raise ValueError("no weights were added to the average")
        return swap_weights(module, self.mean)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.count = int(state["count"])
        self.mean = {k: v.to(device) for k, v in state["mean"].items()}
