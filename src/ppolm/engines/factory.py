"""Which engine and device a run uses."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ppolm.config.ppo import PPOConfig
from ppolm.engines.base import Engine
from ppolm.engines.distributed import DistributedEngine
from ppolm.engines.fast_cpu import FastCPUEngine
from ppolm.engines.plain import PlainEngine
from ppolm.errors import ConfigError
from ppolm.parallel.world import launched


def resolve_device(name: str) -> torch.device:
    """The device ``name`` means; under torchrun 'auto' and 'cuda' mean this rank's GPU
    (``cuda:LOCAL_RANK``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and launched():
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return torch.device(name)


def make_engine(config: PPOConfig, device: torch.device) -> Engine:
    """The engine ``config.engine`` names; 'auto': fast_cpu for one process on a CPU, plain
    elsewhere (CUDA). Under a process group (torchrun, any number of ranks): the plain engine
    over DDP or FSDP2 (``config.distributed``)."""
    name = config.engine
    grouped = dist.is_available() and dist.is_initialized()
    if name == "auto":
        name = "fast_cpu" if device.type == "cpu" and not grouped and not \
            config.gradient_checkpointing else "plain"
    if name == "fast_cpu":
        if grouped:
            raise ConfigError("engine='fast_cpu' runs in one process; under torchrun use "
                              "engine='plain' or 'auto' (DDP or FSDP2, see `distributed`).")
        return FastCPUEngine(config.fast_cpu_settings(), device)
    config.check_fast_cpu_settings(name, why=f"this run's engine on {device}, "
                                   f"'{name}'{' (under torchrun)' if grouped else ''},")
    if grouped:
        return DistributedEngine(device, config.distributed, bf16=config.bf16,
                                 gradient_checkpointing=config.gradient_checkpointing)
    return PlainEngine(device, bf16=config.bf16,
                       gradient_checkpointing=config.gradient_checkpointing)
