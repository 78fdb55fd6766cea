"""Hangs and faults: a request stuck past its deadline stops the watchdog pings (real NOTIFY_SOCKET); a model that
fails to load leaves the daemon serving direct calls as `degraded`; a truncated or corrupted GGUF is refused with a
clear error; a full disk under the answered store and the log costs log lines and redelivery protection, never an
answer, and corrupts nothing already stored."""

from __future__ import annotations

import itertools
import json
import resource
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests import conftest
from tests.test_lifecycle import NotifySocket

pytestmark = pytest.mark.mqtt

ADD = {"name": "add_numbers", "arguments": {"a": 25, "b": 17}}


@pytest.mark.slow
def test_stuck_request_stops_the_watchdog_and_a_restart_brings_the_device_back(daemon_factory, client,
                                                                               tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        d = daemon_factory.make("dev1", start=False, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="400000",
                                EDGED_TOOLS__ENABLE_DEBUG_TOOLS="true")
        d.start()
        notify.wait(lambda m: "READY=1" in m.splitlines())
        # stuck 7 s with a 0.5 s deadline: past deadline + 5 s of grace the worker counts as hung
        t_sent = time.monotonic()
        stuck = client.send("dev1", {"id": "stuck", "call": {"name": "debug_sleep", "arguments": {"seconds": 7}},
                                     "deadline_ms": 500})
        # the other worker still serves while the first is stuck
        assert client.request("dev1", {"id": "meanwhile", "call": ADD}, timeout=10)["status"] == "ok"
        hung = d.wait_log("worker_hung", timeout=15)
        assert hung["level"] == "error"
        result = client.wait(stuck, timeout=15)
        assert result["status"] == "ok" and result["calls"][0]["result"] == {"slept_s": 7}
        time.sleep(1.0)
        pings = [t for t, m in notify.messages if m == "WATCHDOG=1" and t > t_sent]
        gaps = [(b - a, a - t_sent) for a, b in itertools.pairwise(pings)]
        longest, started = max(gaps)
        # systemd (WatchdogSec=0.4 s here) would have killed it: no ping for well over the interval
        assert longest > 1.0, gaps
        assert 5.0 < started + 0.2 < 7.0, (longest, started)
        assert pings[-1] > t_sent + 7.0, "pings resumed once the worker was free"
        # what systemd does then: SIGABRT and a restart; the device comes back and serves
        d.signal(6)
        d.proc.wait(10)
        d.start()
        assert client.request("dev1", {"id": "back", "call": ADD}, timeout=15)["status"] == "ok"
    finally:
        notify.close()


def test_debug_tools_are_off_by_default(daemon, client) -> None:
    r = client.request("dev1", {"id": "d", "call": {"name": "debug_sleep", "arguments": {"seconds": 1}}})
    assert r["status"] == "error" and r["error"]["code"] == "unknown_tool"


def _status(listen) -> dict[str, object]:
    return listen("edged/dev1/status").wait_json("edged/dev1/status")  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_a_model_that_fails_to_load_leaves_the_daemon_degraded_and_serving(daemon_factory, client, listen,
                                                                           tmp_path: Path, kind: str) -> None:
    bad = tmp_path / "bad.gguf"
    if kind == "truncated" and conftest.GEMMA.exists():
        with conftest.GEMMA.open("rb") as src:
            bad.write_bytes(src.read(1 << 20))  # a real GGUF header, then nothing: a torn copy
    else:
        bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 4096)
    d = daemon_factory.make("dev1", EDGED_MODELS__ROUTER=str(bad))
    status = _status(listen)
    assert status["state"] == "degraded", status
    router = status["models"]["router"]  # type: ignore[index]
    assert router["state"] == "failed" and router["error"], router
    assert client.request("dev1", {"id": "direct", "call": ADD})["calls"][0]["result"] == {"sum": 42}
    q = client.request("dev1", {"id": "q", "query": "What is 2 plus 2?"})
    assert q["status"] == "error" and q["error"]["code"] == "no_model"
    time.sleep(1.0)
    assert d.proc.poll() is None  # serving, not exiting into a systemd restart loop
    assert len([e for e in d.logs() if e.get("event") == "ready"]) == 1


def test_a_manifest_model_with_the_wrong_bytes_is_refused_before_loading(daemon_factory, listen,
                                                                          tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "gemma-3-270m-q4_k_m.gguf").write_bytes(b"GGUF" + b"\x00" * 1000)  # truncated: wrong size
    daemon_factory.make("dev1", EDGED_MODELS__ROUTER="gemma3-270m-q4km", EDGED_MODELS__DIR=str(models))
    router = _status(listen)["models"]["router"]  # type: ignore[index]
    assert router["state"] == "failed", router
    assert "truncated or wrong file" in router["error"] and "expected 253113024" in router["error"], router


@pytest.mark.slow
def test_corrupted_same_size_file_fails_its_sha256(daemon_factory, listen, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    with (models / "gemma-3-270m-q4_k_m.gguf").open("wb") as fh:  # right size, wrong bytes (sparse: cheap)
        fh.write(b"GGUF")
        fh.truncate(253_113_024)
    daemon_factory.make("dev1", EDGED_MODELS__ROUTER="gemma3-270m-q4km", EDGED_MODELS__DIR=str(models))
    router = _status(listen)["models"]["router"]  # type: ignore[index]
    assert router["state"] == "failed" and "does not match the manifest" in router["error"], router


def test_disk_full_for_the_store_and_the_log(daemon_factory, client, monkeypatch, tmp_path: Path) -> None:
    """RLIMIT_FSIZE stands in for a full disk: past it, every write of the daemon fails (EFBIG; Python ignores
    SIGXFSZ), the answered store's and the log's alike. Commands are still answered, exactly once each."""
    limit = 160 << 10
    real_popen = subprocess.Popen

    def popen(args, **kw):  # type: ignore[no-untyped-def]
        if "edged" in args:
            kw["preexec_fn"] = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return real_popen(args, **kw)

    monkeypatch.setattr(conftest.subprocess, "Popen", popen)
    d = daemon_factory.make("dev1")
    monkeypatch.undo()
    n = 2000  # ~100 bytes of log each: the log outgrows the limit too
    corrs = {client.send("dev1", {"id": f"f{i}", "call": ADD}): f"f{i}" for i in range(n)}
    results = {cid: client.wait(corr, timeout=30) for corr, cid in corrs.items()}
    assert all(r["status"] in ("ok", "busy") and r["id"] == cid for cid, r in results.items())
    assert sum(r["status"] == "ok" for r in results.values()) > 0  # the rest may be busy: a burst, on 2 cores
    time.sleep(0.5)
    assert client._results == {}  # exactly one each
    assert d.proc.poll() is None
    log_text = d.log_path.read_text(errors="replace")
    assert len(log_text.encode()) <= limit
    assert len(log_text.encode()) > limit - 1024, "the log never filled: the test proves less than it says"
    assert client.request("dev1", {"id": "after-full", "call": ADD})["status"] == "ok"
    failed = [e for e in d.logs() if e.get("event") == "answered_store_failed"]
    assert failed and failed[0]["level"] == "error" and failed[0]["error"], "no clear error for the full disk"
    assert d.stop() == 0
    # what the store holds is intact and readable
    db = sqlite3.connect(tmp_path / "state-dev1" / "answered.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = db.execute("SELECT result FROM answered").fetchall()
    assert 0 < len(rows) < n
    assert all(json.loads(r[0])["status"] == "ok" for r in rows)
    print(f"\nstore rows before the disk filled: {len(rows)}/{n}; log {len(log_text)} bytes; "
          f"first store error: {failed[0]['error']}")


def test_read_only_state_dir_still_serves(daemon_factory, client, tmp_path: Path) -> None:
    state = tmp_path / "ro-state"
    state.mkdir()
    state.chmod(0o500)
    try:
        d = daemon_factory.make("dev1", EDGED_STATE__DIR=str(state))
        if not any(e.get("event") == "answered_store_unavailable" for e in d.logs()):
            pytest.skip("running as root: a read-only directory is writable anyway")
        assert client.request("dev1", {"id": "ro", "call": ADD})["status"] == "ok"
    finally:
        state.chmod(0o700)
