"""The compute thread: every model step of the process runs on one thread, whoever asks for it."""

from __future__ import annotations

import threading

import pytest

from edged.llm.compute import ComputeThread


def test_calls_from_many_threads_run_on_one_thread_in_order() -> None:
    compute = ComputeThread(name="test-compute")
    seen: list[tuple[int, int]] = []

    def step(i: int) -> int:
        seen.append((threading.get_ident(), i))
        return i * 2

    results: dict[int, int] = {}

    def worker(k: int) -> None:
        for i in range(k * 100, k * 100 + 50):
            results[i] = compute.run(step, i)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: i * 2 for k in range(4) for i in range(k * 100, k * 100 + 50)}
    idents = {ident for ident, _ in seen}
    assert len(idents) == 1 and threading.get_ident() not in idents
    for k in range(4):  # each caller's own calls kept their order
        mine = [i for _, i in seen if k * 100 <= i < k * 100 + 50]
        assert mine == sorted(mine)


def test_errors_reach_the_caller_and_the_thread_goes_on() -> None:
    compute = ComputeThread(name="test-compute")

    def fail() -> None:
        raise RuntimeError("llama_decode returned 1")

    with pytest.raises(RuntimeError, match="returned 1"):
        compute.run(fail)
    assert compute.run(lambda: 42) == 42


def test_a_call_made_by_a_call_runs_at_once() -> None:
    compute = ComputeThread(name="test-compute")
    inner = compute.run(lambda: compute.run(threading.get_ident))
    assert inner == compute.run(threading.get_ident)
