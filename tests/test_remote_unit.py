"""Tier 3 without a model: the text-call parser, the circuit breaker and monitor, the HTTP client and the multi-step
loop against a scripted OpenAI-compatible server on loopback, the outbox and its worker, and the pipeline's
fallback when the node is gone."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from edged.llm.textcalls import parse_text_calls
from edged.outbox import ANSWERED, OutboxWorker, SqliteOutbox
from edged.pipeline import Pipeline
from edged.protocol import CallResult, Command, ErrorCode, Result
from edged.remote.client import BUDGET, NO_ANSWER, REFUSED, UNREACHABLE, ChatClient, RemoteReasoner
from edged.remote.monitor import CLOSED, HALF_OPEN, OPEN, UNKNOWN, Breaker, Monitor, backoff_delays
from edged.router import ProposedCall, RouteOutcome, ToolSpec
from edged.tiers import Conversation, ReplyAddress
from edged.tools.builtin import builtin_tools
from edged.tools.registry import ToolRegistry
from tests.conftest import free_port

KNOWN = {"get_weather", "add_numbers", "search_contacts"}
ADD = ProposedCall("add_numbers", {"a": 25, "b": 17})

# -- text calls ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "calls", "prose"), [
    ('{"name": "add_numbers", "arguments": {"a": 25, "b": 17}}', [ADD], ""),
    # llama.cpp's server with Qwen2.5 after a tool result: the call again (arguments as a string), then the result
    ('{"name": "add_numbers", "arguments": "{\\"a\\": 25, \\"b\\": 17}"}\n{"sum": 42}', [ADD], '{"sum": 42}'),
    ('Sure:\n```json\n{"name": "add_numbers", "arguments": {"a": 25, "b": 17}}\n```\nDone.', [ADD], "Sure:\nDone."),
    ('<tool_call>\n{"name": "add_numbers", "arguments": {"a": 25, "b": 17}}\n</tool_call>', [ADD], ""),
    ('<tool_call>{"name": "add_numbers", "parameters": {"a": 25, "b": 17}}', [ADD], ""),  # unclosed, "parameters"
    ('[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "add_numbers", "arguments": {"a": 25, '
     '"b": 17}}]', [ProposedCall("get_weather", {"city": "Oslo"}), ADD], ""),
    ('{"type": "function", "function": {"name": "add_numbers", "arguments": "{\\"a\\": 25, \\"b\\": 17}"}}',
     [ADD], ""),
    ("<think>maybe add_numbers {\"name\": \"add_numbers\", \"arguments\": {}}</think>It is 42.", [], "It is 42."),
    ("The answer is 42.", [], "The answer is 42."),
    ('{"name": "launch_rocket", "arguments": {}}', [], '{"name": "launch_rocket", "arguments": {}}'),
    ('```json\n{"temperature": 21}\n```', [], '```json\n{"temperature": 21}\n```'),  # JSON, not a call
    ('{"name": "add_numbers", "arguments": "not json"}', [], '{"name": "add_numbers", "arguments": "not json"}'),
])
def test_parse_text_calls(text: str, calls: list[ProposedCall], prose: str) -> None:
    assert parse_text_calls(text, KNOWN) == (calls, prose)


def test_parse_text_calls_keeps_unknown_calls_of_a_list_as_prose() -> None:
    calls, prose = parse_text_calls(
        '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "nope", "arguments": {}}]', KNOWN)
    assert calls == [ProposedCall("get_weather", {"city": "Oslo"})]
    assert json.loads(prose) == {"name": "nope", "arguments": {}}


def test_parse_text_calls_survives_garbage() -> None:
    for text in ["", "{", "[[[[", "```", "<tool_call>", "{" * 5000, '{"name": 1}', "\x00\ud800"]:
        calls, _ = parse_text_calls(text, KNOWN)
        assert calls == []


# -- breaker and monitor -------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_states() -> None:
    clock = Clock()
    changes: list[tuple[str, str]] = []
    b = Breaker(failure_threshold=3, clock=clock, on_change=lambda old, new, snap: changes.append((old, new)))
    assert b.state == UNKNOWN and not b.available()
    b.success(probe=True)  # first probe ok
    assert b.state == CLOSED and b.available() and b.last_ok == 1000.0
    b.failure("timeout")
    b.failure("timeout")
    assert b.state == CLOSED and b.failures == 2  # below the threshold
    b.success()
    assert b.failures == 0
    for _ in range(3):
        clock.now += 1
        b.failure("refused")
    assert b.state == OPEN and not b.available() and b.snapshot()["opened_at"] == 1003.0
    b.success(probe=True)  # a probe answers: let requests through, the next failure opens again at once
    assert b.state == HALF_OPEN and b.available()
    b.failure("refused")
    assert b.state == OPEN
    b.success(probe=True)
    b.success()  # a real request worked
    assert b.state == CLOSED
    assert changes == [(UNKNOWN, CLOSED), (CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN),
                       (HALF_OPEN, CLOSED)]
    snap = b.snapshot()
    assert snap["failures_total"] == 6 and snap["last_error"] == "refused" and snap["opened_at"] is None


def test_breaker_first_failure_opens_from_unknown() -> None:
    b = Breaker(failure_threshold=5)
    b.failure("refused")
    assert b.state == OPEN


def test_backoff_doubles_to_cap_with_jitter() -> None:
    exact = backoff_delays(0.5, 8.0, jitter=0.0)
    assert [exact(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    jittered = backoff_delays(1.0, 60.0, jitter=0.2)
    assert all(0.8 <= jittered(0) <= 1.2 for _ in range(100))
    assert exact(10_000) == 8.0


def test_monitor_probes_with_backoff_until_the_node_answers() -> None:
    up = threading.Event()
    calls: list[float] = []

    def probe() -> str | None:
        calls.append(time.monotonic())
        return None if up.is_set() else "refused"

    breaker = Breaker(failure_threshold=2)
    monitor = Monitor(breaker, probe, interval_s=30.0, backoff_first_s=0.05, backoff_max_s=0.2)
    monitor.start()
    try:
        deadline = time.monotonic() + 5
        while len(calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert breaker.state == OPEN and len(calls) >= 4
        up.set()
        while breaker.state != HALF_OPEN and time.monotonic() < deadline:
            time.sleep(0.01)
        assert breaker.available()
        probes = len(calls)
        time.sleep(0.3)  # up: the next probe is interval_s (30 s) away
        assert len(calls) == probes
    finally:
        monitor.stop()


def test_monitor_skips_probes_while_a_request_is_in_flight() -> None:
    breaker = Breaker()
    breaker.success()
    monitor = Monitor(breaker, lambda: "should not be called", interval_s=0.5)
    breaker.begin()
    assert not monitor._should_probe()
    breaker.end()
    breaker.failure("reset")  # a real request failed: probe now to learn more
    assert monitor._should_probe()


# -- a scripted OpenAI-compatible server ---------------------------------------------------------------------------


class FakeNode:
    """Answers each POST /chat/completions with the next scripted reply (status, body); records the requests."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, Any]]] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.delay = 0.0
        node = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except BrokenPipeError:
                    pass  # the client gave up (deadline tests)

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "fake"}]})

            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                node.requests.append(json.loads(self.rfile.read(length)))
                node.headers.append(dict(self.headers))
                time.sleep(node.delay)
                status, body = node.script.pop(0) if node.script else (200, reply("nothing scripted"))
                self._send(status, body)

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def reply(content: str | None = None, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5}}


@pytest.fixture
def node() -> Iterator[FakeNode]:
    fake = FakeNode()
    yield fake
    fake.close()


@pytest.fixture
def registry() -> ToolRegistry:
    reg = ToolRegistry(allow=None)
    reg.register_all(builtin_tools())
    return reg


def executor(registry: ToolRegistry) -> Any:
    def run(name: str, arguments: dict[str, Any]) -> CallResult:
        return CallResult(name=name, arguments=arguments, result=registry.run(name, arguments, timeout_s=5))
    return run


def specs(registry: ToolRegistry) -> list[ToolSpec]:
    return [ToolSpec(t.name, t.description, t.parameters) for t in registry.allowed()]


def reasoner(url: str, *, api_key: str | None = None, max_steps: int = 4, timeout_s: float = 5.0) -> RemoteReasoner:
    breaker = Breaker(failure_threshold=2)
    breaker.success()
    return RemoteReasoner(ChatClient(url, "qwen3:4b", api_key=api_key, timeout_s=timeout_s), breaker,
                          max_steps=max_steps, max_tokens=64, temperature=0)


def test_multi_step_with_native_tool_calls(node: FakeNode, registry: ToolRegistry) -> None:
    node.script = [
        (200, reply(None, [{"id": "c1", "type": "function",
                            "function": {"name": "add_numbers", "arguments": '{"a": 25, "b": 17}'}}])),
        (200, reply("25 plus 17 is 42.")),
    ]
    r = reasoner(node.url, api_key="s3cret-token")
    with capture_logs() as logs:
        answer = r.answer(Conversation("What is 25 plus 17?", specs(registry), executor(registry),
                                       time.monotonic() + 10))
    assert answer.gave_up is None and answer.answer == "25 plus 17 is 42."
    assert [(c.name, c.arguments, c.result) for c in answer.calls] == [("add_numbers", {"a": 25, "b": 17},
                                                                        {"sum": 42})]
    assert answer.usage["steps"] == 2 and answer.usage["prompt_tokens"] == 20
    first, second = node.requests
    assert first["model"] == "qwen3:4b" and first["tool_choice"] == "auto" and first["temperature"] == 0
    assert {t["function"]["name"] for t in first["tools"]} == KNOWN
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool"]
    assert second["messages"][2]["content"] == ""  # llama.cpp's server refuses null content
    assert json.loads(second["messages"][3]["content"]) == {"sum": 42}
    assert second["messages"][3]["tool_call_id"] == second["messages"][2]["tool_calls"][0]["id"]
    assert node.headers[0]["Authorization"] == "Bearer s3cret-token"
    assert "s3cret" not in repr(r.client) and "s3cret" not in json.dumps(logs, default=str)


def test_text_calls_and_repeats_end_the_loop(node: FakeNode, registry: ToolRegistry) -> None:
    # what llama-cpp-python's server does with Qwen2.5: calls as text, then the same call again with the result
    node.script = [
        (200, reply('```json\n{"name": "add_numbers", "arguments": {"a": 25, "b": 17}}\n```')),
        (200, reply('{"name": "add_numbers", "arguments": "{\\"a\\": 25, \\"b\\": 17}"}\n{"sum": 42}')),
    ]
    answer = reasoner(node.url).answer(Conversation("25+17?", specs(registry), executor(registry),
                                                    time.monotonic() + 10))
    assert answer.gave_up is None and len(answer.calls) == 1 and answer.answer == '{"sum": 42}'
    assert len(node.requests) == 2


def test_client_tools_are_returned_unexecuted(node: FakeNode) -> None:
    node.script = [(200, reply('<tool_call>{"name": "set_light", "arguments": {"room": "hall"}}</tool_call>'))]
    tools = [ToolSpec("set_light", "Switch a light", {"type": "object", "properties": {"room": {"type": "string"}}})]
    answer = reasoner(node.url).answer(Conversation("hall light", tools, None, time.monotonic() + 10))
    assert [(c.name, c.arguments, c.result) for c in answer.calls] == [("set_light", {"room": "hall"}, None)]
    assert answer.gave_up is None and len(node.requests) == 1


def test_step_budget_without_calls_gives_up(node: FakeNode, registry: ToolRegistry) -> None:
    node.script = [(200, reply("")), (200, reply(""))]
    r = reasoner(node.url, max_steps=1)
    assert r.answer(Conversation("?", specs(registry), executor(registry), time.monotonic() + 10)).gave_up \
        == NO_ANSWER
    r = reasoner(node.url, max_steps=1)
    node.script = [(200, reply('{"name": "get_weather", "arguments": {"city": "Oslo"}}'))]
    answer = r.answer(Conversation("weather", specs(registry), executor(registry), time.monotonic() + 10))
    # the budget ended the conversation after a call ran: the call stands (re-running it elsewhere repeats it)
    assert answer.gave_up is None and answer.calls[0].result["city"] == "Oslo" and answer.usage["unfinished"] == 1
    assert r.answer(Conversation("weather", specs(registry), executor(registry), time.monotonic())).gave_up == BUDGET


def test_failures_feed_the_breaker(node: FakeNode, registry: ToolRegistry) -> None:
    r = reasoner(node.url)
    conv = Conversation("?", specs(registry), executor(registry), time.monotonic() + 10)
    node.script = [(400, {"error": "context too long"})]
    assert r.answer(conv).gave_up == REFUSED and r.breaker.state == CLOSED  # our fault, not the node's
    node.script = [(503, {"error": "loading"}), (401, {"error": "bad token"})]
    assert r.answer(conv).gave_up == UNREACHABLE and r.available()  # 1 of 2
    assert r.answer(conv).gave_up == UNREACHABLE and not r.available()
    assert r.state()["state"] == OPEN and "HTTP 401" in r.state()["last_error"]


def test_unreachable_node_and_timeouts() -> None:
    dead = reasoner(f"http://127.0.0.1:{free_port()}/v1")
    answer = dead.answer(Conversation("?", [], None, time.monotonic() + 5))
    assert answer.gave_up == UNREACHABLE and dead.breaker.failures == 1
    assert dead.client.probe(1.0) is not None


def test_deadline_cut_does_not_count_against_the_node(node: FakeNode) -> None:
    node.delay = 1.0
    r = reasoner(node.url, timeout_s=30)
    answer = r.answer(Conversation("?", [], None, time.monotonic() + 0.4))
    assert answer.gave_up == BUDGET and r.breaker.failures == 0


def test_client_rejects_bad_urls() -> None:
    with pytest.raises(ValueError):
        ChatClient("node:11434", "m")


def test_run_queued_runs_the_device_tools_through_tier_3(node: FakeNode, registry: ToolRegistry) -> None:
    node.script = [(200, reply('{"name": "add_numbers", "arguments": {"a": 7, "b": 5}}')), (200, reply("It is 12."))]
    pipeline = Pipeline(registry, "dev1", 5000, remote=reasoner(node.url))
    result = pipeline.run_queued(json.dumps({"id": "q1", "query": "7 plus 5?", "tier": 3}), time.monotonic() + 10)
    assert result.status == "ok" and result.tier == 3 and result.answer == "It is 12." and result.device == "dev1"
    assert result.calls[0].result == {"sum": 12} and result.escalations == [{"from": 0, "reason": "outbox"}]
    dead = Pipeline(registry, "dev1", 5000, remote=reasoner(f"http://127.0.0.1:{free_port()}/v1"))
    failed = dead.run_queued(json.dumps({"id": "q1", "query": "7 plus 5?"}), time.monotonic() + 10)
    assert failed.status == "error" and failed.escalations[-1] == {"from": 3, "reason": UNREACHABLE}
    assert pipeline.run_queued("{not json", time.monotonic() + 1).error.code == ErrorCode.BAD_COMMAND


# -- outbox --------------------------------------------------------------------------------------------------------


class FakeInfo:
    def __init__(self) -> None:
        self.acked = True


class FakeBus:
    def __init__(self) -> None:
        self.connected = threading.Event()
        self.connected.set()
        self.published: list[tuple[str, dict[str, Any], bytes | None]] = []
        self.ack = True

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None) -> Any:
        self.published.append((topic, json.loads(payload), correlation_data))
        return FakeInfo()

    def wait_published(self, info: Any, timeout: float) -> bool:
        if not self.ack:
            self.on_no_ack()
        return self.ack

    def on_no_ack(self) -> None:
        pass


class FakeRemote:
    name = "remote:fake"

    def __init__(self, up: bool = True) -> None:
        self.up = up

    def available(self) -> bool:
        return self.up

    def state(self) -> dict[str, Any]:
        return {"state": "closed" if self.up else "open"}


class FakeRunner:
    def __init__(self) -> None:
        self.ran: list[str] = []
        self.unreachable = False

    def run_queued(self, command_json: str, deadline: float) -> Result:
        command = Command.model_validate_json(command_json)
        self.ran.append(command.id)
        if self.unreachable:
            result = Result.failure(command.id, ErrorCode.NEEDS_REASONING, "tier 3 could not answer: unreachable")
            result.escalations = [{"from": 0, "reason": "outbox"}, {"from": 3, "reason": "unreachable"}]
            return result
        return Result(id=command.id, status="ok", tier=3, answer=f"answer to {command.query}")


def put(outbox: SqliteOutbox, cid: str, deadline_in: float = 600.0) -> None:
    outbox.put(json.dumps({"id": cid, "query": f"q {cid}", "tier": 3}), cid,
               ReplyAddress("client/reply", cid.encode()), time.time() + deadline_in)


def test_outbox_is_durable_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = SqliteOutbox(path)
    put(outbox, "a")
    put(outbox, "a")  # a redelivered command is stored once
    put(outbox, "b")
    assert outbox.depth() == 2
    outbox._db.close()  # no orderly close: what SIGKILL leaves behind
    again = SqliteOutbox(path)
    rows = again.rows()
    assert [r.command_id for r in rows] == ["a", "b"]
    assert rows[0].reply == ReplyAddress("client/reply", b"a") and rows[0].state == "pending"
    assert again._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_worker_answers_in_order_to_the_stored_address(tmp_path: Path) -> None:
    outbox, bus, runner = SqliteOutbox(tmp_path / "o.sqlite3"), FakeBus(), FakeRunner()
    for cid in ("a", "b", "c"):
        put(outbox, cid)
    put(outbox, "old", deadline_in=-1)
    worker = OutboxWorker(outbox, runner, FakeRemote(), bus, device_id="dev1", run_budget_s=5)
    assert worker.run_once()
    assert runner.ran == ["a", "b", "c"]  # the expired one never reaches the model
    assert [(t, r["id"], r["status"], c) for t, r, c in bus.published] == [
        ("client/reply", "a", "ok", b"a"), ("client/reply", "b", "ok", b"b"), ("client/reply", "c", "ok", b"c"),
        ("client/reply", "old", "error", b"old")]
    assert bus.published[3][1]["error"]["code"] == "expired"
    assert outbox.depth() == 0 and outbox.stats()["answered"] == 3 and outbox.stats()["expired"] == 1
    assert not worker.run_once() and len(bus.published) == 4  # nothing twice


def test_worker_keeps_commands_while_the_node_is_down(tmp_path: Path) -> None:
    outbox, bus, runner = SqliteOutbox(tmp_path / "o.sqlite3"), FakeBus(), FakeRunner()
    remote = FakeRemote(up=False)
    put(outbox, "a")
    put(outbox, "late", deadline_in=-1)
    worker = OutboxWorker(outbox, runner, remote, bus, device_id="dev1", run_budget_s=5)
    worker.run_once()
    assert runner.ran == [] and [r["id"] for _, r, _ in bus.published] == ["late"]  # expiry needs no node
    remote.up, runner.unreachable = True, True  # believed up, but the request fails
    worker.run_once()
    assert runner.ran == ["a"] and outbox.depth() == 1 and outbox.rows()[0].attempts == 1
    runner.unreachable = False
    worker.run_once()
    assert [r["id"] for _, r, _ in bus.published] == ["late", "a"] and outbox.depth() == 0


def test_answered_row_is_republished_not_rerun_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    outbox, bus, runner = SqliteOutbox(path), FakeBus(), FakeRunner()
    put(outbox, "a")
    bus.ack = False  # the broker never confirms: we "crash" before the PUBACK
    worker = OutboxWorker(outbox, runner, FakeRemote(), bus, device_id="dev1", run_budget_s=5)
    bus.on_no_ack = worker._stop.set  # type: ignore[method-assign]  # stopped while waiting for the PUBACK
    worker.run_once()
    assert runner.ran == ["a"] and outbox.rows()[0].state == ANSWERED
    outbox._db.close()
    outbox2, bus2, runner2 = SqliteOutbox(path), FakeBus(), FakeRunner()
    OutboxWorker(outbox2, runner2, FakeRemote(), bus2, device_id="dev1", run_budget_s=5).run_once()
    assert runner2.ran == []  # the tools and the model are not run again
    assert [r["answer"] for _, r, _ in bus2.published] == ["answer to q a"] and outbox2.depth() == 0


def test_row_answered_live_after_a_redelivery_is_dropped(tmp_path: Path) -> None:
    from edged.answered import AnsweredStore

    store = AnsweredStore(None, 100)
    outbox, bus, runner = SqliteOutbox(None), FakeBus(), FakeRunner()
    put(outbox, "a")
    put(outbox, "b")
    store.put(store.key("client/reply", "a"), Result(id="a", status="ok", tier=3).to_json())
    store.put(store.key("client/reply", "b"), Result(id="b", status="queued", tier=3).to_json())
    OutboxWorker(outbox, runner, FakeRemote(), bus, device_id="dev1", run_budget_s=5, store=store).run_once()
    assert runner.ran == ["b"] and [r["id"] for _, r, _ in bus.published] == ["b"] and outbox.depth() == 0
    payload, published = store.get(store.key("client/reply", "b")) or (b"", False)
    assert json.loads(payload)["status"] == "ok" and published  # a retry of "b" now gets the final result


def test_published_rows_are_dropped_at_start(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    outbox = SqliteOutbox(path)
    put(outbox, "a")
    outbox._db.execute("UPDATE outbox SET state='published'")  # PUBACK marked, the delete lost
    outbox._db.close()
    assert SqliteOutbox(path).depth() == 0 and SqliteOutbox(path).rows() == []


# -- the pipeline with a dead node ---------------------------------------------------------------------------------


class DoubtfulRouter:
    """Proposes a call with low confidence: the policy escalates, the call remains the best local answer."""

    name = "stub"

    def route(self, query: str, tools: list[ToolSpec], deadline: float) -> RouteOutcome:
        return RouteOutcome(calls=[ProposedCall("get_weather", {"city": "Paris"})], usage={"confidence": 0.1},
                            model="stub")


def test_pipeline_falls_back_degraded_or_queues_when_the_node_is_gone(registry: ToolRegistry,
                                                                      tmp_path: Path) -> None:
    from edged.escalation import EscalationPolicy

    dead = reasoner(f"http://127.0.0.1:{free_port()}/v1")
    outbox = SqliteOutbox(tmp_path / "o.sqlite3")
    pipeline = Pipeline(registry, "dev1", 5000, DoubtfulRouter(), remote=dead, outbox=outbox,
                        policy=EscalationPolicy(min_confidence=0.5))
    reply = ReplyAddress("client/reply", b"x")
    fallback = pipeline.handle(Command(id="f", query="weather in Paris?"), time.monotonic(), reply)
    assert fallback.status == "degraded" and fallback.tier == 1 and fallback.calls[0].name == "get_weather"
    assert fallback.escalations == [{"from": 1, "reason": "low_confidence"}, {"from": 3, "reason": "unreachable"}]
    queued = pipeline.handle(Command(id="q", query="weather in Paris?", on_offline="queue"), time.monotonic(), reply)
    assert queued.status == "queued" and queued.tier == 3 and outbox.depth() == 1
    assert not dead.available()  # the second failure in a row opened the breaker (threshold 2)
    again = pipeline.handle(Command(id="q2", query="weather in Paris?", on_offline="queue"), time.monotonic(), reply)
    assert again.status == "queued" and outbox.depth() == 2
    assert again.escalations == [{"from": 1, "reason": "low_confidence"}]  # the node was not tried
