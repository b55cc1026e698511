"""DistributedEngine: the plain engine over several processes, with torch's own wrappers.

``strategy="ddp"``: ``DistributedDataParallel`` over each trainable module (the policy, a
separate critic, the value head's own layer; for a critic that is a second LoRA adapter in the
policy's modules, its adapter's parameters apart from the policy's); every rank holds whole
models and the gradients are all-reduced in backward. ``strategy="fsdp"``: FSDP2's
``fully_shard`` on every decoder layer and then the rest of each model (the policy, the frozen
reference, a separate critic, the value head's layer); each rank holds 1/N of the parameters,
gradients and AdamW state, and gathers a layer's weights only while it runs (bf16 parameters
with float32 gradient reduction on CUDA).

The rollouts are split between the ranks and their losses are normalised by GLOBAL token counts
(``ppolm.parallel.world``); both wrappers average gradients over the ranks, so ``backward``
multiplies the loss by the world size: the reduced gradient is then the sum of the ranks', the
gradient of the whole batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
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
from ppolm.policies.lora import AdapterCritic
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
        adapter_critic = isinstance(critic, AdapterCritic)
        if adapter_critic and self.strategy == "fsdp":
            raise ConfigError("a critic that is a second LoRA adapter (ValueHead.adapter) runs "
                              "the policy's own modules, which FSDP2 shards once, for the "
                              "policy; use distributed='ddp' (LoRA's reference needs it too).")
        if critic is not None and not adapter_critic and not any(True for _ in
                                                                 critic.parameters()):
            raise ConfigError(f"this critic ({type(critic).__name__}) owns no parameters: it "
                              "runs another model's modules, which DDP and FSDP2 wrap with "
                              "that model; under torchrun use ValueHead.separate, a value head "
                              "on the policy's states, or ValueHead.adapter.")
        # Every rank starts from rank 0's weights (models built without a common seed too);
        # models built on the meta device read the same files on every rank instead.
        broadcast_from_main(policy, reference, value_head)
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
            if isinstance(critic, AdapterCritic):
                self._wrap_adapter_critic(policy, critic)
            else:
                self._wrap(policy)
                if critic is not None:
                    self._wrap(critic)
            if value_head is not None:      # (a separate critic's are the critic's wrapper's)
                self._wrap(value_head, ignore=_named(value_head, "critic."))
        # FSDP2 replaces the parameters by sharded ones: collect them after wrapping.
        self.trained = trained_modules(policy, value_head)
        self.params = trainable_parameters(policy, value_head)
        self.max_grad_norm = optim.max_grad_norm
        self.optimizer = make_adamw(self.params, optim)

    # --- wrapping --------------------------------------------------------------------------
    def _wrap(self, module: nn.Module, ignore: list[str] | None = None,
              runs: nn.Module | None = None) -> None:
        """DDP over ``module`` (the wrapper of ``runs``, default ``module``, in ``_module``),
        leaving out the parameters and buffers named in ``ignore`` (another wrapper's)."""
        if not any(p.requires_grad for p in module.parameters()):
            return
        if ignore:
            DDP._set_params_and_buffers_to_ignore_for_model(module, ignore)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # find_unused_parameters: a critic's LM head, say, takes no part in its loss.
        self._wrapped[id(runs or module)] = DDP(module, device_ids=ids, broadcast_buffers=False,
                                                find_unused_parameters=True)

    def _wrap_adapter_critic(self, policy: Policy, critic: AdapterCritic) -> None:
        """A critic that is a second LoRA adapter runs the policy's modules, whose parameters
        its adapter's are. One DDP over the policy would see the critic's backward without
        the critic's forward having gone through it (its reducer then refuses the gradients
        as unexpected); so the policy's DDP leaves the critic adapter's parameters out, and a
        DDP of their own (``_AdapterWeights``) reduces them and runs the critic."""
        own = {id(p) for p in critic.adapter_parameters()}
        self._wrap(policy, ignore=[n for n, p in policy.named_parameters() if id(p) in own])
        self._wrap(_AdapterWeights(critic), runs=critic)

    def _shard(self, model: Policy) -> None:
        """``fully_shard`` each decoder layer, then the model (its embeddings, final norm and
        head); one forward over a one-token batch initialises FSDP2 from the model's root (the
        sampler later calls the trunk without going through the root's forward)."""
        shard_layers(model, model.layers(), self.device, self.bf16)
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
        fully_shard(linear, **mixed_precision(self.device, self.bf16))

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


class _AdapterWeights(nn.Module):
    """A critic adapter's parameters as a module of their own, for DDP to reduce; its forward
    is the critic's (the critic is held, not registered: the policy owns its modules)."""

    critic: AdapterCritic

    def __init__(self, critic: AdapterCritic) -> None:
        super().__init__()
        self.adapter = nn.ParameterList(critic.adapter_parameters())
        object.__setattr__(self, "critic", critic)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.critic(*args, **kwargs)


def broadcast_from_main(*modules: nn.Module | None) -> None:
    """Set every rank's parameters and buffers of ``modules`` to rank 0's (all ranks together;
    tensors on the meta device are left out: each rank reads those from the same files)."""
    for module in modules:
        if module is not None:
            for t in module.state_dict().values():
                if not t.is_meta:
                    dist.broadcast(t, src=0)


def mixed_precision(device: torch.device, bf16: bool) -> dict[str, Any]:
    """``fully_shard``'s mixed precision: bf16 parameters with float32 gradient reduction on
    CUDA when ``bf16``; nothing otherwise."""
    if device.type != "cuda" or not bf16:
        return {}
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                              reduce_dtype=torch.float32)}


def shard_layers(model: nn.Module, layers: Iterable[nn.Module], device: torch.device,
                 bf16: bool) -> None:
    """FSDP2's ``fully_shard`` on each of ``layers`` (a decoder's layers: each gathered only
    while it runs), then on ``model`` (the rest: embeddings, final norm, heads)."""
    from torch.distributed.fsdp import fully_shard
    kw = mixed_precision(device, bf16)
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)


def _named(module: nn.Module, prefix: str) -> list[str]:
    """The names of ``module``'s parameters and buffers that start with ``prefix``."""
    return [n for n, _ in [*module.named_parameters(), *module.named_buffers()]
            if n.startswith(prefix)]


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
