"""The Ansible role and rolling playbook, run for real against three devices simulated on this machine.

Each device is a directory prefix with a local connection; systemd is not PID 1 here, so the role's test switch
(edged_service_manager=supervised) runs the daemon with a pid-file supervisor that waits for READY=1 like
Type=notify. The unit file itself is checked by tests/test_systemd.py. The broker is the real mosquitto of conftest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import REPO, Broker, free_port
from paho.mqtt.enums import CallbackAPIVersion

from edged.client import EdgedClient

ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent
PLAYBOOK = BIN / "ansible-playbook"
LINT = BIN / "ansible-lint"
DEVICES = ("dev1", "dev2", "dev3")
needs_ansible = pytest.mark.skipif(not PLAYBOOK.exists(), reason="ansible-core is not installed (the test extra)")


def llama_wheelhouse() -> Path | None:
    """The cached llama-cpp-python wheel's directory, as scripts/setup names it."""
    out = subprocess.run(["bash", str(REPO / "scripts" / "setup"), "--wheelhouse"], capture_output=True, text=True,
                         check=True, timeout=30)
    wheels = Path(out.stdout.strip())
    return wheels if any(wheels.glob("llama_cpp_python-*.whl")) else None


def ansible_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGED_", "ANSIBLE_", "NOTIFY_SOCKET"))}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-local"),
        "ANSIBLE_REMOTE_TEMP": str(tmp / "ansible-remote"),
        "ANSIBLE_HOME": str(tmp / "ansible-home"),
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
    })
    return env


# -- static checks ------------------------------------------------------------------------------------------------


@needs_ansible
def test_syntax_check_clean(tmp_path: Path) -> None:
    for playbook in ("rollout.yml", "mosquitto.yml"):
        proc = subprocess.run(
            [str(PLAYBOOK), "--syntax-check", "-i", "inventory/example", playbook],
            cwd=ANSIBLE, env=ansible_env(tmp_path), capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "ERROR" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not LINT.exists(), reason="ansible-lint is not installed (the test extra)")
def test_ansible_lint_production_profile_clean(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(LINT), "--profile", "production", "--nocolor", "ansible/"],
        cwd=REPO, env=ansible_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr


# -- the fleet ----------------------------------------------------------------------------------------------------


def build_wheel(version: str, tmp: Path) -> Path:
    """The edged wheel with another version: a copy of the project with edged.__version__ patched (the wheel's
    version is read from it)."""
    src = tmp / f"src-{version}"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    shutil.copytree(REPO / "edged", src / "edged", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    init = src / "edged" / "__init__.py"
    init.write_text(re.sub(r'(?m)^__version__ = ".*"$', f'__version__ = "{version}"', init.read_text()))
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(dist)], check=True, capture_output=True, timeout=300)
    wheel = dist / f"edged-{version}-py3-none-any.whl"
    assert wheel.exists(), list(dist.iterdir())
    return wheel


class Fleet:
    """Three devices under tmp/devices/<id>, an inventory, and ansible-playbook runs of ansible/rollout.yml."""

    def __init__(self, tmp: Path, broker: Broker, wheelhouse: Path) -> None:
        self.tmp = tmp
        self.broker = broker
        self.wheelhouse = wheelhouse
        self.model = tmp / "tiny-model.gguf"  # stands in for a GGUF: exercises the copy + sha256 path quickly
        self.model.write_bytes(b"GGUF" + bytes(range(256)) * 16)
        self.runs = 0

    def prefix(self, device: str) -> Path:
        return self.tmp / "devices" / device

    def inventory(self, host_vars: dict[str, dict[str, Any]] | None = None) -> Path:
        host_vars = host_vars or {}
        hosts = {d: {"edged_prefix": str(self.prefix(d)), **host_vars.get(d, {})} for d in DEVICES}
        inventory = {"all": {"children": {"edged": {"hosts": hosts, "vars": {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "edged_service_manager": "supervised",
            "edged_python": sys.executable,
            "edged_wheelhouse": str(self.wheelhouse),
            "edged_pip_extra_args": "--no-compile",
            "edged_mqtt_host": "127.0.0.1",
            "edged_mqtt_port": self.broker.port,
            "edged_router": "",
            "edged_models": [{"file": "tiny-model.gguf", "src": str(self.model),
                              "sha256": hashlib.sha256(self.model.read_bytes()).hexdigest()}],
            "edged_config_extra": {"telemetry": {"interval_s": 5}},
            "edged_start_timeout": 12,
            "edged_health_timeout": 30,
        }}}}}
        path = self.tmp / "inventory.json"  # JSON is YAML: the YAML inventory plugin reads it
        path.write_text(json.dumps(inventory, indent=1))
        return path

    def run(self, wheel: Path, *, host_vars: dict[str, dict[str, Any]] | None = None,
            extra: dict[str, Any] | None = None) -> tuple[int, str, dict[str, dict[str, int]]]:
        self.runs += 1
        inventory = self.inventory(host_vars)
        extra_vars = {"edged_wheel": str(wheel), **(extra or {})}
        proc = subprocess.run(
            [str(PLAYBOOK), "-i", str(inventory), "rollout.yml", "-e", json.dumps(extra_vars)],
            cwd=ANSIBLE, env=ansible_env(self.tmp), capture_output=True, text=True, timeout=400,
        )
        output = proc.stdout + proc.stderr
        (self.tmp / f"run{self.runs}.log").write_text(output)
        return proc.returncode, output, recap(output)

    def link(self, device: str, name: str) -> str:
        return Path(os.readlink(self.prefix(device) / "opt/edged" / name)).name

    def stop_all(self) -> None:
        """Stop the daemons this test started, by the pids in their pid files."""
        for device in DEVICES:
            pidfile = self.prefix(device) / "var/lib/edged/edged.pid"
            try:
                pid = int(pidfile.read_text())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            end = time.monotonic() + 20
            while time.monotonic() < end and Path(f"/proc/{pid}").exists():
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    break
                time.sleep(0.1)
            else:
                if Path(f"/proc/{pid}").exists():
                    os.kill(pid, signal.SIGKILL)


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP lines as {host: {ok, changed, failed, rescued, ...}}."""
    out = {}
    for line in output.split("PLAY RECAP")[-1].splitlines():
        match = re.match(r"^(\S+)\s+:\s+(.*)$", line)
        if match:
            out[match.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2))}
    return out


def statuses(port: int, timeout: float = 3.0) -> dict[str, dict[str, Any]]:
    """The retained status of every device."""
    seen: dict[str, dict[str, Any]] = {}
    done = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            seen[msg.topic.split("/")[1]] = json.loads(msg.payload)
            if len(seen) == len(DEVICES):
                done.set()
        except Exception:
            pass

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.subscribe("edged/+/status", qos=1)
    client.loop_start()
    done.wait(timeout)
    client.disconnect()
    client.loop_stop()
    return seen


def versions(port: int) -> dict[str, tuple[str, str]]:
    return {d: (s.get("state"), s.get("version")) for d, s in statuses(port).items()}


def self_test(client: EdgedClient, device: str) -> None:
    result = client.request(device, {"id": f"t-{device}-{time.monotonic_ns()}",
                                     "call": {"name": "add_numbers", "arguments": {"a": 20, "b": 22}}}, timeout=20)
    assert result["status"] == "ok" and result["calls"][0]["result"] == {"sum": 42}, result


@pytest.fixture
def fleet(tmp_path: Path, broker: Broker) -> Any:
    if not PLAYBOOK.exists():
        pytest.skip("ansible-core is not installed (the test extra)")
    wheelhouse = llama_wheelhouse()
    if wheelhouse is None:
        pytest.skip("no cached llama-cpp-python wheel (scripts/setup builds it)")
    f = Fleet(tmp_path, broker, wheelhouse)
    yield f
    f.stop_all()


@pytest.mark.slow
@pytest.mark.mqtt
@pytest.mark.timeout(540)
def test_fleet_install_idempotence_upgrade_and_rollback(fleet: Fleet, client: EdgedClient, tmp_path: Path) -> None:
    v1, v2, v3 = (build_wheel(v, tmp_path) for v in ("1.0.0", "1.1.0", "1.2.0"))
    port = fleet.broker.port
    all_at_once = {"edged_serial": ["100%"]}

    # 1. First install: a new fleet, every device at once, each through the health gate.
    rc, out, hosts = fleet.run(v1, extra=all_at_once)
    assert rc == 0, out[-6000:]
    assert set(hosts) == set(DEVICES) and all(h["failed"] == 0 and h["changed"] > 0 for h in hosts.values()), hosts
    assert versions(port) == {d: ("online", "1.0.0") for d in DEVICES}
    for device in DEVICES:
        self_test(client, device)
        assert fleet.link(device, "current") == "1.0.0"
        assert (fleet.prefix(device) / "var/cache/edged/models/tiny-model.gguf").read_bytes() == \
            fleet.model.read_bytes()
        config = (fleet.prefix(device) / "etc/edged/edged.toml").read_text()
        assert f'id = "{device}"' in config and f"port = {port}" in config

    # 2. The same again: nothing changes, nothing restarts.
    pids = {d: (fleet.prefix(d) / "var/lib/edged/edged.pid").read_text() for d in DEVICES}
    rc, out, hosts = fleet.run(v1, extra=all_at_once)
    assert rc == 0, out[-6000:]
    assert {d: h["changed"] for d, h in hosts.items()} == dict.fromkeys(DEVICES, 0), out[-6000:]
    assert {d: (fleet.prefix(d) / "var/lib/edged/edged.pid").read_text() for d in DEVICES} == pids

    # 3. An upgrade in waves: the canary alone, then the rest together, each device gated.
    rc, out, hosts = fleet.run(v2, extra={"edged_serial": [1, "100%"]})
    assert rc == 0, out[-6000:]
    assert out.count("PLAY [Roll edged out") == 2, "one play header per wave"
    assert all(h["failed"] == 0 for h in hosts.values()), hosts
    assert versions(port) == {d: ("online", "1.1.0") for d in DEVICES}
    for device in DEVICES:
        assert (fleet.link(device, "current"), fleet.link(device, "previous")) == ("1.1.0", "1.0.0")

    # 4. An upgrade whose gate fails on dev2 (its config points the daemon at a dead broker port): dev2 is rolled
    #    back to 1.1.0 with its old config, and the rollout halts before dev3.
    dead_port = free_port()
    rc, out, hosts = fleet.run(v3, host_vars={"dev2": {"edged_config_extra": {"mqtt": {"port": dead_port}}}},
                               extra={"edged_serial": [1, 1, "100%"]})
    assert rc != 0, out[-6000:]
    assert hosts["dev1"]["failed"] == 0, hosts
    assert hosts["dev2"]["failed"] == 1 and hosts["dev2"]["rescued"] == 1, hosts
    assert "dev3" not in hosts or hosts["dev3"]["ok"] == 0, hosts
    assert "dev2 failed" in out and "rolled back to 1.1.0" in out, out[-6000:]
    assert versions(port) == {"dev1": ("online", "1.2.0"), "dev2": ("online", "1.1.0"), "dev3": ("online", "1.1.0")}
    assert (fleet.link("dev2", "current"), fleet.link("dev2", "previous")) == ("1.1.0", "1.0.0")
    assert f"port = {port}" in (fleet.prefix("dev2") / "etc/edged/edged.toml").read_text()
    assert not (fleet.prefix("dev3") / "opt/edged/releases/1.2.0").exists(), "dev3 was never touched"
    for device in DEVICES:
        self_test(client, device)
