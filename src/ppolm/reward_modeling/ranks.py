"""A reward model under torchrun (``RewardModelConfig.distributed``): DDP, every rank holding
the whole model, or FSDP2, each rank holding 1/N of the weights, gradients and AdamW state,
sharded with the distributed engine's own helpers (``ppolm.engines.distributed``: each decoder
layer, then the rest). Both average the ranks' gradients, so equal shares of a batch give the
whole batch's gradient. Under FSDP2 the model is its own wrapper (``fully_shard`` changes it in
place); its whole weights are gathered to rank 0 for ``save_model``.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn

from ppolm.config.reward_model import FSDP_LORA
from ppolm.config.sections import Distributed
from ppolm.engines.distributed import broadcast_from_main, shard_layers
from ppolm.errors import ConfigError
from ppolm.policies.lora import is_peft
from ppolm.policies.reward_model import RewardModel


def wrap(model: RewardModel, strategy: Distributed, device: torch.device,
         bf16: bool) -> nn.Module:
    """The module the training passes call: DDP's wrapper of ``model``, or under FSDP2
    ``model`` itself, sharded in place after every rank took rank 0's weights (FSDP2 shards
    each rank's own copy; DDP broadcasts rank 0's itself). The parameters to optimise are
    ``model``'s after this call (FSDP2 replaces them by their shards)."""
    if strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if is_peft(model.trunk):
        raise ConfigError(FSDP_LORA)
    if not model.layers():
        raise ConfigError(f"distributed='fsdp' shards a trunk's decoder layers one by one and "
                          f"found none in {type(model.base_trunk).__name__}; use "
                          "distributed='ddp'.")
    broadcast_from_main(model)
    shard_layers(model, model.layers(), device, bf16)
    return model


def clip_gradients(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Clip the global gradient norm to ``max_norm`` (None: no clipping); returns the norm
    before clipping (under FSDP2 over every rank's shards)."""
    norm: Any = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    full = getattr(norm, "full_tensor", None)          # a DTensor when FSDP2 shards them
    return float(full() if full is not None else norm)


def reshard(model: nn.Module, sharded: bool) -> None:
    """Under FSDP2, free the root's gathered weights (embeddings, final norm, head), which a
    forward without backward leaves gathered: weights loaded into the shards afterwards (a
    resume) then reach the next forward."""
    if sharded:
        model.reshard()  # type: ignore[operator]


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """The whole ``state_dict()`` of a model sharded by FSDP2, on rank 0's CPU (empty on the
    other ranks); every rank calls it together."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    return cast(dict[str, Tensor], state)
