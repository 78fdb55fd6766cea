"""The MQTT message contract: commands in, results out, and the decoder that turns bytes into one or the other.

External clients depend on these shapes: extend them, never rename a field.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_ID_LEN = 128
MAX_QUERY_LEN = 8000
MAX_JSON_DEPTH = 32


class ErrorCode(StrEnum):
    PAYLOAD_TOO_LARGE = "payload_too_large"
    BAD_ENCODING = "bad_encoding"
    BAD_JSON = "bad_json"
    BAD_COMMAND = "bad_command"
    UNKNOWN_TOOL = "unknown_tool"
    TOOL_NOT_ALLOWED = "tool_not_allowed"
    INVALID_ARGUMENTS = "invalid_arguments"
    TOOL_FAILED = "tool_failed"
    TOOL_TIMEOUT = "tool_timeout"
    DEVICE_TIMEOUT = "device_timeout"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    EXPIRED = "expired"
    NOT_EXECUTED = "not_executed"
    NO_MODEL = "no_model"
    NEEDS_REASONING = "needs_reasoning"
    MODEL_FAILED = "model_failed"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


class ErrorInfo(BaseModel):
    code: ErrorCode
    message: str
    details: Any = None


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    arguments: dict[str, Any] = Field(default_factory=dict)


class Command(BaseModel):
    """One request: natural language (`query`) or a direct tool call (`call`)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=MAX_ID_LEN)
    query: str | None = Field(None, min_length=1, max_length=MAX_QUERY_LEN)
    call: ToolCall | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    reply_to: str | None = Field(None, min_length=1, max_length=512, pattern=r"^[^+#\x00]+$")
    deadline_ms: int | None = Field(None, ge=1, le=3600_000)
    tier: Literal[1, 2, 3] | None = None
    on_offline: Literal["fallback", "queue"] | None = None
    enable_thinking: bool | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Command:
        if (self.query is None) == (self.call is None):
            raise ValueError("a command has exactly one of 'query' or 'call'")
        if self.call is not None and self.tools is not None:
            raise ValueError("'tools' goes with 'query', not with a direct 'call'")
        return self


Status = Literal["ok", "error", "busy", "queued", "degraded"]


class CallResult(BaseModel):
    name: str
    arguments: dict[str, Any]
    result: Any = None
    error: ErrorInfo | None = None


class Result(BaseModel):
    id: str | None
    status: Status
    tier: int | None = None
    calls: list[CallResult] = Field(default_factory=list)
    answer: str | None = None
    error: ErrorInfo | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    model: str | None = None
    device: str | None = None
    escalations: list[dict[str, Any]] = Field(default_factory=list)
    usage: dict[str, float] = Field(default_factory=dict)
    retry_after_ms: int | None = None

    def to_json(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def failure(cls, command_id: str | None, code: ErrorCode, message: str, details: Any = None) -> Result:
        return cls(id=command_id, status="error", error=ErrorInfo(code=code, message=message, details=details))


class DecodeError(Exception):
    """A message that is not a usable command. Carries whatever id and reply address could be salvaged."""

    def __init__(
        self, code: ErrorCode, message: str, *, command_id: str | None = None, reply_to: str | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.command_id = command_id
        self.reply_to = reply_to
        self.details = details

    def to_result(self) -> Result:
        return Result.failure(self.command_id, self.code, self.message, self.details)


def _depth(value: Any, limit: int) -> int:
    """Nesting depth, stopping early past `limit` so a hostile payload costs little."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _utf8_ok(text: str) -> bool:
    """False for a string holding lone surrogates (JSON allows "\\ud800"; UTF-8, MQTT and pydantic do not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _all_utf8(value: Any) -> bool:
    """Every string (keys included) of a decoded JSON value encodes as UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not _utf8_ok(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _salvage(obj: Any) -> tuple[str | None, str | None]:
    """The id and reply_to of a malformed command, when they at least look right, to address the error."""
    if not isinstance(obj, dict):
        return None, None
    cid = obj.get("id")
    reply = obj.get("reply_to")
    cid = cid if isinstance(cid, str) and 0 < len(cid) <= MAX_ID_LEN and _utf8_ok(cid) else None
    ok_reply = (
        isinstance(reply, str) and 0 < len(reply) <= 512 and not any(c in reply for c in "+#\x00")
        and _utf8_ok(reply)
    )
    return cid, reply if ok_reply else None


# one decoder for every command: json.loads(text, parse_float=...) would build a new one per call
_JSON = json.JSONDecoder(parse_float=_finite_float, parse_constant=_no_constant)


def decode_command(payload: bytes, max_bytes: int) -> Command:
    """Bytes from the broker to a validated Command, or a DecodeError with a specific code."""
    if len(payload) > max_bytes:
        raise DecodeError(ErrorCode.PAYLOAD_TOO_LARGE, f"payload is {len(payload)} bytes, limit {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(ErrorCode.BAD_ENCODING, f"payload is not UTF-8: {exc.reason} at byte {exc.start}") from exc
    try:
        obj = _JSON.decode(text)
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, NaN/Infinity, ints over 4300 digits
        raise DecodeError(ErrorCode.BAD_JSON, f"payload is not JSON: {exc}") from exc
    cid, reply_to = _salvage(obj)
    if not isinstance(obj, dict):
        raise DecodeError(ErrorCode.BAD_COMMAND, f"a command is a JSON object, got {type(obj).__name__}")
    # the walks below run only when the text could hold what they look for (the common command cannot): nesting
    # needs a bracket per level, and a lone surrogate can only come from a \\u escape (the bytes were UTF-8)
    deep = text.count("{") + text.count("[") + 1 > MAX_JSON_DEPTH
    if deep and _depth(obj, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise DecodeError(
            ErrorCode.BAD_COMMAND, f"nesting deeper than {MAX_JSON_DEPTH}", command_id=cid, reply_to=reply_to
        )
    if "\\u" in text and not _all_utf8(obj):
        raise DecodeError(
            ErrorCode.BAD_ENCODING, "payload has \\u escapes of lone surrogates: not valid Unicode",
            command_id=cid, reply_to=reply_to,
        )
    try:
        return Command.model_validate(obj)
    except ValidationError as exc:
        problems = [
            {"loc": ".".join(str(p) for p in e["loc"]) or "(command)", "msg": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        summary = "; ".join(f"{p['loc']}: {p['msg']}" for p in problems[:5])
        raise DecodeError(
            ErrorCode.BAD_COMMAND, f"invalid command: {summary}", command_id=cid, reply_to=reply_to,
            details=problems[:20],
        ) from exc
