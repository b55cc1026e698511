"""DistributedEngine: the plain engine over several processes, with torch's own wrappers.

``strategy="ddp"``: ``DistributedDataParallel`` over each trainable module (the policy, a
separate critic, the value head's own layer); every rank holds whole models and the gradients
are all-reduced in backward. ``strategy="fsdp"``: FSDP2's ``fully_shard`` on every decoder layer
and then the rest of each model (the policy, the frozen reference, a separate critic, the value
head's layer); each rank holds 1/N of the parameters, gradients and AdamW state, and gathers a
layer's weights only while it runs (bf16 parameters with float32 gradient reduction on CUDA).

The rollouts are split between the ranks and their losses are normalised by GLOBAL token counts
(``ppolm.parallel.world``); both wrappers average gradients over the ranks, so ``backward``
multiplies the loss by the world size: the reduced gradient is then the sum of the ranks', the
gradient of the whole batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

from ppolm.engines.base import (
    OptimizerSettings,
    Sequences,
    trainable_parameters,
    trained_modules,
)
from ppolm.engines.plain import PlainEngine, make_adamw
from ppolm.errors import ConfigError
from ppolm.policies.base import Policy
from ppolm.policies.hf import HFPolicy
from ppolm.policies.pretrained import materialize
from ppolm.policies.value import ValueHead

Strategy = Literal["ddp", "fsdp"]


class DistributedEngine(PlainEngine):
    """The plain engine on every rank of a process group (see the module docstring).

    Args:
        device: this rank's device (``cuda:LOCAL_RANK`` or the CPU).
        strategy: "ddp" or "fsdp".
        bf16: bf16 autocast (DDP) or bf16 parameters in FSDP2's mixed precision, on CUDA only.
        gradient_checkpointing: recompute each decoder layer in backward (as PlainEngine).
    """

    name = "distributed"
    sharded = True       # each rank's state: written by every rank with DCP (under DDP too)
    loads_meta = True    # models of empty_policy: each rank reads its part of the weights

    def __init__(self, device: torch.device | str, strategy: Strategy = "ddp", bf16: bool = True,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__(device, bf16=bf16, gradient_checkpointing=gradient_checkpointing)
        if not dist.is_initialized():
            raise RuntimeError("DistributedEngine needs a process group (launch with torchrun).")
        self.strategy = strategy
        self.world_size = dist.get_world_size()
        self._wrapped: dict[int, nn.Module] = {}      # id(module) -> its DDP wrapper
        self._roots: list[nn.Module] = []             # FSDP2 roots the sampler calls into

    def setup(self, policy: Policy, value_head: ValueHead | None, reference: Policy,
              optim: OptimizerSettings) -> None:
        self.enable_checkpointing(policy, value_head)
        critic = value_head.critic if value_head is not None else None
        if critic is not None and not any(True for _ in critic.parameters()):
            raise ConfigError("this critic runs the policy's own modules (a second LoRA "
                              "adapter, ValueHead.adapter), which DDP and FSDP2 cannot wrap "
                              "apart from the policy; under torchrun use a value head on the "
                              "policy's states or ValueHead.separate.")
        # Every rank starts from rank 0's weights (models built without a common seed too);
        # models built on the meta device read the same files on every rank instead.
        for module in (policy, reference, value_head):
            if module is not None:
                for t in module.state_dict().values():
                    if not t.is_meta:
                        dist.broadcast(t, src=0)
        if self.strategy == "fsdp":
            if not any(True for _ in reference.parameters()):
                raise ConfigError("this policy's reference runs the policy's own weights (LoRA "
                                  "with its adapters disabled), which FSDP2 cannot shard twice; "
                                  "use distributed='ddp' with LoRA.")
            for model in (policy, reference, critic):
                if model is not None:
                    self._shard(model)
            if value_head is not None:
                self._shard_head(value_head.linear)
            self._roots = [policy]
        else:
            for model in (policy, reference, critic):     # whole on every rank under DDP
                if model is not None and _on_meta(model):
                    _materialize(model, self.device)
            self._wrap(policy)
            if critic is not None:
                self._wrap(critic)
            if value_head is not None:
                self._wrap(value_head, ignore="critic." if critic is not None else None)
        # FSDP2 replaces the parameters by sharded ones: collect them after wrapping.
        self.trained = trained_modules(policy, value_head)
        self.params = trainable_parameters(policy, value_head)
        self.max_grad_norm = optim.max_grad_norm
        self.optimizer = make_adamw(self.params, optim)

    # --- wrapping --------------------------------------------------------------------------
    def _wrap(self, module: nn.Module, ignore: str | None = None) -> None:
        if not any(p.requires_grad for p in module.parameters()):
            return
        if ignore is not None:   # parameters another wrapper (a separate critic's) reduces
            names = [n for n, _ in [*module.named_parameters(), *module.named_buffers()]
                     if n.startswith(ignore)]
            DDP._set_params_and_buffers_to_ignore_for_model(module, names)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # find_unused_parameters: a critic's LM head, say, takes no part in its loss.
        self._wrapped[id(module)] = DDP(module, device_ids=ids, broadcast_buffers=False,
                                        find_unused_parameters=True)

    def _mixed_precision(self) -> dict[str, Any]:
        if self.device.type != "cuda" or not self.bf16:
            return {}
        from torch.distributed.fsdp import MixedPrecisionPolicy
        return {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                  reduce_dtype=torch.float32)}

    def _shard(self, model: Policy) -> None:
        """``fully_shard`` each decoder layer, then the model (its embeddings, final norm and
        head); one forward over a one-token batch initialises FSDP2 from the model's root (the
        sampler later calls the trunk without going through the root's forward)."""
        from torch.distributed.fsdp import fully_shard
        kw = self._mixed_precision()
        for layer in model.layers():
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        if _on_meta(model):          # sharded first: each rank then reads only its shards
            _materialize(model, self.device)
        probe = torch.ones(1, 1, dtype=torch.long, device=self.device)
        with torch.no_grad():
            model(probe, torch.ones_like(probe))
        # A root stays gathered after its forward; shard it again so that the parameters the
        # optimizer is given are the sharded ones.
        model.reshard()  # type: ignore[operator]

    def _shard_head(self, linear: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard
        fully_shard(linear, **self._mixed_precision())

    def _module(self, model: nn.Module) -> nn.Module:
        return self._wrapped.get(id(model), model)

    # --- passes ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def rollout(self) -> Iterator[None]:
        # The sampler calls the policy's trunk and head, not its forward: FSDP2's root
        # parameters (embeddings, final norm, head) are gathered for the rollout.
        for root in self._roots:
            root.unshard()  # type: ignore[operator]
        try:
            with self.autocast():
                yield
        finally:
            # Sharded again after it: weights written into the shards between two rollouts
            # (fit_kl_budget's weight path, say) reach the next gathering.
            for root in self._roots:
                root.reshard()  # type: ignore[operator]

    def _call(self, model: Policy, seqs: Sequences, logits: bool) -> Any:
        with self.autocast():
            return self._module(model)(seqs.input_ids, seqs.attention_mask, seqs.response_len,
                                       logits=logits)

    def value(self, value_head: ValueHead, hidden: Tensor) -> Tensor:
        out: Tensor = self._module(value_head)(hidden)
        return out

    def backward(self, loss: Tensor) -> None:
        # DDP and FSDP2 average the ranks' gradients; the losses are already normalised by the
        # global counts, so the sum is wanted.
        (loss * self.world_size).backward()

    # --- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The trained models' and AdamW's state through DCP's ``get_state_dict``: this rank's
        shards under FSDP2 (DTensors), whole tensors under DDP; the optimizer's state keyed by
        parameter names (``policy.…``) rather than positions, as DCP writes it."""
        models, optimizer = get_state_dict(self.trained, self.optimizer)
        return {"models": models, "optimizer": optimizer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (on every rank, the same world size)."""
        set_state_dict(self.trained, self.optimizer, model_state_dict=state["models"],
                       optim_state_dict=state["optimizer"])


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _materialize(model: nn.Module, device: torch.device) -> None:
    """The weights of a model built on the meta device (``empty_policy``), read from its
    files into this rank's tensors (all ranks together)."""
    if not isinstance(model, HFPolicy):
        raise ConfigError(f"{type(model).__name__} was built on the meta device; the "
                          "distributed engine reads the weights of transformers models "
                          "(ppolm.policies.pretrained.empty_policy) only.")
    materialize(model, device)
