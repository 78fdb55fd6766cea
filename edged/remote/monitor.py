"""Is the tier-3 node reachable? A circuit breaker fed by probes and by real requests, and the thread that probes.

States: `unknown` (just started, nothing tried yet), `closed` (up: requests go through), `open` (down: requests
are not tried; the command falls back or is queued), `half_open` (a probe succeeded after an outage: requests go
through, and the first failure opens the breaker again, the first success closes it). `failure_threshold`
consecutive failures open a closed breaker.

While the node is down the monitor probes `GET <url>/models` with exponential backoff (with jitter, capped); while
it is up it probes every `probe_interval_s`, but only when real requests have not recently shown it alive, and
never while one of ours is in flight: llama.cpp's server answers /models only between generations, so a probe
behind a long generation would time out and count as a failure of a healthy node.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger(__name__)

UNKNOWN, CLOSED, OPEN, HALF_OPEN = "unknown", "closed", "open", "half_open"


class Breaker:
    """The state machine alone (thread-safe, clock injectable): unit-testable without a network."""

    def __init__(self, failure_threshold: int = 3, clock: Callable[[], float] = time.time,
                 on_change: Callable[[str, str, dict[str, Any]], None] | None = None) -> None:
        self.failure_threshold = failure_threshold
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self.state = UNKNOWN
        self.failures = 0  # consecutive
        self.total_failures = 0
        self.last_ok: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.opened_at: float | None = None
        self.in_flight = 0

    def available(self) -> bool:
        return self.state in (CLOSED, HALF_OPEN)

    def _set(self, state: str) -> None:
        old, self.state = self.state, state
        if state == OPEN and old != OPEN:
            self.opened_at = self._clock()
        if old != state and self._on_change is not None:
            self._on_change(old, state, self._snapshot())

    def success(self, probe: bool = False) -> None:
        """A request (or probe) got a well-formed answer. A probe after an outage only half-opens the breaker."""
        with self._lock:
            self.failures = 0
            self.last_ok = self._clock()
            if probe and self.state == OPEN:
                self._set(HALF_OPEN)
            else:
                self._set(CLOSED)

    def failure(self, error: str) -> None:
        with self._lock:
            self.failures += 1
            self.total_failures += 1
            self.last_error = error
            self.last_error_at = self._clock()
            if self.state in (UNKNOWN, HALF_OPEN) or self.failures >= self.failure_threshold:
                self._set(OPEN)

    def begin(self) -> None:
        with self._lock:
            self.in_flight += 1

    def end(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "available": self.available(),
            "failures": self.failures,
            "failures_total": self.total_failures,
            "last_ok": self.last_ok,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "opened_at": self.opened_at if self.state == OPEN else None,
            "in_flight": self.in_flight,
        }

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot()


def backoff_delays(first: float, cap: float, jitter: float = 0.2,
                   rand: Callable[[], float] = random.random) -> Callable[[int], float]:
    """attempt -> delay: first * 2**attempt, capped, +/- `jitter` so a fleet does not probe in lockstep."""
    def delay(attempt: int) -> float:
        base = min(cap, first * (2 ** min(attempt, 30)))
        return max(0.05, base * (1 + jitter * (2 * rand() - 1)))
    return delay


class Monitor:
    """The probing thread around a Breaker. `probe()` returns None when the node answered, else an error text."""

    def __init__(self, breaker: Breaker, probe: Callable[[], str | None], *, interval_s: float = 15.0,
                 backoff_first_s: float = 0.5, backoff_max_s: float = 60.0) -> None:
        self.breaker = breaker
        self._probe = probe
        self.interval_s = interval_s
        self._delay = backoff_delays(backoff_first_s, backoff_max_s)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.probes = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="remote-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Probe now (e.g. after a failed request, to learn sooner whether the node is gone)."""
        self._wake.set()

    def probe_once(self) -> bool:
        self.probes += 1
        try:
            error = self._probe()
        except Exception as exc:  # a probe bug must not kill the thread
            error = f"probe failed: {type(exc).__name__}: {exc}"
        if error is None:
            self.breaker.success(probe=True)
            return True
        self.breaker.failure(error)
        return False

    def _should_probe(self) -> bool:
        b = self.breaker
        if not b.available():
            return True
        if b.in_flight:
            return False
        if b.failures:  # a request failed since the last success: find out now
            return True
        recently_ok = b.last_ok is not None and time.time() - b.last_ok < self.interval_s
        return not (recently_ok and b.state == CLOSED)

    def _run(self) -> None:
        down_attempt = 0
        while not self._stop.is_set():
            if self._should_probe():
                self.probe_once()
            if self.breaker.available():
                down_attempt = 0
                wait = self.interval_s
            else:
                wait = self._delay(down_attempt)
                down_attempt += 1
            self._wake.wait(wait)
            self._wake.clear()

    def state(self) -> dict[str, Any]:
        snap = self.breaker.snapshot()
        snap["probes"] = self.probes
        return snap
