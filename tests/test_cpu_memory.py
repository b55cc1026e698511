"""The CPU memory settings cut page faults (each case in a fresh process: both are process-wide
and torch reads its huge-page setting once)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ppolm
from ppolm import PPOConfig

linux_glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")

# Four 20 MiB blocks made, then freed; glibc's own counters (mallinfo2) say where they came from.
_MALLOC_PROBE = """
import ctypes
import ppolm
import torch
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if {tune}:
    assert ppolm.tune_cpu_allocator()
blocks = [torch.ones(5 * 2**20) for _ in range(4)]
mapped = libc.mallinfo2().hblkhd          # bytes in blocks mapped on their own
del blocks
print(mapped >> 20, libc.mallinfo2().arena >> 20)   # MiB mapped; MiB of heap after the free
"""


def _malloc_probe(tune: bool) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _MALLOC_PROBE.format(tune=tune)],
                         capture_output=True, text=True, check=True, env=_env("0"))
    mapped, heap = out.stdout.split()[-2:]
    return int(mapped), int(heap)


@linux_glibc
def test_tuned_allocator_serves_large_blocks_from_its_heap_and_keeps_them() -> None:
    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc before 2.33 has no mallinfo2")
    mapped, _ = _malloc_probe(tune=False)
    assert mapped >= 80                     # by default: four fresh mappings, faulted page by page
    mapped, heap = _malloc_probe(tune=True)
    assert mapped < 10                      # from the heap instead ...
    assert heap >= 80                       # ... and still there after the free, for reuse


# Huge pages: two 40 MiB blocks made and freed 30 times, page faults counted over the last 20
# rounds. Blocks over 32 MiB are always mapped afresh by glibc, so each round faults 80 MiB in
# again: 20,480 pages of 4 KiB, or 40 of 2 MiB.
_PROBE = """
import os, resource
import ppolm
import torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(30):
    if i == 10:
        start = faults()
    blocks = [torch.ones(10 * 2**20) for _ in range(2)]
    del blocks
print(os.environ["THP_MEM_ALLOC_ENABLE"], faults() - start)
"""


def _env(thp: str | None) -> dict[str, str]:
    """This environment with THP_MEM_ALLOC_ENABLE=``thp`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    return env if thp is None else {**env, "THP_MEM_ALLOC_ENABLE": thp}


def _probe(thp: str | None) -> tuple[str, int]:
    """(THP_MEM_ALLOC_ENABLE after `import ppolm`, page faults) in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         check=True, env=_env(thp))
    value, faults = out.stdout.split()[-2:]
    return value, int(faults)


@linux_glibc
def test_import_asks_torch_for_huge_pages_unless_the_user_said_no() -> None:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off in this kernel")
    value, faults = _probe(None)
    assert value == "1"
    refused, faults_4k = _probe("0")
    assert refused == "0"                   # the user's own setting wins over ppolm's
    # Each round faults its pages in again, 4 KiB at a time without huge pages; with them one
    # fault per 2 MiB page (where the kernel finds one free).
    assert faults_4k > 20 * 20_000 * 0.9
    assert faults < faults_4k / 4


def test_the_setting_is_on_by_default_and_exported() -> None:
    assert PPOConfig().tune_cpu_allocator is True
    assert PPOConfig(tune_cpu_allocator=False).tune_cpu_allocator is False
    assert callable(ppolm.tune_cpu_allocator) and callable(ppolm.request_huge_pages)
