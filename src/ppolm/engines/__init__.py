"""Engines: how the Trainer's numbers are computed (see ``ppolm.engines.base``)."""

from ppolm.engines.base import Engine, OptimizerSettings, ResponseForward, Sequences, StepResult
from ppolm.engines.fast_cpu import FastCPUEngine, FastCPUSettings
from ppolm.engines.plain import PlainEngine

__all__ = ["Engine", "FastCPUEngine", "FastCPUSettings", "OptimizerSettings", "PlainEngine",
           "ResponseForward", "Sequences", "StepResult"]
