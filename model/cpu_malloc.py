"""glibc's malloc set up for training on the CPU: freed memory is kept for reuse, not handed back.

A step at 64×64 allocates and frees activations of tens to hundreds of MB. glibc serves blocks
that large with their own mmap, unmapped when freed, and trims its heap back to the kernel, so
each step makes the kernel map and zero fresh pages again (20× the page faults of kept memory,
tests/model_core/test_cpu_malloc.py): on 2 cores that was half of a `nih_pa_wo_pg` step, seen as
system time. Served from one heap that is never trimmed, a step reuses the pages of the last and
`nih_pa_wo_pg` trains ~2× faster (benchmarks/train_throughput.py). The price: the process keeps
its peak memory.

Threads keep the malloc arena they first used, so the setting is best made at process start:
`GLIBC_TUNABLES` in the environment (the deployments and the torchrun ranks get it), else
`keep_freed_memory()` before the threads that train are started (the `dpa` CLI, a CPU trainer).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

_MMAP_MAX, _TRIM_THRESHOLD, _ARENA_MAX = -4, -1, -8  # glibc's M_* parameter numbers (malloc.h)
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int
GLIBC_TUNABLES = f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={_NEVER_TRIM}:glibc.malloc.arena_max=1"
log = logging.getLogger(__name__)


@functools.cache
def keep_freed_memory() -> bool:
    """No mmap per large block, no trimming, one arena for every thread; False where the C library
    is not glibc (macOS, musl), which then keeps its own behaviour."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(libc.mallopt(param, value) == 1 for param, value in
                 ((_MMAP_MAX, 0), (_TRIM_THRESHOLD, _NEVER_TRIM), (_ARENA_MAX, 1)))
    except (OSError, AttributeError):
        ok = False
    log.debug("malloc keeps freed memory for reuse: %s", ok)
    return ok
