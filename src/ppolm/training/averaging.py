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

Under FSDP2 a parameter is a DTensor of which each rank holds a shard: each rank then averages
its own shards, with no communication (the mean of the shards is the shard of the mean), and the
mean is a DTensor sharded as the parameter, which a checkpoint writes with the engine's shards
(``ppolm.checkpoint.layout``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


def trainable_weights(module: nn.Module) -> dict[str, Tensor]:
    """The module's trainable parameters by name (the tensors themselves, not copies)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _shards(name: str, dst: Tensor, src: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's parts of two tensors of the same parameter: the local shards of DTensors
    (FSDP2), whole tensors as they are. A whole tensor against a sharded one is refused: it is
    a parameter FSDP2 had gathered (inside a rollout), or another run's weights."""
    if isinstance(dst, DTensor) != isinstance(src, DTensor):
        raise ValueError(f"{name!r} is sharded (a DTensor) on one side only: add and swap "
                         "weights outside a rollout, with weights of the same sharding")
    if isinstance(dst, DTensor) and isinstance(src, DTensor):
        return dst.to_local(), src.to_local()
    return dst, src


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
        mine, theirs = _shards(name, p, weights[name])
        mine.copy_(theirs)
    return old


class TailAverage:
    """The running uniform mean of a module's trainable weights over the calls to ``add``.

    After k calls with weights w_1..w_k, ``mean`` holds (w_1 + ... + w_k) / k (in float32,
    whatever the parameters' dtype), updated as m <- m + (w_k - m) / k; each rank's shards of
    FSDP2's parameters (DTensors) on their own.
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
                m, w = _shards(name, self.mean[name], w)
                m.lerp_(w, 1.0 / self.count)      # m + (w - m) / k, no temporary

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
