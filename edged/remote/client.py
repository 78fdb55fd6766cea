"""Tier 3: a remote node behind an OpenAI-compatible chat-completions API (Ollama's /v1, llama.cpp's server, vLLM).

`ChatClient` speaks HTTP(S) with the standard library only: a bearer token from a secret file (never logged), TLS
with an optional private CA, a short connect timeout and a per-request read timeout. `RemoteReasoner` holds the
multi-step conversation: it offers the tools, executes the calls the model makes through the pipeline's executor,
feeds the results back (role "tool") and asks again, until the model answers in words or the step/time budget ends.

Servers differ in how they return calls: parsed `message.tool_calls` (Ollama, vLLM with a tool parser) or the call
written in `content` (llama-cpp-python's server with a Hermes-style model): both are accepted.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from edged.llm.textcalls import as_call, parse_text_calls
from edged.protocol import CallResult
from edged.remote.monitor import Breaker, Monitor
from edged.router import ProposedCall, ToolSpec
from edged.tiers import Conversation, TierAnswer

log = structlog.get_logger(__name__)

# TierAnswer.gave_up values. UNREACHABLE means "try again later" (the outbox keeps the command); the others are
# answers of a working node that could not finish the request.
UNREACHABLE = "unreachable"
BUDGET = "budget"
BAD_RESPONSE = "bad_response"
REFUSED = "refused"
NO_ANSWER = "no_answer"

MAX_RESPONSE_BYTES = 4 << 20
CONNECT_TIMEOUT_S = 5.0
MIN_STEP_S = 0.25  # don't start a model turn with less time than this left
SYSTEM_PROMPT = (
    "You are the reasoning tier of a smart-home/edge assistant. Use the tools when they help; after tool results, "
    "answer the user in one or two plain sentences."
)


class RemoteError(Exception):
    """A request that produced no usable answer. `kind` is UNREACHABLE (counts against the node), REFUSED (the
    node rejected this request: our fault, the node is fine) or BAD_RESPONSE (the node answered nonsense)."""

    def __init__(self, kind: str, message: str, status: int | None = None, timed_out: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.timed_out = timed_out


def load_api_key(api_key_file: Path | None) -> str | None:
    """The bearer token: [remote] api_key_file, else $CREDENTIALS_DIRECTORY/remote_api_key (systemd
    LoadCredential=), else none. A configured file that is missing is an error."""
    if api_key_file is not None:
        try:
            return api_key_file.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise ValueError(f"remote.api_key_file: cannot read {api_key_file}: {exc.strerror}") from exc
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / "remote_api_key").is_file():
        return (Path(cred_dir) / "remote_api_key").read_text(encoding="utf-8").strip() or None
    return None


def openai_tools(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters or {"type": "object", "properties": {}}}}
            for t in tools]


class ChatClient:
    """POST {url}/chat/completions and GET {url}/models; one connection per request (thread-safe, no pool)."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None, timeout_s: float = 30.0,
                 ca_file: Path | None = None) -> None:
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"remote.url: expected http(s)://host[:port]/path, got {url!r}")
        self.url = url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._base = parts.path
        self._api_key = api_key
        self._ssl = ssl.create_default_context(cafile=str(ca_file) if ca_file else None) if self._https else None

    def __repr__(self) -> str:  # never show the token
        return f"ChatClient({self.url!r}, model={self.model!r}, auth={'yes' if self._api_key else 'no'})"

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        connect_timeout = min(CONNECT_TIMEOUT_S, timeout)
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=connect_timeout, context=self._ssl)
        return http.client.HTTPConnection(self._host, self._port, timeout=connect_timeout)

    def request(self, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        headers = {"Accept": "application/json", "User-Agent": "edged"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        conn = self._connection(timeout)
        try:
            conn.connect()
            if conn.sock is not None:
                conn.sock.settimeout(max(0.05, timeout))
            conn.request(method, self._base + path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read(MAX_RESPONSE_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timeout, TLS, DNS, bad status line
            raise RemoteError(UNREACHABLE, f"{method} {path}: {type(exc).__name__}: {exc}",
                              timed_out=isinstance(exc, TimeoutError)) from exc
        finally:
            conn.close()
        status = response.status
        if status >= 500 or status in (401, 403, 404, 408, 429):
            # the node is down, overloaded, misconfigured or refuses our credentials: not this request's fault
            raise RemoteError(UNREACHABLE, f"{method} {path}: HTTP {status}: {_excerpt(raw)}", status)
        if status >= 400:
            raise RemoteError(REFUSED, f"{method} {path}: HTTP {status}: {_excerpt(raw)}", status)
        if len(raw) > MAX_RESPONSE_BYTES:
            raise RemoteError(BAD_RESPONSE, f"{method} {path}: response larger than {MAX_RESPONSE_BYTES} bytes")
        try:
            parsed = json.loads(raw)
        except ValueError as exc:
            raise RemoteError(BAD_RESPONSE, f"{method} {path}: not JSON: {_excerpt(raw)}", status) from exc
        if not isinstance(parsed, dict):
            raise RemoteError(BAD_RESPONSE, f"{method} {path}: expected a JSON object", status)
        return parsed

    def probe(self, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
        """None if the node answers GET /models, else why not."""
        try:
            self.request("GET", "/models", None, timeout)
        except RemoteError as exc:
            return str(exc)
        return None

    def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *, max_tokens: int,
             temperature: float, timeout: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature, "stream": False}
        if tools:
            body["tools"] = tools
            body["tool_choice"] = "auto"
        body.update(extra or {})
        return self.request("POST", "/chat/completions", body, timeout)


def _excerpt(raw: bytes, limit: int = 200) -> str:
    return raw[:limit].decode("utf-8", "replace").replace("\n", " ")


def _message(response: dict[str, Any]) -> dict[str, Any]:
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise RemoteError(BAD_RESPONSE, "response has no choices")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise RemoteError(BAD_RESPONSE, "response choice has no message")
    return message


def extract_calls(message: dict[str, Any], known: set[str]) -> tuple[list[ProposedCall], str]:
    """The calls of an assistant message, parsed by the server (`tool_calls`) or written in its content."""
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    native = message.get("tool_calls")
    if isinstance(native, list) and native:
        calls = [c for c in (as_call(item) for item in native) if c is not None]
        _, prose = parse_text_calls(text, set())  # strips <think>; keeps everything else
        return calls, prose
    return parse_text_calls(text, known)


def _call_key(call: ProposedCall) -> str:
    return json.dumps([call.name, call.arguments], sort_keys=True, default=str)


def _tool_content(call: CallResult) -> str:
    if call.error is not None:
        return json.dumps({"error": {"code": call.error.code.value, "message": call.error.message}})
    return json.dumps(call.result, default=str)


class RemoteReasoner:
    """The RemoteTier: a tool-calling conversation with the remote node; reports every request to the breaker."""

    def __init__(self, client: ChatClient, breaker: Breaker, monitor: Monitor | None = None, *, max_steps: int = 4,
                 max_tokens: int = 512, temperature: float = 0.7) -> None:
        self.client = client
        self.breaker = breaker
        self.monitor = monitor
        self.max_steps = max_steps
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.name = f"remote:{client.model}"

    def available(self) -> bool:
        return self.breaker.available()

    def state(self) -> dict[str, Any]:
        snap = self.monitor.state() if self.monitor is not None else self.breaker.snapshot()
        snap["url"] = self.client.url
        snap["model"] = self.client.model
        return snap

    def _chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], timeout: float,
              extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        self.breaker.begin()
        try:
            response = self.client.chat(messages, tools, max_tokens=self.max_tokens, temperature=self.temperature,
                                        timeout=timeout, extra=extra)
            message = _message(response)
        except RemoteError as exc:
            if exc.kind == REFUSED:
                self.breaker.success()  # the node works; it rejected this request
            elif exc.timed_out and timeout < self.client.timeout_s:
                pass  # cut short by the request's own deadline: says nothing about the node
            else:
                self.breaker.failure(str(exc))
                if self.monitor is not None:
                    self.monitor.wake()
            raise
        finally:
            self.breaker.end()
        self.breaker.success()
        return response, message

    def answer(self, conversation: Conversation) -> TierAnswer:
        started = time.monotonic()
        known = {t.name for t in conversation.tools}
        tools = openai_tools(conversation.tools)
        extra: dict[str, Any] = {}
        if conversation.enable_thinking is not None:
            extra["chat_template_kwargs"] = {"enable_thinking": conversation.enable_thinking}
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT},
                                          {"role": "user", "content": conversation.query}]
        executed: list[CallResult] = []
        seen: set[str] = set()
        usage: dict[str, float] = {"steps": 0, "prompt_tokens": 0, "completion_tokens": 0}
        timings = {"requests": 0.0, "tools": 0.0}

        def done(answer: str | None = None, gave_up: str | None = None) -> TierAnswer:
            timings["total"] = (time.monotonic() - started) * 1000
            if gave_up is not None and executed:
                # calls already ran (side effects): re-running the request elsewhere would repeat them, so they
                # stand as this tier's answer, without the closing sentence
                usage["unfinished"] = 1
                log.info("remote_unfinished", reason=gave_up, calls=len(executed))
                gave_up = None
            return TierAnswer(calls=executed, answer=answer, gave_up=gave_up, model=self.name, usage=usage,
                              timings_ms={k: round(v, 3) for k, v in timings.items()})

        for step in range(self.max_steps):
            remaining = conversation.remaining_s()
            if remaining < MIN_STEP_S:
                return done(gave_up=BUDGET)
            t0 = time.monotonic()
            try:
                response, message = self._chat(messages, tools, min(self.client.timeout_s, remaining), extra)
            except RemoteError as exc:
                log.warning("remote_request_failed", kind=exc.kind, status=exc.status, error=str(exc), step=step)
                deadline_cut = exc.timed_out and remaining < self.client.timeout_s
                return done(gave_up=BUDGET if deadline_cut else exc.kind)
            finally:
                timings["requests"] += (time.monotonic() - t0) * 1000
            usage["steps"] += 1
            for key in ("prompt_tokens", "completion_tokens"):
                value = (response.get("usage") or {}).get(key)
                if isinstance(value, int | float):
                    usage[key] += value
            calls, prose = extract_calls(message, known)
            if conversation.execute is None:  # the command's own tools: the client runs them
                if not calls and not prose:
                    return done(gave_up=NO_ANSWER)
                executed.extend(CallResult(name=c.name, arguments=c.arguments) for c in calls)
                return done(answer=prose or None)
            new = [c for c in calls if _call_key(c) not in seen]
            if not new:  # words, or only repeats of calls already made: the conversation is over
                if not prose and not executed:
                    return done(gave_up=NO_ANSWER)
                return done(answer=prose or None)
            ids = [f"call_{step}_{i}" for i in range(len(new))]
            messages.append({"role": "assistant", "content": prose,  # llama.cpp's server rejects null content
                             "tool_calls": [{"id": cid, "type": "function",
                                             "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                                            for cid, c in zip(ids, new, strict=True)]})
            t1 = time.monotonic()
            for cid, call in zip(ids, new, strict=True):
                seen.add(_call_key(call))
                result = conversation.execute(call.name, call.arguments)
                executed.append(result)
                messages.append({"role": "tool", "tool_call_id": cid, "name": call.name,
                                 "content": _tool_content(result)})
            timings["tools"] += (time.monotonic() - t1) * 1000
        return done(gave_up=BUDGET)
