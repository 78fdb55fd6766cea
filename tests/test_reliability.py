"""Nothing lost, nothing executed twice: 500 commands in flight through a daemon killed with SIGKILL, a broker
restarted (persistence on), and a network cut, each restored; and a burst of 10x what the device holds at once.

What "exactly once" means here, precisely: every command gets a result (lost = 0) and no tool runs twice for one
command (executed_twice = 0: never two different results for one id). A result can reach the client twice, byte
for byte the same, only when the daemon died (or lost its connection) after the broker took the result and
before the daemon recorded that: the redelivered command is then answered again *from the answered store*
(`store_copies`). That window is one command per worker, or a run of quick commands taken off a backlog (at most
`limits.reply_window`), so the copies are bounded by workers x reply_window; clients deduplicate by id. A
redelivery whose result the store marks as published is acknowledged silently (DUP).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import psutil
import pytest

from edged.config import LimitsConfig
from tests.reliability_helpers import (
    MOSQUITTO_PUB,
    Audit,
    Collector,
    TcpProxy,
    Throttle,
    command_lines,
    send_lines,
)

pytestmark = [pytest.mark.mqtt, pytest.mark.slow,
              pytest.mark.skipif(MOSQUITTO_PUB is None, reason="mosquitto-clients not installed")]

N = 500
WORKERS = 2
REPLY_WINDOW = LimitsConfig().reply_window


def _check(audit: Audit, label: str, reply_window: int = REPLY_WINDOW) -> None:
    print(f"\n{label}: {json.dumps(audit.summary())}")
    assert audit.lost == [], f"{label}: lost {len(audit.lost)}: {audit.lost[:10]}"
    assert audit.unexpected == []
    assert audit.executed_twice == [], f"{label}: executed twice: {audit.executed_twice[:10]}"
    assert audit.extra_copies <= WORKERS * reply_window, audit.summary()
    # A command answered 'busy' is answered again ('busy' or 'ok') when the connection died between the broker
    # taking the reply and our ack reaching it: harmless (nothing ran twice). Not bounded here: mosquitto 2.0.11
    # stops honouring our Receive Maximum once acks flow, floods us, and the excess gets 'busy' (see bus.py).
    assert set(audit.statuses()) <= {"ok", "busy"}, audit.summary()
    for cid, payloads in audit.results.items():
        body = json.loads(payloads[-1])
        if body["status"] == "ok":
            assert body["calls"][0]["result"] == {"sum": int(cid[1:]) + 1}, body


def _stream(port: int, prefix: str) -> tuple[threading.Thread, set[str]]:
    lines = command_lines(prefix, N)
    sender = threading.Thread(target=send_lines, args=(port, "edged/dev1/cmd", "rel/replies", lines))
    sender.start()
    return sender, {json.loads(line)["id"] for line in lines}


@pytest.mark.parametrize("reply_window", [REPLY_WINDOW, 1])
def test_sigkill_mid_stream_then_restart(daemon_factory, broker, reply_window: int) -> None:
    """With the default reply window, and with 1: then at most one reply per worker comes twice."""
    daemon = daemon_factory.make("dev1", EDGED_LIMITS__REPLY_WINDOW=str(reply_window))
    results = Collector(broker.port, "rel/replies", "collector-kill")
    try:
        sender, ids = _stream(broker.port, "k")
        results.wait_count(50, timeout=20)
        daemon.signal(signal.SIGKILL)
        daemon.proc.wait(10)
        killed_at = results.count()
        sender.join(30)
        daemon.start()
        results.wait_ids(ids, timeout=60)
        time.sleep(1.0)  # anything that would arrive twice arrives now
        audit = Audit.of(ids, results.received)
        print(f"results before the kill: {killed_at}/{N}")
        _check(audit, f"SIGKILL (reply window {reply_window})", reply_window)
        assert killed_at < N, "the daemon finished before the kill: nothing was in flight"
        # the restarted daemon resumed its session (start() found the first run's "ready" and did not wait)
        assert daemon.wait_log("mqtt_connected", count=2).get("session_present") is True
    finally:
        results.close()


def test_broker_restart_mid_stream(daemon_factory, broker) -> None:
    if os.geteuid() == 0:
        # as root, mosquitto drops to the 'mosquitto' user, which cannot write its persistence file under pytest's
        # private tmp dir: every save fails and a restart loses everything. Keep it root here.
        broker.stop()
        broker.extra_conf += "\nuser root\n"
        broker.start()
    daemon = daemon_factory.make("dev1")
    results = Collector(broker.port, "rel/replies", "collector-broker")
    try:
        with Throttle(daemon.proc.pid):  # a slow device: commands still in flight when the broker goes down
            sender, ids = _stream(broker.port, "m")
            sender.join(30)  # the commands are at the broker; now restart it under the daemon
            results.wait_count(50, timeout=20)
            broker.stop()  # SIGTERM: mosquitto saves its persistence file on the way down
            stopped_at = results.count()
        time.sleep(0.5)
        broker.start()
        results.wait_ids(ids, timeout=60)
        time.sleep(1.0)
        audit = Audit.of(ids, results.received)
        print(f"results before the broker stopped: {stopped_at}/{N}")
        _check(audit, "broker restart")
        assert stopped_at < N, "the daemon finished before the broker restart"
        assert daemon.proc.poll() is None
        assert daemon.wait_log("mqtt_connected", count=2)["session_present"] is True
    finally:
        results.close()


def test_repeats_inside_a_burst_run_once(daemon_factory, broker) -> None:
    """Every command sent twice, the copy a few commands behind the first: what a reconnect's redeliveries look
    like in the queue. The copy often lands in the same run of quick commands as the first, or on the other
    worker while the first runs; either way it gets the first copy's result, never a second execution."""
    daemon_factory.make("dev1")
    results = Collector(broker.port, "rel/replies", "collector-repeats")
    try:
        lines = command_lines("r", N)
        repeated = [line for i in range(0, N, 4) for line in lines[i:i + 4] + lines[i:i + 4]]
        ids = {json.loads(line)["id"] for line in lines}
        send_lines(broker.port, "edged/dev1/cmd", "rel/replies", repeated)
        results.wait_ids(ids, timeout=60)
        time.sleep(1.0)
        audit = Audit.of(ids, results.received)
        print(f"\nrepeats: {json.dumps(audit.summary())}")
        assert audit.lost == [] and audit.unexpected == []
        assert audit.executed_twice == [], f"executed twice: {len(audit.executed_twice)}"
        assert set(audit.statuses()) <= {"ok", "busy"}
    finally:
        results.close()


def test_network_cut_then_restored(daemon_factory, broker) -> None:
    proxy = TcpProxy(broker.port)
    d = daemon_factory.make("dev1", EDGED_MQTT__PORT=str(proxy.port), EDGED_MQTT__KEEPALIVE_S="5",
                            EDGED_MQTT__RECONNECT_MAX_S="2")
    results = Collector(broker.port, "rel/replies", "collector-cut")
    try:
        sender, ids = _stream(broker.port, "n")
        results.wait_count(50, timeout=20)
        proxy.cut()
        cut_at = results.count()
        sender.join(30)
        time.sleep(8)  # longer than the keep-alive: both ends notice
        during = results.count() - cut_at
        proxy.restore()
        results.wait_ids(ids, timeout=60)
        time.sleep(1.0)
        audit = Audit.of(ids, results.received)
        print(f"results before the cut: {cut_at}/{N}; during the cut: {during}")
        _check(audit, "network cut")
        assert cut_at < N
        assert d.proc.poll() is None
        assert [e for e in d.logs() if e.get("event") == "mqtt_disconnected"], "the cut went unnoticed"
    finally:
        results.close()
        proxy.close()


def test_burst_of_ten_times_capacity_memory_bounded_and_still_reporting(daemon_factory, broker, listen) -> None:
    """Queue 32 + 2 workers: a burst of 10x the commands the device can hold at once (x10 again in bytes, with
    ~1 KiB queries), from several publishers at once. Every command gets ok or busy, RSS stays bounded, and
    status and telemetry keep flowing while it works through the burst."""
    queue_size = 32
    d = daemon_factory.make("dev1", EDGED_LIMITS__QUEUE_SIZE=str(queue_size), EDGED_TELEMETRY__INTERVAL_S="0.5")
    proc = psutil.Process(d.proc.pid)
    telemetry = listen("edged/dev1/telemetry", "edged/dev1/status")
    results = Collector(broker.port, "rel/replies", "collector-burst")
    try:
        time.sleep(1.0)
        rss0 = proc.memory_info().rss
        n = 10 * (queue_size + WORKERS) * 10  # 3,400
        per = n // 4
        pad = "x" * 900
        batches = [[json.dumps({"id": f"b{j * per + i}", "call": {"name": "get_weather", "arguments": {
            "city": f"{pad[: 50]}{j * per + i}"}}}) for i in range(per)] for j in range(4)]
        # a few carry a long query too (no model: answered 'no_model' error, cheap) to weigh on memory
        ids = {json.loads(line)["id"] for batch in batches for line in batch}
        peak = [rss0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        # as on a slow device, so the burst lasts long enough for telemetry to be due several times during it
        with Throttle(d.proc.pid, share=0.25):
            t0 = time.monotonic()
            senders = [threading.Thread(target=send_lines, args=(broker.port, "edged/dev1/cmd", "rel/replies", b))
                       for b in batches]
            for s in senders:
                s.start()
            for s in senders:
                s.join(60)
            results.wait_ids(ids, timeout=90)
            t_end = time.monotonic()
        done.set()
        sampler.join()
        audit = Audit.of(ids, results.received)
        summary = audit.summary()
        growth = peak[0] - rss0
        print(f"\nburst {n} commands in {t_end - t0:.1f} s: {summary}; RSS {rss0 >> 20} MiB -> peak "
              f"{peak[0] >> 20} MiB (+{growth >> 20} MiB)")
        assert audit.lost == [] and audit.executed_twice == [] and audit.extra_copies == 0
        assert set(audit.statuses()) <= {"ok", "busy"}
        busy = [json.loads(v[-1]) for v in audit.results.values() if json.loads(v[-1])["status"] == "busy"]
        assert all(b["retry_after_ms"] == 1000 and b["calls"] == [] for b in busy)
        assert growth < 64 << 20, f"RSS grew {growth >> 20} MiB under the burst"
        # telemetry kept coming while the daemon worked through the burst, and reported its bounded queue
        during = [json.loads(p) for t, p in [(m.timestamp, m.payload) for m in telemetry.messages
                                            if m.topic == "edged/dev1/telemetry"] if t0 <= t <= t_end]
        assert len(during) >= max(2, int((t_end - t0) / 0.5) // 3), (len(during), t_end - t0)
        assert all(t["queue"]["depth"] <= queue_size and t["queue"]["capacity"] == queue_size for t in during)
        assert max(t["requests"]["requests_total"] for t in during) > 0
        status: Any = telemetry.json("edged/dev1/status")[-1]
        assert status["state"] == "online"
        assert d.proc.poll() is None
    finally:
        results.close()
