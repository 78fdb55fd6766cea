"""One thread runs every llama.cpp model step in the process.

llama.cpp's CPU backend (the OpenMP build) synchronizes its threads with OpenMP barriers, and libgomp gives each
thread that calls into it a team of its own. Once there are more such threads than CPUs (the daemon's two workers
on a 2-core device are enough), libgomp stops spinning at barriers and puts waiting threads to sleep in the kernel
at each of the hundreds of barriers in a model step. Measured here: routing from two workers in turn took 1.6x as
long as from one. With every step run by this one thread, the process has one team however many workers it has.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class _Job:
    __slots__ = ("args", "done", "error", "fn", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Lock()  # held until the job has run: a lock hand-over is CPython's cheapest wake-up
        self.done.acquire()


class ComputeThread:
    """Runs calls on one long-lived thread, in the order they come; the caller waits for its own call."""

    def __init__(self, name: str = "llama-compute") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._ident: int | None = None
        self._start = threading.Lock()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        if threading.get_ident() == self._ident:  # already on it (a call made by a call)
            return fn(*args)
        if self._ident is None:
            self._spawn()
        job = _Job(fn, args)
        self._jobs.put(job)
        job.done.acquire()
        if job.error is not None:
            raise job.error
        result: T = job.result
        return result

    def _spawn(self) -> None:
        with self._start:
            if self._ident is None:
                started = threading.Event()
                thread = threading.Thread(target=self._loop, args=(started,), name=self._name, daemon=True)
                thread.start()
                started.wait()

    def _loop(self, started: threading.Event) -> None:
        self._ident = threading.get_ident()
        started.set()
        while True:
            job = self._jobs.get()
            try:
                job.result = job.fn(*job.args)
            except BaseException as exc:  # handed to the caller, who raises it in its own thread
                job.error = exc
            finally:
                job.done.release()


COMPUTE = ComputeThread()
