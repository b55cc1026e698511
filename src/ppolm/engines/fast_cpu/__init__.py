"""The single-process CPU engine (docs/performance.md)."""

from ppolm.engines.fast_cpu.engine import FastCPUEngine, FastCPUSettings

__all__ = ["FastCPUEngine", "FastCPUSettings"]
