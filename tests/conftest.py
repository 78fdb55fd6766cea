"""Real parts for the tests: a mosquitto broker on a free port, the daemon as a real subprocess, model files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edged.client import EdgedClient
from edged.localproc import free_port, mosquitto_binary, wait_port

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO = mosquitto_binary()
MODELS_DIR = Path(os.environ.get("EDGED_MODELS_DIR", Path.home() / ".cache" / "edged" / "models"))
GEMMA = MODELS_DIR / "gemma-3-270m-q4_k_m.gguf"
QWEN = MODELS_DIR / "qwen2.5-coder-0.5b-instruct.gguf"






@dataclass
class Broker:
    port: int
    workdir: Path
    extra_conf: str = ""
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.workdir}/\nmax_queued_messages 100000\nset_tcp_nodelay true\n"
            f"{self.extra_conf}\n"
        )
        assert MOSQUITTO is not None
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / "mosquitto.log", "ab"))
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (scripts/setup installs it)")
    b = Broker(free_port(), tmp_path / "broker")
    b.workdir.mkdir()
    b.start()
    yield b
    b.stop()


@dataclass
class Daemon:
    """`edged run` as a subprocess, configured by environment variables like a real deployment."""

    broker: Broker
    workdir: Path
    device: str = "dev1"
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.device}.log"

    def start(self, wait_ready: bool = True) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGED_", "NOTIFY_SOCKET", "WATCHDOG"))}
        env.update({
            "EDGED_MQTT__PORT": str(self.broker.port),
            "EDGED_MQTT__HOST": "127.0.0.1",
            "EDGED_DEVICE__ID": self.device,
            "EDGED_STATE__DIR": str(self.workdir / f"state-{self.device}"),
            "EDGED_MODELS__ROUTER": "",
            "EDGED_MODELS__THINKER": "",
            "EDGED_TELEMETRY__INTERVAL_S": "1",
            "EDGED_LOG__FORMAT": "json",
            "EDGED_MODELS_DIR": str(MODELS_DIR),
        })
        env.update(self.env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edged", "run", *self.args],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "ab"), cwd=REPO,
        )
        if wait_ready:
            self.wait_log("ready")

    def logs(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_log(self, event: str, timeout: float = 60.0, count: int = 1) -> dict[str, object]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            matches = [e for e in self.logs() if e.get("event") == event]
            if len(matches) >= count:
                return matches[count - 1]
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"no {event!r} in the log:\n{self.log_path.read_text()[-3000:]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@pytest.fixture
def daemon_factory(broker: Broker, tmp_path: Path) -> Iterator[type]:
    started: list[Daemon] = []

    class Factory:
        @staticmethod
        def make(device: str = "dev1", start: bool = True, **env: str) -> Daemon:
            d = Daemon(broker, tmp_path, device, dict(env))
            started.append(d)
            if start:
                d.start()
            return d

    yield Factory
    for d in started:
        d.stop()


@pytest.fixture
def daemon(daemon_factory: type) -> Daemon:
    return daemon_factory.make()  # type: ignore[attr-defined, no-any-return]


@pytest.fixture
def client(broker: Broker) -> Iterator[EdgedClient]:
    with EdgedClient("127.0.0.1", broker.port) as c:
        yield c


class Listener:
    """A bare paho client that records every message on some topics (retained ones included) for assertions."""

    def __init__(self, port: int, *topics: str, protocol: int = 5, client_id: str = "") -> None:
        import threading

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if topics:
            self.client.subscribe([(t, 1) for t in topics])
            if not subscribed.wait(10):
                raise TimeoutError("no SUBACK")

    def _on_message(self, client: object, userdata: object, msg: object) -> None:
        with self._cond:
            self.messages.append(msg)  # type: ignore[arg-type]
            self._cond.notify_all()

    def json(self, topic: str | None = None) -> list[dict[str, object]]:
        with self._cond:
            msgs = [m for m in self.messages if topic is None or m.topic == topic]
        return [json.loads(m.payload) for m in msgs]

    def wait_for(self, pred: object, timeout: float = 15.0, what: str = "a message") -> object:
        """The first recorded message for which pred(msg) is true, waiting up to `timeout`."""
        def find() -> object:
            return next((m for m in self.messages if pred(m)), None)  # type: ignore[operator]
        with self._cond:
            if not self._cond.wait_for(lambda: find() is not None, timeout):
                raise TimeoutError(f"no {what} within {timeout} s; got {[m.topic for m in self.messages][-20:]}")
            return find()

    def wait_json(self, topic: str, pred: object = None, timeout: float = 15.0) -> dict[str, object]:
        def match(m: object) -> bool:
            if m.topic != topic:  # type: ignore[attr-defined]
                return False
            try:
                body = json.loads(m.payload)  # type: ignore[attr-defined]
            except ValueError:
                return False
            return pred is None or bool(pred(body))  # type: ignore[operator]
        msg = self.wait_for(match, timeout, what=f"matching message on {topic}")
        return json.loads(msg.payload)  # type: ignore[attr-defined, no-any-return]

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, **props: object) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = None
        if props:
            properties = Properties(PacketTypes.PUBLISH)
            for key, value in props.items():
                setattr(properties, key, value)
        self.client.publish(topic, payload, qos=qos, properties=properties).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def listen(broker: Broker) -> Iterator[object]:
    """listen(*topics, protocol=5) -> Listener; closed at the end of the test."""
    made: list[Listener] = []

    def make(*topics: str, protocol: int = 5, client_id: str = "") -> Listener:
        listener = Listener(broker.port, *topics, protocol=protocol, client_id=client_id)
        made.append(listener)
        return listener

    yield make
    for listener in made:
        listener.close()
