"""Ask glibc's malloc to keep freed memory for reuse instead of returning it to the kernel.

A PPO update on CPU frees and reallocates the same tensors every minibatch (activations, input
gradients, weight gradients). By default glibc gives large blocks back to the kernel as soon as
they are freed (``munmap``, or a trim of the heap's top), so the next minibatch gets fresh pages
that are page-faulted in and zeroed again. With no block given its own ``mmap``
(``M_MMAP_MAX`` 0), a large top pad (the heap grows in big steps) and a trim threshold that is
never reached (the
heap is not shrunk), freed blocks are reused: no faults after the first minibatch
(docs/performance.md has the figures). The price: the process keeps its peak memory
after a big free, as most training processes do anyway.

Process-wide and not undone, so opt-in: the fast CPU engine applies it only with
``PPOConfig.keep_freed_memory=True`` (the ``ppolm train`` command's choice).
The same through the environment, before Python starts: ``MALLOC_MMAP_MAX_=0
MALLOC_TOP_PAD_=536870912 MALLOC_TRIM_THRESHOLD_=2147483647``. No-op outside Linux with
glibc.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

TOP_PAD = 512 << 20                 # grow the heap 512 MiB at a time (address space, not RSS)
TRIM_THRESHOLD = (1 << 31) - 1      # the largest value mallopt takes: the heap is not shrunk

_applied = False


def keep_freed_memory() -> bool:
    """Apply the settings (once per process); True when they are in effect (Linux, glibc)."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):      # glibc only
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # No block gets its own mmap (a freed one would go straight back to the kernel): every block
    # comes from the heap, which grows by the top pad and is never trimmed.
    _applied = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_MAX, 0), (_M_TOP_PAD, TOP_PAD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    return _applied


def applied() -> bool:
    """Whether this process's malloc was told to keep freed memory (``keep_freed_memory``)."""
    return _applied
