"""Real parts for the tests: a mosquitto broker on a free port, the daemon as a real subprocess, model files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edged.client import EdgedClient

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None
)
MODELS_DIR = Path(os.environ.get("EDGED_MODELS_DIR", Path.home() / ".cache" / "edged" / "models"))
GEMMA = MODELS_DIR / "gemma-3-270m-q4_k_m.gguf"
QWEN = MODELS_DIR / "qwen2.5-coder-0.5b-instruct.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


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
            f"persistence_location {self.workdir}/\nmax_queued_messages 100000\n{self.extra_conf}\n"
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
