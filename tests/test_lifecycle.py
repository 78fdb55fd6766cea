"""Lifecycle through real parts: sd_notify on a real NOTIFY_SOCKET, SIGTERM with work in flight, shared
subscriptions across two daemons, redeliveries answered from the store, commands queued while the daemon is down."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.mqtt

ADD = {"name": "add_numbers", "arguments": {"a": 25, "b": 17}}


class NotifySocket:
    """What systemd does for Type=notify: a datagram socket whose path is passed as NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def wait(self, pred: Any, timeout: float = 15.0) -> tuple[float, str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            hit = next((m for m in list(self.messages) if pred(m[1])), None)
            if hit is not None:
                return hit
            time.sleep(0.02)
        raise TimeoutError(f"no such notification; got {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def _assignments(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.splitlines() if "=" in line)


def test_sd_notify_ready_status_watchdog_stopping(daemon_factory, listen, tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        d = daemon_factory.make("dev1", start=False, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="400000")
        d.start(wait_ready=False)
        t_ready, ready = notify.wait(lambda m: "READY=1" in m.splitlines())
        fields = _assignments(ready)
        assert fields["READY"] == "1" and "connected" in fields["STATUS"] and "requests" in fields["STATUS"]
        # READY=1 only once the broker took us: the retained 'online' is already there
        assert listen("edged/dev1/status").wait_json("edged/dev1/status", timeout=2)["state"] == "online"
        before = [m for t, m in notify.messages if t <= t_ready]
        assert any(m.startswith("STATUS=") for m in before)  # progress before READY
        assert not any("WATCHDOG=1" in m for m in before)
        # pings every WATCHDOG_USEC / 2 = 0.2 s
        notify.wait(lambda m: sum("WATCHDOG=1" in x for _, x in notify.messages) >= 5, timeout=5)
        pings = [t for t, m in notify.messages if m == "WATCHDOG=1"]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 0.6, gaps
        d.signal(signal.SIGTERM)
        t_stopping, _ = notify.wait(lambda m: "STOPPING=1" in m.splitlines())
        assert d.proc.wait(15) == 0
        assert not any("READY=1" in m for t, m in notify.messages if t > t_ready)
        assert not any("WATCHDOG=1" in m for t, m in notify.messages if t > t_stopping)
    finally:
        notify.close()


def test_sigterm_with_commands_in_flight_answers_them_and_loses_none(daemon, daemon_factory, listen) -> None:
    replies = listen("burst/replies")
    n = 400

    def send_all() -> None:
        for i in range(n):
            replies.publish("edged/dev1/cmd", json.dumps({"id": f"s{i}", "call": ADD}),
                            ResponseTopic="burst/replies", CorrelationData=f"s{i}".encode())

    sender = threading.Thread(target=send_all)
    sender.start()
    replies.wait_for(lambda m: True, timeout=15)  # the daemon is working: stop it now
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(20) == 0
    sender.join(30)
    stopping = daemon.wait_log("stopping")
    answered_first = {e["request_id"] for e in daemon.logs() if e.get("event") == "answered"}
    assert not [e for e in daemon.logs() if e.get("event") == "shutdown_left_commands"]
    # everything the stopped daemon took, it answered before it went
    def got() -> set[str]:
        return {m.properties.CorrelationData.decode() for m in list(replies.messages)}

    try:
        replies.wait_for(lambda m: answered_first <= got(), timeout=5)
    except TimeoutError:
        pass
    got_first = got()
    assert answered_first <= got_first, sorted(answered_first - got_first)[:5]
    assert 0 < len(got_first) <= n

    # the rest waited at the broker (persistent session) and are answered after a restart, none twice
    again = daemon_factory.make("dev1")
    replies.wait_for(lambda m: len({x.properties.CorrelationData for x in replies.messages}) >= n, timeout=30)
    time.sleep(0.5)
    counts = Counter(m.properties.CorrelationData.decode() for m in replies.messages)
    assert set(counts) == {f"s{i}" for i in range(n)}
    assert [c for c, k in counts.items() if k > 1] == []
    bodies = [json.loads(m.payload) for m in replies.messages]
    # a backlog larger than the queue is answered 'busy' beyond it (the contract: retry after retry_after_ms)
    assert {b["status"] for b in bodies} <= {"ok", "busy"}
    assert all(b["calls"][0]["result"] == {"sum": 42} for b in bodies if b["status"] == "ok")
    assert all(b["status"] == "ok" for b in bodies if b["id"] in answered_first)
    assert again.stop() == 0
    print(f"in flight at SIGTERM: {stopping.get('in_flight')}; answered before stop: {len(got_first)}/{n}; "
          f"busy after restart: {sum(b['status'] == 'busy' for b in bodies)}")


def test_shared_subscription_splits_a_batch(daemon_factory, listen) -> None:
    a = daemon_factory.make("dev-a", EDGED_MQTT__SHARED_GROUP="g")
    b = daemon_factory.make("dev-b", EDGED_MQTT__SHARED_GROUP="g")
    status = listen("edged/+/status")
    for dev in ("dev-a", "dev-b"):
        body = status.wait_json(f"edged/{dev}/status")
        assert body["topics"]["shared"] == "$share/g/edged/pool/cmd"
    replies = listen("pool/replies")
    n = 200
    for i in range(n):
        replies.publish("edged/pool/cmd", json.dumps({"id": f"p{i}", "call": ADD}),
                        ResponseTopic="pool/replies", CorrelationData=f"p{i}".encode())
    replies.wait_for(lambda m: len(replies.messages) >= n, timeout=30)
    time.sleep(0.5)
    bodies = replies.json()
    assert Counter(x["id"] for x in bodies) == Counter({f"p{i}": 1 for i in range(n)})  # none twice, none lost
    assert all(x["status"] == "ok" for x in bodies)
    per_device = Counter(x["device"] for x in bodies)
    assert set(per_device) == {"dev-a", "dev-b"} and min(per_device.values()) >= n // 10, per_device
    # and each still serves its own topic
    own = listen("own/replies")
    own.publish("edged/dev-b/cmd", json.dumps({"id": "own", "call": ADD}), ResponseTopic="own/replies",
                CorrelationData=b"own")
    assert own.wait_json("own/replies")["device"] == "dev-b"
    assert a.stop() == 0 and b.stop() == 0


def test_repeated_command_is_answered_from_the_store(daemon, listen) -> None:
    replies = listen("rd/replies", "rd/other")
    cmd = json.dumps({"id": "same", "call": {"name": "get_weather", "arguments": {"city": "Lima"}}})
    replies.publish("edged/dev1/cmd", cmd, ResponseTopic="rd/replies", CorrelationData=b"first")
    first = replies.wait_for(lambda m: m.properties.CorrelationData == b"first")
    replies.publish("edged/dev1/cmd", cmd, ResponseTopic="rd/replies", CorrelationData=b"second")
    second = replies.wait_for(lambda m: m.properties.CorrelationData == b"second")
    assert second.payload == first.payload  # byte for byte, timings included: not executed again
    assert json.loads(second.payload)["status"] == "ok"
    redelivered = daemon.wait_log("redelivered")
    assert redelivered["request_id"] == "same" and redelivered["already_published"] is True
    answered = [e for e in daemon.logs() if e.get("event") == "answered"]
    assert [e["request_id"] for e in answered] == ["same"]
    # the same id to another reply address is another request
    replies.publish("edged/dev1/cmd", cmd, ResponseTopic="rd/other", CorrelationData=b"third")
    third = replies.wait_for(lambda m: m.topic == "rd/other")
    assert json.loads(third.payload)["calls"] == json.loads(first.payload)["calls"]
    daemon.wait_log("answered", count=2)
    # the store survives a restart
    assert daemon.stop() == 0
    daemon.start()
    replies.publish("edged/dev1/cmd", cmd, ResponseTopic="rd/replies", CorrelationData=b"fourth")
    fourth = replies.wait_for(lambda m: m.properties.CorrelationData == b"fourth")
    assert fourth.payload == first.payload


def test_repeat_while_the_first_copy_still_runs_waits_for_it(daemon_factory, listen) -> None:
    """A copy that arrives while the first is still being answered (a client's retry, or the broker's
    redelivery after a reconnect) is not run on the other worker: it gets the first copy's result."""
    daemon = daemon_factory.make("dev1", EDGED_TOOLS__ENABLE_DEBUG_TOOLS="true")
    replies = listen("rr/replies")
    cmd = json.dumps({"id": "slow", "call": {"name": "debug_sleep", "arguments": {"seconds": 1}}})
    replies.publish("edged/dev1/cmd", cmd, ResponseTopic="rr/replies", CorrelationData=b"first")
    replies.publish("edged/dev1/cmd", cmd, ResponseTopic="rr/replies", CorrelationData=b"second")
    first = replies.wait_for(lambda m: m.properties.CorrelationData == b"first")
    second = replies.wait_for(lambda m: m.properties.CorrelationData == b"second")
    assert json.loads(first.payload)["status"] == "ok"
    assert second.payload == first.payload  # byte for byte, timings included: run once
    assert daemon.wait_log("duplicate_in_flight")["request_id"] == "slow"
    assert [e["request_id"] for e in daemon.logs() if e.get("event") == "answered"] == ["slow"]
    # the device still serves, and the id is free again once answered
    replies.publish("edged/dev1/cmd", json.dumps({"id": "after", "call": ADD}), ResponseTopic="rr/replies",
                    CorrelationData=b"after")
    after = replies.wait_for(lambda m: m.properties.CorrelationData == b"after")
    assert json.loads(after.payload)["calls"][0]["result"] == {"sum": 42}


def test_commands_sent_while_down_are_served_after_restart(daemon, listen) -> None:
    replies = listen("down/replies")
    assert daemon.stop() == 0
    for i in range(5):
        replies.publish("edged/dev1/cmd", json.dumps({"id": f"d{i}", "call": ADD}), ResponseTopic="down/replies",
                        CorrelationData=f"d{i}".encode())
    time.sleep(0.2)
    assert replies.messages == []
    daemon.start()
    replies.wait_for(lambda m: len(replies.messages) >= 5, timeout=15)
    assert sorted(b["id"] for b in replies.json()) == [f"d{i}" for i in range(5)]
