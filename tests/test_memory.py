"""ppolm.engines.fast_cpu.memory: with malloc keeping freed memory, a block freed and allocated
again is reused (no page faults the second time), where glibc's default hands it back to the
kernel; the fast engine patches linears for in-place gradients only without it."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from ppolm.engines.fast_cpu.memory import keep_freed_memory

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc only")


def faults_of_churn(mib: int = 64, rounds: int = 3) -> int:
    """Page faults of allocating, touching and freeing a ``mib`` MiB tensor ``rounds`` times."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        t = torch.empty(mib << 18)                 # float32: 4 bytes each
        t.fill_(1.0)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_memory_is_reused():
    pages = (64 << 20) // resource.getpagesize()
    assert keep_freed_memory() and keep_freed_memory()        # applied, and idempotent
    faults_of_churn()                                         # the heap grows once
    assert faults_of_churn() < pages // 10                    # then no fresh pages


def test_engine_uses_linear_buffers_only_without_it():
    from test_grad_buffers import build
    kept = build("hf", keep_freed_memory=True).engine.buffers
    assert not kept.linears and kept.embeddings
    assert build("hf", keep_freed_memory=False).engine.buffers.linears
