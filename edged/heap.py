"""Hand freed memory back to the OS, so the daemon's RSS stays near what it holds, not what it once held.

glibc raises its mmap threshold each time a large block is freed (model loading, KV snapshots, llama.cpp's
buffers): after that, blocks of up to 32 MB come from the heap and stay resident once freed. A device with little
RAM wants them back. Elsewhere (musl, macOS) these calls do not exist and this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, kept fixed: large blocks are mapped, and unmapped when freed


def _libc() -> Any | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def fix_mmap_threshold() -> bool:
    """Keep large allocations out of the heap for good; call before loading models. True if glibc took it."""
    fn = getattr(_LIBC, "mallopt", None)
    return bool(fn(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) if fn is not None else False


def trim() -> bool:
    """Return the heap's free pages to the OS (~1 ms); for idle moments. True if memory was released."""
    fn = getattr(_LIBC, "malloc_trim", None)
    return bool(fn(0)) if fn is not None else False
