"""PlainEngine: torch as users know it, the reference every fast path is tested against.

``torch.optim.AdamW`` (fused where torch offers it), ``torch.nn.utils.clip_grad_norm_``, bf16
autocast on CUDA, models called through their ``forward``; no patching of anyone's modules and
no process-wide settings, so a model wrapped by DDP, FSDP2 or PEFT runs as it is.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ppolm.engines.base import (
    Engine,
    OptimizerSettings,
    ResponseForward,
    Sequences,
    StepResult,
    trainable_parameters,
    trained_modules,
)
from ppolm.maths.losses import token_entropy, token_logprobs
from ppolm.policies.base import Policy
from ppolm.policies.value import ValueHead


class PlainEngine(Engine):
    """The plain engine.

    Args:
        device: where the models run.
        bf16: bf16 autocast for the forward passes on CUDA (weights, gradients and optimizer
            state stay float32); ignored elsewhere.
        gradient_checkpointing: keep only each decoder layer's input for backward and recompute
            the layer there (less activation memory, one more forward of the trunk).
    """

    name = "plain"

    def __init__(self, device: torch.device | str = "cpu", bf16: bool = True,
                 gradient_checkpointing: bool = False) -> None:
        self.device = torch.device(device)
        self.bf16 = bf16
        self.gradient_checkpointing = gradient_checkpointing
        self.max_grad_norm: float | None = None
        self.checkpointed_layers: list[nn.Module] = []

    def setup(self, policy: Policy, value_head: ValueHead | None, reference: Policy,
              optim: OptimizerSettings) -> None:
        self.enable_checkpointing(policy, value_head)
        self.trained = trained_modules(policy, value_head)
        self.params = trainable_parameters(policy, value_head)
        self.max_grad_norm = optim.max_grad_norm
        self.optimizer = make_adamw(self.params, optim)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda" and self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def enable_checkpointing(self, policy: Policy, value_head: ValueHead | None) -> None:
        """Turn on the trained models' gradient checkpointing (``gradient_checkpointing``)."""
        if not self.gradient_checkpointing:
            return
        critic = value_head.critic if value_head is not None else None
        for model in (policy, critic):
            if model is not None:
                self.checkpointed_layers += model.enable_gradient_checkpointing()

    def rollout(self) -> contextlib.AbstractContextManager[Any]:
        return self.autocast()

    @contextlib.contextmanager
    def update(self) -> Iterator[None]:
        # Checkpointed layers recompute only in training mode, and the Trainer keeps every
        # module in eval mode (no dropout): the layers alone are put in training mode, their
        # submodules (dropout, attention) stay in eval mode.
        for layer in self.checkpointed_layers:
            layer.training = True
        try:
            with super().update():
                yield
        finally:
            for layer in self.checkpointed_layers:
                layer.training = False

    def _call(self, model: Policy, seqs: Sequences, logits: bool) -> Any:
        with self.autocast():
            return model(seqs.input_ids, seqs.attention_mask, seqs.response_len, logits=logits)

    def forward_response(self, model: Policy, seqs: Sequences, temperature: float, *,
                         entropy_grad: bool = False, full_dist: bool = False
                         ) -> ResponseForward:
        out = self._call(model, seqs, logits=True)
        return response_from_logits(out.logits, out.hidden, seqs, temperature,
                                    entropy_grad=entropy_grad, full_dist=full_dist)

    def forward_hidden(self, model: Policy, seqs: Sequences) -> Tensor:
        hidden: Tensor = self._call(model, seqs, logits=False).hidden
        return hidden

    def grad_norm(self) -> float:
        """Clip the gradients to ``max_grad_norm``; returns their global norm before."""
        limit = self.max_grad_norm if self.max_grad_norm is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, limit)
        full = getattr(norm, "full_tensor", None)         # a DTensor when FSDP2 shards them
        return float(full() if full is not None else norm)

    def step(self, loss_finite: bool = True) -> StepResult:
        norm = self.grad_norm()
        if not (loss_finite and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(norm, applied=False)
        self.optimizer.step()
        return StepResult(norm, applied=True)


def make_adamw(params: list[torch.nn.Parameter], optim: OptimizerSettings
               ) -> torch.optim.AdamW:
    """``torch.optim.AdamW``, fused where torch has the kernel for the parameters' device."""
    kwargs: dict[str, Any] = dict(lr=optim.learning_rate, eps=optim.adam_eps,
                                  weight_decay=optim.weight_decay)
    if params and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):      # a torch without the fused kernel there
            pass
    return torch.optim.AdamW(params, **kwargs)


def response_from_logits(logits: Tensor | None, hidden: Tensor, seqs: Sequences,
                         temperature: float, *, entropy_grad: bool = False,
                         full_dist: bool = False) -> ResponseForward:
    """Logprobs of the response tokens and entropies from the logits predicting them, divided
    by ``temperature`` as when sampling. The entropy is a statistic (no gradient) unless
    ``entropy_grad``.

    Shapes: logits (B, T, V), hidden (B, T, H) -> ResponseForward with (B, T) fields."""
    assert logits is not None
    L, T = seqs.input_ids.shape[1], seqs.response_len
    tokens = seqs.input_ids[:, L - T:]                                   # (B, T)
    z = logits.float() / temperature                                     # (B, T, V)
    if full_dist:
        dist = torch.log_softmax(z, dim=-1)                              # (B, T, V)
        logprobs = dist.gather(-1, tokens[..., None]).squeeze(-1)
        return ResponseForward(logprobs, token_entropy(dist), hidden, dist)
    logprobs = token_logprobs(z, tokens)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = token_entropy(torch.log_softmax(z, dim=-1))
    return ResponseForward(logprobs, entropy, hidden)

