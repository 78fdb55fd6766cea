"""Memory handed back to the OS when idle, and not handed back and forth while busy.

Left alone, glibc does both wrong for this daemon. It raises its mmap threshold each time a large block is freed
(model loading, KV snapshots), after which blocks of up to 32 MB come from the heap and stay resident once freed.
And in a worker thread's arena, the vocabulary-sized arrays a decoding step needs (1 MB each with Gemma's 262k
tokens) were given back after each request and faulted in again by the next: ~1,300 page faults, ~5 MB zeroed,
per routed request, which the same route in a main thread never paid. So: fixed thresholds (blocks under 4 MB
are reused from the heap, larger ones mapped and unmapped; the heap is not trimmed after every free), and an
explicit `trim` when the workers have been idle for a second. Elsewhere (musl, macOS) these calls do not exist
and this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20  # above a few vocabulary-sized arrays: those are reused, larger blocks are mapped
TRIM_THRESHOLD = 64 << 20  # free heap kept for reuse while busy; `trim` gives it back when idle


def _libc() -> Any | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def fix_thresholds() -> bool:
    """Fixed mmap and trim thresholds; call before loading models. True if glibc took them."""
    fn = getattr(_LIBC, "mallopt", None)
    if fn is None:
        return False
    return bool(fn(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(fn(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def trim() -> bool:
    """Return the heap's free pages to the OS (~1 ms); for idle moments. True if memory was released."""
    fn = getattr(_LIBC, "malloc_trim", None)
    return bool(fn(0)) if fn is not None else False
