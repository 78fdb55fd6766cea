"""Freed memory goes back to the OS when asked, and stays for reuse while busy: the glibc behaviours that kept tens
of MB of the daemon's RSS and cost ~1,300 page faults per routed request, and the fix."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")

PROBE = r"""
import json, sys, psutil
from edged import heap
if sys.argv[1] == "fixed":
    assert heap.fix_thresholds()
proc = psutil.Process()
big = bytearray(20 << 20); del big  # like llama.cpp buffers: glibc raises its mmap threshold when this is freed
blocks = [bytearray(1 << 20) for _ in range(150)]  # 1 MB buffers, like KV snapshots and logits copies
pin = bytearray(256 << 10)  # something still in use above them: the heap's top cannot simply shrink
before = proc.memory_info().rss
del blocks
freed = proc.memory_info().rss
trimmed = heap.trim()
after = proc.memory_info().rss
print(json.dumps({"kept_mb": (freed - before + (150 << 20)) / 2**20, "after_trim_drop_mb": (freed - after) / 2**20,
                  "trimmed": trimmed}))
"""


def _run(mode: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_freed_buffers_stay_resident_until_trimmed() -> None:
    r = _run("default")
    assert r["kept_mb"] > 100, r  # freed, yet still resident: the heap does not shrink by itself
    assert r["trimmed"] and r["after_trim_drop_mb"] > 100, r


def test_fixed_thresholds_keep_buffers_for_reuse_until_trimmed() -> None:
    r = _run("fixed")
    assert r["kept_mb"] > 100, r  # 1 MB blocks come from the heap and stay there for the next request
    assert r["trimmed"] and r["after_trim_drop_mb"] > 100, r  # until the idle trim gives them back
