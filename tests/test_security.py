"""Security through real parts: mosquitto with a TLS listener (a CA made here with openssl), client certificates
required, passwords from a credentials file, and the example ACL from systemd/mosquitto/edged.acl; plus the payload
limit, the tools allowlist, and no tool that can run a shell."""

from __future__ import annotations

import ast
import json
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import MOSQUITTO, REPO, Daemon, free_port, wait_port

pytestmark = pytest.mark.mqtt
ADD = {"name": "add_numbers", "arguments": {"a": 25, "b": 17}}
ACL = REPO / "systemd" / "mosquitto" / "edged.acl"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_pki(d: Path, clients: list[str]) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=edged-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in [("server", ["-extfile", "san.ext"])] + [(c, []) for c in clients]:
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", *ext, cwd=d)


class SecureBroker:
    """Duck-types conftest.Broker for the Daemon helper (it reads .port)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        pki = workdir / "pki"
        pki.mkdir(parents=True)
        _make_pki(pki, ["dev1", "dev2", "controller"])
        self.pki = pki
        self.passwords = {"dev1": "pw-dev1", "dev2": "pw-dev2", "controller": "pw-ctl"}
        pwfile = workdir / "passwd"
        for i, (user, pw) in enumerate(self.passwords.items()):
            subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(pwfile), user, pw],
                           check=True, capture_output=True)
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            "per_listener_settings false\nallow_anonymous false\n"
            f"password_file {pwfile}\nacl_file {ACL}\n"
            f"listener {self.port} 127.0.0.1\ncafile {pki}/ca.crt\ncertfile {pki}/server.crt\n"
            f"keyfile {pki}/server.key\nrequire_certificate true\nuser root\n"
        )
        assert MOSQUITTO is not None
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(workdir / "mosquitto.log", "ab"))
        wait_port(self.port)

    def client(self, user: str | None, cert: str | None, client_id: str = "") -> tuple[mqtt.Client, object]:
        """A connected paho client; returns it with the CONNACK reason (a failure if refused)."""
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        if cert:
            ctx.load_cert_chain(str(self.pki / f"{cert}.crt"), str(self.pki / f"{cert}.key"))
        c.tls_set_context(ctx)
        if user:
            c.username_pw_set(user, self.passwords[user])
        done = threading.Event()
        outcome: dict[str, object] = {}

        def on_connect(client, userdata, flags, reason, props):  # type: ignore[no-untyped-def]
            outcome["reason"] = reason
            done.set()

        c.on_connect = on_connect
        try:
            c.connect("127.0.0.1", self.port, keepalive=10)
        except (ssl.SSLError, OSError) as exc:
            return c, exc
        c.loop_start()
        done.wait(5)
        return c, outcome.get("reason", "no CONNACK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def secure(tmp_path: Path):  # type: ignore[no-untyped-def]
    if MOSQUITTO is None or not shutil.which("openssl") or not shutil.which("mosquitto_passwd"):
        pytest.skip("needs mosquitto, mosquitto_passwd and openssl")
    b = SecureBroker(tmp_path / "secure")
    yield b
    b.stop()


def _secure_daemon(secure: SecureBroker, tmp_path: Path, creds: Path) -> Daemon:
    d = Daemon(secure, tmp_path, "dev1", {  # type: ignore[arg-type]
        "EDGED_MQTT__TLS": "true", "EDGED_MQTT__CA_FILE": str(secure.pki / "ca.crt"),
        "EDGED_MQTT__CERT_FILE": str(secure.pki / "dev1.crt"), "EDGED_MQTT__KEY_FILE": str(secure.pki / "dev1.key"),
        "EDGED_MQTT__USERNAME": "dev1", "CREDENTIALS_DIRECTORY": str(creds),
    })
    return d


def test_tls_client_cert_password_file_and_acl(secure: SecureBroker, tmp_path: Path) -> None:
    creds = tmp_path / "creds"  # what systemd's LoadCredential= gives: $CREDENTIALS_DIRECTORY/mqtt_password
    creds.mkdir()
    (creds / "mqtt_password").write_text("pw-dev1\n")
    d = _secure_daemon(secure, tmp_path, creds)
    d.start()
    try:
        ctl, reason = secure.client("controller", "controller", "ctl")
        assert not getattr(reason, "is_failure", True), reason
        replies: list[mqtt.MQTTMessage] = []
        got = threading.Event()
        ctl.on_message = lambda c, u, m: (replies.append(m), got.set())
        ctl.subscribe([("edged/dev1/reply/ctl", 1), ("edged/dev1/status", 1)])
        time.sleep(0.3)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "edged/dev1/reply/ctl"
        props.CorrelationData = b"c1"
        ctl.publish("edged/dev1/cmd", json.dumps({"id": "s1", "call": ADD}), qos=1, properties=props)
        end = time.monotonic() + 15
        while time.monotonic() < end and not any(m.topic == "edged/dev1/reply/ctl" for m in replies):
            time.sleep(0.05)
        reply = next(m for m in replies if m.topic == "edged/dev1/reply/ctl")
        assert json.loads(reply.payload)["calls"][0]["result"] == {"sum": 42}
        assert any(json.loads(m.payload)["state"] == "online" for m in replies if m.topic == "edged/dev1/status")

        # another device: its own topics only
        intruder, reason = secure.client("dev2", "dev2", "edged-dev2")
        assert not getattr(reason, "is_failure", True), reason
        # mosquitto grants the SUBACK and enforces `read` at delivery: the intruder never sees dev1's commands
        snooped: list[mqtt.MQTTMessage] = []
        intruder.on_message = lambda c, u, m: snooped.append(m)
        intruder.subscribe([("edged/dev1/cmd", 1), ("edged/dev1/reply/#", 1), ("edged/+/cmd", 1)])
        time.sleep(0.3)
        props.CorrelationData = b"c2"
        ctl.publish("edged/dev1/cmd", json.dumps({"id": "s2", "call": ADD}), qos=1, properties=props)
        end = time.monotonic() + 15
        while time.monotonic() < end and not any(m.properties.CorrelationData == b"c2" for m in replies
                                                 if m.topic == "edged/dev1/reply/ctl"):
            time.sleep(0.05)
        time.sleep(0.3)
        assert snooped == [], [m.topic for m in snooped]
        pubacks: list[object] = []
        intruder.on_publish = lambda c, u, mid, rc, p: pubacks.append(rc)
        intruder.publish("edged/dev1/status", json.dumps({"state": "offline", "forged": True}), qos=1, retain=True)
        intruder.publish("edged/dev1/cmd", json.dumps({"id": "evil", "call": ADD}), qos=1)
        time.sleep(1.0)
        assert len(pubacks) == 2 and all(rc.is_failure for rc in pubacks), pubacks  # type: ignore[attr-defined]
        assert not any(b"forged" in m.payload for m in replies)
        assert not [e for e in d.logs() if e.get("request_id") == "evil"]

        # no certificate, or no password: refused at the door
        _, no_cert = secure.client("controller", None)
        assert isinstance(no_cert, (ssl.SSLError, OSError)) or getattr(no_cert, "is_failure", True), no_cert
        _, no_pw = secure.client(None, "controller")
        assert getattr(no_pw, "is_failure", True) or isinstance(no_pw, Exception), no_pw
        ctl.disconnect()
        intruder.disconnect()
    finally:
        d.stop()


def test_wrong_password_is_refused_and_logged(secure: SecureBroker, tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt_password").write_text("not-the-password\n")
    d = _secure_daemon(secure, tmp_path, creds)
    d.start(wait_ready=False)
    try:
        refused = d.wait_log("mqtt_connect_refused", timeout=15)
        assert "not-the-password" not in d.log_path.read_text()  # the secret never reaches the log
        assert refused["level"] == "warning"
        assert not [e for e in d.logs() if e.get("event") == "ready"]
    finally:
        d.stop()


def test_payload_limit_and_allowlist(daemon_factory, client, listen) -> None:
    daemon_factory.make("dev1", EDGED_MQTT__MAX_PAYLOAD_BYTES="1024", EDGED_TOOLS__ALLOW='["add_numbers"]')
    status = listen("edged/dev1/status").wait_json("edged/dev1/status")
    assert status["tools"] == ["add_numbers"]  # the others are not even offered
    big = client.request("dev1", {"id": "big", "call": {"name": "add_numbers", "arguments": {"a": 1, "b": 2}},
                                  "reply_to": "x" * 1100})
    assert big["error"]["code"] == "payload_too_large" and "limit 1024" in big["error"]["message"]
    for name in ("get_weather", "search_contacts"):
        r = client.request("dev1", {"id": name, "call": {"name": name, "arguments": {"city": "Oslo"}}})
        assert r["error"]["code"] == "tool_not_allowed", r
    assert client.request("dev1", {"id": "ok", "call": ADD})["status"] == "ok"


SHELL_CALLS = {"system", "popen", "spawnl", "spawnv", "execv", "execve", "execl", "fork", "run", "Popen", "call",
               "check_call", "check_output", "getoutput", "getstatusoutput", "exec", "eval", "compile"}


def test_no_tool_runs_a_shell() -> None:
    from edged.config import load_config
    from edged.service import Daemon as Service

    cfg = load_config(environ={"EDGED_TOOLS__ENABLE_DEBUG_TOOLS": "true", "EDGED_MODELS__ROUTER": ""})
    registry = Service(cfg).registry
    names = set(registry.names())
    assert names <= {"get_weather", "add_numbers", "search_contacts", "debug_sleep"}, names
    # statically: no module that defines tools imports subprocess/os/pty or calls exec-like functions
    for path in (REPO / "edged" / "tools").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not {"subprocess", "os", "pty", "shlex", "commands"} & {str(m).split(".")[0] for m in mods}, (
                    path, ast.dump(node))
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
                assert name not in {"system", "popen", "Popen", "exec", "eval", "execv", "execve", "spawnv"}, (
                    path, name)
