"""Telemetry: the daemon's own counters and latencies, and the device's resources from psutil."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Metrics:
    """Counters the pipeline bumps per request; a snapshot goes into every telemetry message."""

    def __init__(self, window: int = 1000) -> None:
        self._lock = threading.Lock()
        self.by_status: Counter[str] = Counter()
        self.by_tier: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.escalations: Counter[str] = Counter()
        self._latencies: deque[float] = deque(maxlen=window)
        self.started = time.monotonic()

    def record(self, status: str, tier: int | None, latency_ms: float, error_code: str | None = None) -> None:
        with self._lock:
            self.by_status[status] += 1
            if tier is not None:
                self.by_tier[str(tier)] += 1
            if error_code:
                self.errors[error_code] += 1
            self._latencies.append(latency_ms)

    def record_escalation(self, reason: str) -> None:
        with self._lock:
            self.escalations[reason] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            latencies = list(self._latencies)
            return {
                "requests": dict(self.by_status),
                "requests_total": sum(self.by_status.values()),
                "tiers": dict(self.by_tier),
                "errors": dict(self.errors),
                "escalations": dict(self.escalations),
                "latency_ms": {
                    "p50": percentile(latencies, 50),
                    "p95": percentile(latencies, 95),
                    "window": len(latencies),
                },
            }


def _temperatures() -> dict[str, float]:
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return {}
    try:
        sensors = reader()
    except OSError:
        return {}
    return {
        f"{chip}/{entry.label or i}": entry.current
        for chip, entries in sensors.items()
        for i, entry in enumerate(entries)
    }


class ResourceSampler:
    """psutil readings of the device and this process; cpu_percent is measured between two calls."""

    def __init__(self, disk_path: Callable[[], Path]) -> None:
        self._proc = psutil.Process(os.getpid())
        self._disk_path = disk_path
        psutil.cpu_percent(None)
        self._proc.cpu_percent(None)

    def sample(self) -> dict[str, Any]:
        mem = psutil.virtual_memory()
        path = self._disk_path()
        while not path.exists() and path != path.parent:
            path = path.parent
        disk = psutil.disk_usage(str(path))
        return {
            "cpu_pct": psutil.cpu_percent(None),
            "process_cpu_pct": self._proc.cpu_percent(None),
            "load_avg": list(os.getloadavg()),
            "mem_total_bytes": mem.total,
            "mem_available_bytes": mem.available,
            "rss_bytes": self._proc.memory_info().rss,
            "temperatures_c": _temperatures(),
            "disk_free_bytes": disk.free,
            "disk_path": str(path),
        }
