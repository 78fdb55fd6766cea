"""Tier 3 through real parts: llama-cpp-python's OpenAI-compatible server on loopback serving the Qwen2.5 stand-in as
the remote node, a real mosquitto, the daemon as a subprocess with no local tiers (every query goes to tier 3).

One story, in order: the node answers escalated requests; the node is killed mid-batch (`fallback` commands get an
answer at once, `queue` commands are stored and answered `queued`); the daemon is SIGKILLed and restarted while
they wait; a command whose deadline passed is answered `expired` even while the node is down; the node comes back
and every queued command is answered exactly once, to its own reply address with its own correlation data.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QWEN, free_port

pytestmark = [pytest.mark.mqtt, pytest.mark.model, pytest.mark.slow]

pytest.importorskip("llama_cpp.server", reason="needs llama-cpp-python[server] (the test extra)")

# the command's own tools: the node proposes calls, the client runs them (one model turn per request)
LIGHT_TOOLS = [{"type": "function", "function": {
    "name": "set_light", "description": "Switch a light on or off",
    "parameters": {"type": "object", "properties": {"room": {"type": "string"},
                                                    "state": {"type": "string", "enum": ["on", "off"]}},
                   "required": ["room", "state"]}}}]


@dataclass
class LlamaServer:
    """`python -m llama_cpp.server` as a subprocess: the remote node."""

    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(QWEN), "--host", "127.0.0.1",
             "--port", str(self.port), "--n_ctx", "2048", "--n_threads", "2"],
            stdout=subprocess.DEVNULL, stderr=open(self.log_path, "ab"),
        )
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("llama_cpp.server did not come up")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def llama_server(tmp_path: Path) -> Iterator[LlamaServer]:
    if not QWEN.exists():
        pytest.skip(f"{QWEN} missing (edged models fetch)")
    server = LlamaServer(free_port(), tmp_path / "llama-server.log")
    server.start()
    yield server
    server.kill()


def wait_until(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def remote_state(daemon: Any) -> str | None:
    states = [e.get("state") for e in daemon.logs() if e.get("event") == "remote_state"]
    return states[-1] if states else None


def test_tier3_fallback_queue_sigkill_exactly_once(daemon_factory, client, listen, llama_server) -> None:
    env = {
        "EDGED_REMOTE__URL": llama_server.url,
        "EDGED_MODELS__ROUTER": "",
        "EDGED_REMOTE__ON_OFFLINE": "fallback",
        "EDGED_REMOTE__MAX_TOKENS": "64",
        "EDGED_REMOTE__MAX_STEPS": "2",
        "EDGED_REMOTE__TEMPERATURE": "0",
        "EDGED_REMOTE__TIMEOUT_S": "90",
        "EDGED_REMOTE__FAILURE_THRESHOLD": "1",
        "EDGED_REMOTE__PROBE_INTERVAL_S": "1",
        "EDGED_REMOTE__BACKOFF_MAX_S": "1",
        "EDGED_LIMITS__DEADLINE_MS": "180000",
    }
    d = daemon_factory.make("dev1", **env)
    replies = listen(client.reply_topic)  # every message on the client's reply topic, duplicates included
    telemetry = listen("edged/dev1/telemetry")
    wait_until(lambda: remote_state(d) == "closed", 30, "the remote breaker to close")

    # -- 1. the node is up: escalated requests are answered by tier 3 ---------------------------------------------
    live_sum = client.send("dev1", {"id": "live-sum", "query": "What is 25 plus 17?", "tier": 3})
    live_light = client.send("dev1", {"id": "live-light", "query": "Turn on the light in the kitchen", "tier": 3,
                                      "tools": LIGHT_TOOLS})
    for corr, cid in ((live_sum, "live-sum"), (live_light, "live-light")):
        result = client.wait(corr, timeout=120)
        assert result["id"] == cid and result["status"] == "ok", result
        assert result["tier"] == 3 and result["model"].startswith("remote:")
        assert result["escalations"] == [{"from": 0, "reason": "requested"}]
        assert result["calls"] or result["answer"]
        if cid == "live-sum":  # the device's tools ran through the executor, then the node was asked again
            assert result["usage"]["steps"] >= 1
            assert [c["name"] for c in result["calls"]][:1] == ["add_numbers"], result
            assert result["calls"][0]["result"] == {"sum": 42}
        else:  # the command's own tools: proposed, not executed
            assert result["calls"][0]["name"] == "set_light" and result["calls"][0]["result"] is None

    # -- 2. the node dies mid-batch ------------------------------------------------------------------------------
    batch = [
        ("q1", {"query": "Turn on the light in the kitchen", "on_offline": "queue", "deadline_ms": 600000,
                "tools": LIGHT_TOOLS}),
        ("f1", {"query": "What's the weather in Paris?", "on_offline": "fallback"}),
        ("q2", {"query": "Turn off the light in the hall", "on_offline": "queue", "deadline_ms": 600000,
                "tools": LIGHT_TOOLS}),
        ("f2", {"query": "Turn on the light in the garage", "on_offline": "fallback", "tools": LIGHT_TOOLS}),
        ("q3", {"query": "Turn on the light in the bedroom", "on_offline": "queue", "deadline_ms": 600000,
                "tools": LIGHT_TOOLS}),
        ("qx", {"query": "Turn off the light in the attic", "on_offline": "queue", "deadline_ms": 10000,
                "tools": LIGHT_TOOLS}),
    ]
    corrs: dict[str, bytes] = {}
    for cid, body in batch:
        corrs[cid] = client.send("dev1", {"id": cid, "tier": 3, **body})
        if cid == "q1":
            time.sleep(0.5)  # q1 is at the node now
            llama_server.kill()
    first = {cid: client.wait(corrs[cid], timeout=60) for cid, _ in batch}
    for cid in ("q1", "q2", "q3", "qx"):
        assert first[cid]["status"] == "queued" and first[cid]["tier"] == 3, first[cid]
    for cid in ("f1", "f2"):  # nothing local can answer (no tiers 1-2): an error now, not a wait
        assert first[cid]["status"] == "error" and first[cid]["error"]["code"] == "needs_reasoning", first[cid]
    assert {"from": 3, "reason": "unreachable"} in first["q1"]["escalations"]  # it was in flight at the node
    wait_until(lambda: remote_state(d) == "open", 10, "the breaker to open")
    tele = telemetry.wait_json("edged/dev1/telemetry", lambda t: t.get("outbox", {}).get("depth") == 4)
    assert tele["remote"]["state"] == "open" and tele["remote"]["last_error"]
    # the tier split and the escalation reasons: 2 live + 4 queued went to tier 3, all 8 asked for it
    assert tele["requests"]["tiers"].get("3") == 6, tele["requests"]
    assert tele["requests"]["escalations"].get("0:requested") == 8, tele["requests"]
    assert tele["requests"]["escalations"].get("3:unreachable", 0) >= 1, tele["requests"]

    # -- 3. SIGKILL while they wait; restart with the node still down ------------------------------------------
    d.signal(signal.SIGKILL)
    assert d.proc is not None
    d.proc.wait(10)
    restarted = time.time()
    d.start()
    expired = client.wait(corrs["qx"], timeout=30)  # answered although the node is down
    assert expired["id"] == "qx" and expired["status"] == "error" and expired["error"]["code"] == "expired"
    tele = telemetry.wait_json("edged/dev1/telemetry", lambda t: t["ts"] > restarted
                               and t["outbox"]["depth"] == 3 and t["remote"]["state"] == "open")
    assert tele["outbox"]["pending"] == 3

    # -- 4. the node is back: every queued command answered once, in order, to its own address -----------------
    llama_server.start()
    finals = {cid: client.wait(corrs[cid], timeout=150) for cid in ("q1", "q2", "q3")}
    for cid, result in finals.items():
        assert result["id"] == cid and result["status"] == "ok" and result["tier"] == 3, result
        assert {"from": 0, "reason": "outbox"} in result["escalations"]
        assert result["timings_ms"]["outbox_wait"] > 0
    assert all(r["calls"] or r["answer"] for r in finals.values()), finals
    tele = telemetry.wait_json("edged/dev1/telemetry", lambda t: t["ts"] > restarted
                               and t["outbox"]["depth"] == 0 and t["remote"]["state"] == "closed", timeout=20)
    assert tele["outbox"]["answered"] == 3 and tele["outbox"]["stored"] == 0  # stored before the SIGKILL

    # nothing answered twice: one message per correlation data, apart from the `queued` notices
    time.sleep(2.0)
    finals_seen: Counter[bytes] = Counter()
    queued_seen: Counter[bytes] = Counter()
    for msg in replies.messages:
        body = json.loads(msg.payload)
        corr = msg.properties.CorrelationData
        (queued_seen if body["status"] == "queued" else finals_seen)[corr] += 1
    for cid in ("q1", "q2", "q3", "qx"):
        assert queued_seen[corrs[cid]] == 1, cid
        assert finals_seen[corrs[cid]] == 1, cid
    assert all(n == 1 for n in finals_seen.values()), finals_seen
    queued, answered = sum(queued_seen.values()), sum(finals_seen[corrs[c]] for c in ("q1", "q2", "q3", "qx"))
    print(f"queued={queued} answered_from_outbox={answered} duplicates={sum(n - 1 for n in finals_seen.values())}")
