"""The MQTT contract, through a real mosquitto and the daemon as a real subprocess."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from typing import Any

import pytest

from edged import __version__
from edged.client import EdgedClient

pytestmark = pytest.mark.mqtt

ADD = {"name": "add_numbers", "arguments": {"a": 25, "b": 17}}


def _ok_add(result: dict[str, Any], cid: str) -> None:
    assert result["id"] == cid and result["status"] == "ok", result
    assert result["calls"][0]["result"] == {"sum": 42}
    assert result["device"] == "dev1" and result["tier"] == 0


# -- replies -----------------------------------------------------------------------------------------------------

def test_v5_response_topic_and_correlation_data(daemon, client, listen) -> None:
    _ok_add(client.request("dev1", {"id": "c1", "call": ADD}), "c1")
    replies = listen("my/replies/#", "edged/dev1/result")
    corr = b"\x00\xffbinary-correlation"
    replies.publish("edged/dev1/cmd", json.dumps({"id": "c2", "call": ADD}), ResponseTopic="my/replies/x",
                    CorrelationData=corr)
    msg = replies.wait_for(lambda m: m.topic == "my/replies/x")
    assert msg.properties.CorrelationData == corr
    _ok_add(json.loads(msg.payload), "c2")
    # the Response Topic wins over reply_to
    replies.publish("edged/dev1/cmd", json.dumps({"id": "c3", "call": ADD, "reply_to": "my/replies/other"}),
                    ResponseTopic="my/replies/x", CorrelationData=b"c3")
    replies.wait_for(lambda m: m.topic == "my/replies/x" and m.properties.CorrelationData == b"c3")
    time.sleep(0.3)
    assert [m.topic for m in replies.messages] == ["my/replies/x", "my/replies/x"]


def test_v311_client_with_reply_to(daemon, listen) -> None:
    old = listen("v311/replies", protocol=3)
    old.publish("edged/dev1/cmd", json.dumps({"id": "o1", "call": ADD, "reply_to": "v311/replies"}))
    _ok_add(old.wait_json("v311/replies"), "o1")


def test_daemon_speaking_v311(daemon_factory, listen) -> None:
    daemon_factory.make("dev1", EDGED_MQTT__PROTOCOL="v311")
    status = listen("edged/dev1/status").wait_json("edged/dev1/status")
    assert status["state"] == "online"
    old = listen("v311/r", protocol=3)
    old.publish("edged/dev1/cmd", json.dumps({"id": "o2", "call": ADD, "reply_to": "v311/r"}))
    _ok_add(old.wait_json("v311/r"), "o2")
    old.publish("edged/dev1/cmd", b"{not json")  # no address at all: dropped, and the daemon goes on
    old.publish("edged/dev1/cmd", json.dumps({"id": "o3", "call": {"name": "nope"}, "reply_to": "v311/r"}))
    assert old.wait_json("v311/r", lambda b: b["id"] == "o3")["error"]["code"] == "unknown_tool"


def test_result_topic_when_no_reply_address(daemon, listen) -> None:
    watch = listen("edged/dev1/result")
    watch.publish("edged/dev1/cmd", json.dumps({"id": "plain", "call": ADD}))  # v5, but no Response Topic
    _ok_add(watch.wait_json("edged/dev1/result"), "plain")
    watch.publish("edged/dev1/cmd", json.dumps({"id": "bad-plain", "query": "q", "call": ADD}))
    bad = watch.wait_json("edged/dev1/result", lambda b: b["id"] == "bad-plain")
    assert bad["status"] == "error" and bad["error"]["code"] == "bad_command"


# -- bad input -----------------------------------------------------------------------------------------------------

def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value


BAD_INPUT: list[tuple[str, bytes, str, str | None]] = [
    ("oversized", json.dumps({"id": "big", "query": "x" * 70000}).encode(), "payload_too_large", None),
    ("not-utf8", b'{"id": "u", "query": "caf\xe9"}', "bad_encoding", None),
    ("lone-surrogate", b'{"id": "s", "call": {"name": "get_weather", "arguments": {"city": "\\udc00"}}}',
     "bad_encoding", "s"),
    ("not-json", b"what is the weather", "bad_json", None),
    ("nan", b'{"id": "n", "call": {"name": "add_numbers", "arguments": {"a": NaN, "b": 1}}}', "bad_json", None),
    ("huge-int", b'{"id": "h", "query": "q", "deadline_ms": ' + b"7" * 5000 + b"}", "bad_json", None),
    ("not-object", b'["id", "query"]', "bad_command", None),
    ("missing-id", b'{"query": "hello"}', "bad_command", None),
    ("both", json.dumps({"id": "b", "query": "q", "call": ADD}).encode(), "bad_command", "b"),
    ("neither", b'{"id": "e"}', "bad_command", "e"),
    ("wrong-type", b'{"id": "t", "query": ["not", "a", "string"]}', "bad_command", "t"),
    ("wrong-type-id", b'{"id": 17, "query": "q"}', "bad_command", None),
    ("deep", json.dumps({"id": "d", "call": {"name": "add_numbers", "arguments": _nested(40)}}).encode(),
     "bad_command", "d"),
    ("unknown-field", b'{"id": "f", "query": "q", "colour": "red"}', "bad_command", "f"),
    ("unknown-tool", b'{"id": "ut", "call": {"name": "launch_rocket", "arguments": {}}}', "unknown_tool", "ut"),
    ("invalid-arguments", b'{"id": "ia", "call": {"name": "add_numbers", "arguments": {"a": "x"}}}',
     "invalid_arguments", "ia"),
    ("extra-argument", b'{"id": "ea", "call": {"name": "get_weather", "arguments": {"city": "Oslo", "u": 1}}}',
     "invalid_arguments", "ea"),
]


def test_every_bad_input_class_gets_its_error_and_the_daemon_keeps_serving(daemon, client) -> None:
    sent = [(name, client.send("dev1", payload), code, cid) for name, payload, code, cid in BAD_INPUT]
    for name, corr, code, cid in sent:
        result = client.wait(corr, timeout=15)
        assert result["status"] == "error", (name, result)
        assert result["error"]["code"] == code, (name, result)
        assert result["error"]["message"], name
        assert result["id"] == cid, (name, result)
        assert result["device"] == "dev1"
    assert daemon.proc.poll() is None
    _ok_add(client.request("dev1", {"id": "after", "call": ADD}), "after")
    bad_lines = [e for e in daemon.logs() if e.get("event") == "bad_command"]
    assert {e["code"] for e in bad_lines} >= {"payload_too_large", "bad_encoding", "bad_json", "bad_command"}
    assert all(e["replied"] is True for e in bad_lines)
    answered = {e.get("request_id"): e for e in daemon.logs() if e.get("event") == "answered"}
    assert answered["ut"]["error"] == "unknown_tool" and answered["ia"]["error"] == "invalid_arguments"


def test_invalid_arguments_details_and_tool_not_allowed(daemon_factory, client) -> None:
    daemon_factory.make("dev1", EDGED_TOOLS__ALLOW='["add_numbers"]')
    r = client.request("dev1", {"id": "w", "call": {"name": "get_weather", "arguments": {"city": "Oslo"}}})
    assert r["status"] == "error" and r["error"]["code"] == "tool_not_allowed"
    r = client.request("dev1", {"id": "i", "call": {"name": "add_numbers", "arguments": {"a": 1}}})
    assert r["error"]["code"] == "invalid_arguments"
    assert [d["loc"] for d in r["error"]["details"]] == ["b"]
    assert r["calls"][0]["error"]["code"] == "invalid_arguments" and r["calls"][0]["result"] is None
    _ok_add(client.request("dev1", {"id": "ok", "call": ADD}), "ok")


def test_no_id_and_no_reply_address_is_dropped_with_a_log_line(daemon, listen) -> None:
    watch = listen("edged/#")
    watch.publish("edged/dev1/cmd", b'{"query": "who am I?"}')
    watch.publish("edged/dev1/cmd", b"\xff\xfe garbage")
    watch.publish("edged/dev1/cmd", json.dumps({"id": "marker", "call": ADD}))
    _ok_add(watch.wait_json("edged/dev1/result"), "marker")  # processed after the two bad ones
    lines = [e for e in daemon.logs() if e.get("event") == "bad_command"]
    assert [(e["code"], e["replied"], e["request_id"]) for e in lines] == [
        ("bad_command", False, None), ("bad_encoding", False, None)]
    assert all(e["topic"] == "edged/dev1/cmd" and e["level"] == "warning" and e["message"] for e in lines)
    assert len(watch.json("edged/dev1/result")) == 1  # nothing was published for the two dropped ones


# -- status and telemetry ---------------------------------------------------------------------------------------

def test_status_online_then_last_will_on_sigkill(daemon, daemon_factory, listen) -> None:
    status = listen("edged/dev1/status").wait_json("edged/dev1/status")
    assert status["state"] == "online" and status["version"] == __version__
    assert set(status["tools"]) == {"get_weather", "add_numbers", "search_contacts"}
    assert status["topics"]["cmd"] == "edged/dev1/cmd"
    daemon.signal(signal.SIGKILL)
    daemon.proc.wait(10)
    fresh = listen("edged/dev1/status")  # a new subscriber sees the retained Last Will
    assert fresh.wait_json("edged/dev1/status", lambda b: b["state"] == "offline")["device"] == "dev1"
    assert [m.retain for m in fresh.messages] == [True]
    # a restart takes 'online' back
    again = daemon_factory.make("dev1")
    assert fresh.wait_json("edged/dev1/status", lambda b: b["state"] == "online")
    assert again.stop() == 0


def test_sigterm_publishes_stopped(daemon, listen) -> None:
    watch = listen("edged/dev1/status")
    watch.wait_json("edged/dev1/status", lambda b: b["state"] == "online")
    assert daemon.stop() == 0
    watch.wait_json("edged/dev1/status", lambda b: b["state"] == "stopped")
    later = listen("edged/dev1/status")
    assert later.wait_json("edged/dev1/status")["state"] == "stopped"  # retained, and no Last Will after it
    time.sleep(0.3)
    assert [b["state"] for b in later.json()] == ["stopped"]
    assert daemon.wait_log("stopped")


def test_telemetry_has_real_figures(daemon, client, listen) -> None:
    for i in range(3):
        _ok_add(client.request("dev1", {"id": f"t{i}", "call": ADD}), f"t{i}")
    for payload in (b"nope", b'{"id": "x"}'):
        assert client.request("dev1", payload)["status"] == "error"
    watch = listen("edged/dev1/telemetry")
    t = watch.wait_json("edged/dev1/telemetry", lambda b: b["requests"]["requests_total"] == 5, timeout=10)
    assert t["device"] == "dev1"
    res = t["resources"]
    assert res["rss_bytes"] > 10 << 20 and res["mem_total_bytes"] > res["mem_available_bytes"] > 0
    assert len(res["load_avg"]) == 3 and res["disk_free_bytes"] > 0
    assert 0 <= res["cpu_pct"] <= 100
    req = t["requests"]
    assert req["requests"] == {"ok": 3, "error": 2}
    assert req["errors"] == {"bad_json": 1, "bad_command": 1} and req["tiers"] == {"0": 3}
    assert req["latency_ms"]["p50"] is not None and req["latency_ms"]["p95"] >= req["latency_ms"]["p50"] >= 0
    assert t["queue"] == {"depth": 0, "capacity": 64}
    assert t["mqtt"]["connected"] is True and t["uptime_s"] > 0
    assert not any(m.retain for m in watch.messages)


# -- load: busy ---------------------------------------------------------------------------------------------------

def test_busy_when_the_queue_is_full(daemon_factory, client) -> None:
    # the derived Receive Maximum (queue + workers) would keep the burst at the broker: let it all reach the daemon
    daemon_factory.make("dev1", EDGED_LIMITS__QUEUE_SIZE="1", EDGED_LIMITS__RETRY_AFTER_MS="250",
                        EDGED_MQTT__RECEIVE_MAXIMUM="65535")
    n = 300
    corrs = {client.send("dev1", {"id": f"b{i}", "call": ADD}): f"b{i}" for i in range(n)}
    results = {cid: client.wait(corr, timeout=30) for corr, cid in corrs.items()}
    statuses = [r["status"] for r in results.values()]
    assert set(statuses) <= {"ok", "busy"}
    busy = [r for r in results.values() if r["status"] == "busy"]
    assert busy, "a queue of 1 never filled under a burst of 300"
    assert all(r["retry_after_ms"] == 250 and r["calls"] == [] for r in busy)
    assert all(results[cid]["id"] == cid for cid in results)
    assert statuses.count("ok") >= 3
    time.sleep(0.5)
    assert len(client._results) == 0  # exactly one result each: no stray second answer


# -- mosquitto-clients, as the README shows ------------------------------------------------------------------------

def _tail(args: list[str]) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _wait_lines(lines: list[str], pred: Any, timeout: float = 10.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        hit = next((line for line in lines if pred(line)), None)
        if hit is not None:
            return hit
        time.sleep(0.05)
    raise TimeoutError(f"no matching line; got {lines}")


@pytest.mark.skipif(not shutil.which("mosquitto_pub"), reason="mosquitto-clients not installed")
def test_mosquitto_clients_as_in_the_readme(daemon, broker) -> None:
    port = ["-h", "127.0.0.1", "-p", str(broker.port)]
    out = subprocess.run(["mosquitto_sub", *port, "-t", "edged/+/status", "-v", "-C", "1", "-W", "10"],
                         capture_output=True, text=True, timeout=15)
    topic, _, body = out.stdout.strip().partition(" ")
    assert topic == "edged/dev1/status" and json.loads(body)["state"] == "online"

    sub, lines = _tail(["mosquitto_sub", *port, "-t", "demo/replies", "-v", "-V", "mqttv5", "-F", "%t %D %p"])
    try:
        # mosquitto_sub gives no sign that it has subscribed: probe until it prints something
        deadline = time.monotonic() + 10
        while not lines and time.monotonic() < deadline:
            subprocess.run(["mosquitto_pub", *port, "-t", "demo/replies", "-m", "probe"], check=True, timeout=10)
            time.sleep(0.1)
        subprocess.run(["mosquitto_pub", *port, "-t", "edged/dev1/cmd", "-q", "1", "-m",
                        '{"id": "r2", "call": {"name": "add_numbers", "arguments": {"a": 25, "b": 17}}, '
                        '"reply_to": "demo/replies"}'], check=True, timeout=10)
        line = _wait_lines(lines, lambda s: '"r2"' in s)
        _ok_add(json.loads(line.split(" ", 2)[2]), "r2")
        subprocess.run(["mosquitto_pub", *port, "-V", "mqttv5", "-t", "edged/dev1/cmd", "-q", "1",
                        "-D", "publish", "response-topic", "demo/replies",
                        "-D", "publish", "correlation-data", "abc",
                        "-m", '{"id": "r1", "query": "What is the weather in Tokyo?"}'], check=True, timeout=10)
        line = _wait_lines(lines, lambda s: '"r1"' in s)
        topic, corr, body = line.split(" ", 2)
        assert (topic, corr) == ("demo/replies", "abc")
        result = json.loads(body)
        assert result["id"] == "r1" and result["status"] in ("ok", "error")
        if result["status"] == "error":  # no router model in the tests: a clear error, not silence
            assert result["error"]["code"] == "no_model"
    finally:
        sub.terminate()
        sub.wait(5)


def test_edged_ask_cli(daemon, broker) -> None:
    import os
    import sys

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
    out = subprocess.run(
        [sys.executable, "-m", "edged", "ask", "--call", "add_numbers", "--args", '{"a": 25, "b": 17}',
         "--device", "dev1", "--host", "127.0.0.1", "--port", str(broker.port), "--timeout", "15"],
        capture_output=True, text=True, timeout=30, cwd=REPO, env=env,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["calls"][0]["result"] == {"sum": 42}


def test_client_is_reusable(daemon, broker) -> None:
    with EdgedClient("127.0.0.1", broker.port) as c:
        _ok_add(c.request("dev1", {"id": "z", "call": ADD}, timeout=10), "z")
