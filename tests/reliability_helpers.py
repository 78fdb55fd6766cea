"""Helpers for the reliability, fault and soak tests: a results collector that survives broker restarts, a load
sender built on mosquitto_pub, a pausable TCP proxy that stands in for a network cut, a CPU throttle that makes this
machine a slow device, and the exactly-once audit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO_PUB = shutil.which("mosquitto_pub")


class Collector:
    """Records every result published to `topic`, across broker restarts: a fixed client id, clean_start=False
    and a Session Expiry, so what the broker queued for us while it was down or we were cut off still arrives."""

    def __init__(self, port: int, topic: str, client_id: str, host: str = "127.0.0.1") -> None:
        self.topic = topic
        self.received: list[tuple[float, bytes, bool]] = []  # (monotonic time, payload, DUP flag)
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(host, port, keepalive=10, clean_start=False, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("collector: no SUBACK")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.received.append((time.monotonic(), bytes(msg.payload), bool(msg.dup)))
            self._cond.notify_all()

    def ids(self) -> set[str]:
        with self._cond:
            return {json.loads(p)["id"] for _, p, _ in self.received}

    def count(self) -> int:
        with self._cond:
            return len(self.received)

    def wait_ids(self, ids: set[str], timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ids <= self.ids():
                return
            time.sleep(0.05)
        missing = sorted(ids - self.ids())
        raise TimeoutError(f"{len(missing)} commands without a result, e.g. {missing[:10]}")

    def wait_count(self, n: int, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: len(self.received) >= n, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def command_lines(prefix: str, n: int, start: int = 0) -> list[str]:
    return [json.dumps({"id": f"{prefix}{i}", "call": {"name": "add_numbers", "arguments": {"a": i, "b": 1}}})
            for i in range(start, start + n)]


def send_lines(port: int, topic: str, reply_topic: str, lines: list[str], host: str = "127.0.0.1",
               timeout: float = 60) -> None:
    """Publish each line as one QoS 1 command with an MQTT v5 Response Topic, at the C client's speed."""
    assert MOSQUITTO_PUB is not None
    subprocess.run([MOSQUITTO_PUB, "-h", host, "-p", str(port), "-V", "mqttv5", "-q", "1", "-t", topic, "-l",
                    "-D", "publish", "response-topic", reply_topic],
                   input=("\n".join(lines) + "\n").encode(), check=True, timeout=timeout)


@dataclass
class Audit:
    """Per command id: how many results reached the client, whether the copies are the same bytes (a republish
    from the answered store) or differ (executed twice), and the statuses."""

    expected: set[str]
    results: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    transport_dups: int = 0

    @classmethod
    def of(cls, expected: set[str], received: list[tuple[float, bytes, bool]]) -> Audit:
        audit = cls(expected)
        for _, payload, dup in received:
            cid = json.loads(payload)["id"]
            if dup and payload in audit.results[cid]:
                audit.transport_dups += 1  # the broker redelivering to *us* (our PUBACK was lost): not edged's
                continue
            audit.results[cid].append(payload)
        return audit

    @property
    def lost(self) -> list[str]:
        return sorted(self.expected - {k for k, v in self.results.items() if v})

    @property
    def extra_copies(self) -> int:
        """'ok'/'error' results beyond the first that are byte-identical to it: answered again from the store,
        not executed again."""
        return sum(len(v) - 1 for v in self.results.values()
                   if len(set(v)) == 1 and json.loads(v[0])["status"] != "busy")

    @property
    def busy_repeats(self) -> int:
        """'busy' sent twice for one command (redelivered before our ack reached the broker): nothing ran."""
        return sum(len(v) - 1 for v in self.results.values()
                   if len(set(v)) == 1 and json.loads(v[0])["status"] == "busy")

    @property
    def executed_twice(self) -> list[str]:
        """Ids with two different 'ok' results: the tool ran twice."""
        out = []
        for cid, payloads in self.results.items():
            oks = {p for p in payloads if json.loads(p)["status"] == "ok"}
            if len(oks) > 1:
                out.append(cid)
        return out

    @property
    def busy_then_ok(self) -> int:
        """'busy', then 'ok' once redelivered: the busy reply was out, the ack was not, when the process died."""
        return sum(1 for v in self.results.values()
                   if len(set(v)) > 1 and {json.loads(p)["status"] for p in v} == {"busy", "ok"})

    @property
    def unexpected(self) -> list[str]:
        return sorted(set(self.results) - self.expected)

    def statuses(self) -> Counter[str]:
        return Counter(json.loads(v[-1])["status"] for v in self.results.values() if v)

    def summary(self) -> dict[str, Any]:
        return {"commands": len(self.expected), "answered": len(self.expected) - len(self.lost),
                "lost": len(self.lost), "executed_twice": len(self.executed_twice),
                "store_copies": self.extra_copies, "busy_repeats": self.busy_repeats, "busy_then_ok": self.busy_then_ok,
                "transport_dups": self.transport_dups, "statuses": dict(self.statuses())}


class Throttle:
    """Runs a process `share` of the time (SIGSTOP/SIGCONT in 20 ms periods), as on a device a tenth as fast.

    Some checks need work still in flight when something happens (a broker restart, telemetry during a burst); on a
    fast machine the daemon answers 500 direct calls in ~0.1 s and nothing is in flight any more."""

    def __init__(self, pid: int, share: float = 0.1, period_s: float = 0.02) -> None:
        self.pid, self.run_s, self.stop_s = pid, period_s * share, period_s * (1 - share)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Throttle:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _loop(self) -> None:
        try:
            while not self._done.is_set():
                os.kill(self.pid, signal.SIGSTOP)
                time.sleep(self.stop_s)
                os.kill(self.pid, signal.SIGCONT)
                time.sleep(self.run_s)
        except ProcessLookupError:
            return
        finally:
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


class TcpProxy:
    """A loopback TCP relay between the daemon and the broker that can cut the network: `cut()` stops moving
    bytes both ways and refuses new connections (a blackhole, as an unplugged link looks to both ends);
    `restore()` drops the stale connections and relays again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self.up = threading.Event()
        self.up.set()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if not self.up.is_set():
                conn.close()  # link down: connection refused (reset)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._pairs.append((conn, upstream))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.1)
        while not self._closed:
            if not self.up.is_set():
                time.sleep(0.05)  # blackhole: bytes stay in the kernel buffers, nothing moves
                continue
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def cut(self) -> None:
        self.up.clear()

    def restore(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:  # what a NAT or a peer's keepalive does to connections across an outage
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.up.set()

    def close(self) -> None:
        self._closed = True
        self.restore()
        self.listener.close()
