"""Which engine and device a run uses."""

from __future__ import annotations

import os

import torch

from ppolm.engines.base import Engine
from ppolm.engines.fast_cpu import FastCPUEngine
from ppolm.engines.plain import PlainEngine
from ppolm.errors import ConfigError
from ppolm.training.config import PPOConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_engine(config: PPOConfig, device: torch.device) -> Engine:
    """The engine ``config.engine`` names; 'auto': fast_cpu for one process on a CPU, plain
    elsewhere (CUDA, or several processes: WORLD_SIZE > 1 as torchrun sets it)."""
    name = config.engine
    if name == "auto":
        one_process = int(os.environ.get("WORLD_SIZE", "1")) <= 1
        name = "fast_cpu" if device.type == "cpu" and one_process else "plain"
    if name == "fast_cpu":
        return FastCPUEngine(config.fast_cpu_settings(), device)
    set_fast = config.fast_cpu_fields_set()
    if set_fast:
        raise ConfigError(f"{', '.join(set_fast)}: fast_cpu engine settings, but this run on "
                          f"{device} uses the plain engine; leave them at their defaults.")
    return PlainEngine(device, bf16=config.bf16)
