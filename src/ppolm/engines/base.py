"""The seam between what PPO computes and how: the ``Engine`` interface the Trainer calls.

The Trainer says what PPO computes (collect, advantages, losses, the loop); an engine says how
the numbers are made: the forward passes over whole sequences, backward, the optimizer step
with gradient clipping, the contexts the rollout and the update run in, and its own state.
``PlainEngine`` is torch as users know it and the reference every fast path is tested against;
``FastCPUEngine`` is the single-process CPU engine (docs/performance.md).

A new engine (several processes, another accelerator) subclasses ``Engine`` and is chosen in
``ppolm.engines.factory.make_engine``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ppolm.errors import ConfigError
from ppolm.policies.base import Policy
from ppolm.policies.value import ValueHead
from ppolm.rollout.sampling import StepTrunk

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class Sequences:
    """Whole sequences (prompt then response) to run a model over.

    Shapes: input_ids, attention_mask (B, L); the last ``response_len`` tokens of each row are
    its response; ``index`` (B,) long: each row's place in the iteration's batch (an engine may
    keep per-episode results of the rollout, e.g. ``FastCPUEngine``'s frozen-layer output, and
    find them again for a minibatch), or None outside a rollout's batch.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_len: int
    index: Tensor | None = None


@dataclass(frozen=True)
class ResponseForward:
    """What one forward pass gives PPO about the response tokens."""

    logprobs: Tensor       # (B, T) log-probability of each response token, at the temperature
    entropy: Tensor        # (B, T) entropy of each token's distribution, at the temperature
    hidden: Tensor         # (B, T, H) trunk hidden states at the positions predicting them
    dist: Tensor | None = None  # (B, T, V) log-softmax over the vocabulary, when asked for


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: the global gradient norm before clipping, and whether the step was
    applied (False: the loss or the norm was not finite, the gradients were dropped)."""

    grad_norm: float
    applied: bool


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and clipping, as the algorithm's config gives them."""

    learning_rate: float
    adam_eps: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0


class Engine(ABC):
    """How the Trainer's numbers are computed (see the module docstring).

    Life cycle: ``setup`` once with the models; then per iteration ``rollout()`` (sampling and
    the rollout's forward passes run inside it) and ``update()`` (the minibatch steps run inside
    it: ``zero_grad``, ``backward`` per micro-batch, ``step``).
    """

    name: str = "engine"
    device: torch.device
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    trained: nn.ModuleDict          # the trained modules (``trained_modules``), set in setup
    # Whether ``state_dict`` holds this rank's shards of a state spread over a process group
    # (written by every rank with torch.distributed.checkpoint) rather than the whole state.
    sharded: bool = False
    # Whether ``setup`` takes models built on the meta device (``empty_policy``) and gives them
    # their weights itself (the distributed engine: each rank reads its shards).
    loads_meta: bool = False

    def place(self, module: M) -> M:
        """``module`` on ``self.device``, as the Trainer hands it to ``setup``. Parts built on
        the meta device stay there for an engine that ``loads_meta``; other engines refuse
        them."""
        if not any(t.is_meta for t in (*module.parameters(), *module.buffers())):
            return module.to(self.device)
        if not self.loads_meta:
            raise ConfigError(f"{type(module).__name__} was built on the meta device "
                              "(empty_policy), whose weights only the distributed engine "
                              "loads (under torchrun); in one process build it with "
                              "HFPolicy(path).")
        for child in module.children():           # a value head's linear map, say
            self.place(child)
        return module

    @abstractmethod
    def setup(self, policy: Policy, value_head: ValueHead | None, reference: Policy,
              optim: OptimizerSettings) -> None:
        """Take the models (already on ``self.device``) and build the optimizer over the
        trainable parameters of the policy and the value head (None: a critic-free run)."""

    def rollout(self) -> contextlib.AbstractContextManager[Any]:
        """The context of one rollout: sampling and the forward passes over its batch."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def update(self) -> Iterator[None]:
        """The context of one update; no gradient is kept after it (the rollout gets the
        memory)."""
        try:
            yield
        finally:
            self.optimizer.zero_grad(set_to_none=True)

    def sampling_trunk(self, policy: Policy) -> StepTrunk | None:
        """The trunk the sampler's decoding steps call (None: ``policy.trunk``)."""
        return None

    @abstractmethod
    def forward_response(self, model: Policy, seqs: Sequences, temperature: float, *,
                         entropy_grad: bool = False, full_dist: bool = False
                         ) -> ResponseForward:
        """Logprobs (and entropy, hidden states) of the response tokens under ``model``, the
        logits divided by ``temperature`` as when sampling. The entropy carries a gradient only
        with ``entropy_grad``; ``full_dist`` also returns the whole log-softmax.

        Shapes: see ``Sequences``; returns (B, T) logprobs and entropy, (B, T, H) hidden."""

    @abstractmethod
    def forward_hidden(self, model: Policy, seqs: Sequences) -> Tensor:
        """The trunk's hidden states at the positions predicting the response tokens (a
        separate critic's). Shapes: -> (B, T, H)."""

    def value(self, value_head: ValueHead, hidden: Tensor) -> Tensor:
        """The value head on ``hidden`` (the policy's or a critic's states): (B, T, H) -> (B, T)."""
        out: Tensor = value_head(hidden)
        return out

    def zero_grad(self) -> None:
        """Before a minibatch's backward passes."""
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        """Add the gradient of ``loss`` (one micro-batch) to the parameters' gradients."""
        loss.backward()

    @abstractmethod
    def step(self, loss_finite: bool = True) -> StepResult:
        """Clip the gradients to the global norm and take an optimizer step; skip it (dropping
        the gradients) when ``loss_finite`` is False or the norm is not finite."""

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs of the engine: ``models``, the trained modules' state
        (``policy.*``, ``value_head.*``), and ``optimizer``, its state. Tensors are the live
        ones (as torch's state dicts): copy the dict to hand it on."""
        return {"models": self.trained.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; ``models`` may be left out when the weights
        were loaded another way (the model files of a one-process checkpoint)."""
        if "models" in state:
            self.trained.load_state_dict(state["models"])
        self.optimizer.load_state_dict(state["optimizer"])


def trained_modules(policy: Policy, value_head: ValueHead | None) -> nn.ModuleDict:
    """The trained models under the names of an engine's state (``policy``, ``value_head``;
    the same modules, no copy)."""
    found: dict[str, nn.Module] = {"policy": policy}
    if value_head is not None:
        found["value_head"] = value_head
    return nn.ModuleDict(found)


def trainable_parameters(*modules: nn.Module | None) -> list[nn.Parameter]:
    """The parameters of ``modules`` (None skipped) that require grad, each once, in order."""
    found = {id(p): p for m in modules if m is not None for p in m.parameters()
             if p.requires_grad}
    return list(found.values())
