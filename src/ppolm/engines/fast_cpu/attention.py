"""SDPA attention of ``transformers`` models in float32 under CPU autocast."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def float32_attention() -> Iterator[None]:
    """While the block runs, ``transformers`` models with SDPA attention take their attention
    on CPU in float32, under CPU autocast too.

    Under CPU autocast (``PPOConfig.cpu_bf16``) SDPA would run in bf16 (autocast casts its
    inputs, and the value projection hands it bf16), and PyTorch's CPU attention kernels are
    slower in bf16 than in float32 (docs/performance.md). Done through the
    ``AttentionInterface`` registry of ``transformers`` (this block's own override, restored on
    exit)."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    except (ImportError, KeyError):  # a transformers without the registry: attention as it is
        yield
        return

    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, **kwargs: Any) -> Any:
        if query.device.type == "cpu" and (torch.is_autocast_enabled("cpu") or any(
                t.dtype in (torch.bfloat16, torch.float16) for t in (query, key, value))):
            if attention_mask is not None and attention_mask.is_floating_point():
                attention_mask = attention_mask.float()
            with torch.autocast("cpu", enabled=False):
                return sdpa(module, query.float(), key.float(), value.float(), attention_mask,
                            **kwargs)
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention          # this instance's own override
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
        if ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa:  # an override made before this block
            ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa




def cpu_bf16_autocast() -> contextlib.ExitStack:
    """CPU bf16 autocast with attention kept in float32 (``float32_attention``): what
    ``cpu_bf16`` runs under, in the fast engine and in the reward-model trainer."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    stack.enter_context(float32_attention())
    return stack


def cpu_bf16_supported() -> bool:
    """Whether PyTorch's CPU kernels support bf16 products on this CPU."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False
