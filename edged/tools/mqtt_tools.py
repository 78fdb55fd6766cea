"""Tools declared in the config that act over MQTT (zigbee2mqtt, Tasmota, ESPHome, Shelly...).

A tool is a topic template, a payload template and a JSON schema of its arguments. The schema becomes a real
pydantic model (`create_model`), so a call is validated like any built-in tool's before anything is sent. Template
filling is structural and safe:

- topic: an argument fills part of one level and can never add or widen levels: values holding '/', '+', '#' or
  NUL (or empty ones) are refused as `invalid_arguments`;
- payload: the template is a JSON value (a TOML table); the payload is built as an object and serialized once, so
  an argument is always a JSON value inside it, never text spliced into JSON. A string that is exactly "{arg}"
  becomes the argument's own JSON value (a number stays a number; a key whose optional argument was left out is
  left out); "{arg}" inside longer text is text.

With a `confirm_topic`, the call waits for the device to publish its new state there (optionally matching
`confirm_match`) and returns that state; no confirmation in time is the error `device_timeout`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from edged.protocol import ErrorCode
from edged.subscriptions import Message, Subscriptions
from edged.tools.registry import Tool, ToolError

if TYPE_CHECKING:
    from edged.bus import MqttBus
    from edged.config import MqttToolConfig

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\}")
_TOPIC_FORBIDDEN = ("/", "+", "#", "\x00")
_MISSING = object()


# -- templates ------------------------------------------------------------------------------------------------------

def placeholders(template: Any) -> set[str]:
    """Every {name} in a template (a string, or strings anywhere inside a JSON value)."""
    if isinstance(template, str):
        return set(PLACEHOLDER.findall(template))
    if isinstance(template, Mapping):
        return set().union(*(placeholders(v) for v in template.values())) if template else set()
    if isinstance(template, list):
        return set().union(*(placeholders(v) for v in template)) if template else set()
    return set()


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def fill_text(template: str, lookup: Callable[[str], Any]) -> str:
    """Replace each {name} with lookup(name) as text (strings as they are, other values as JSON)."""
    return PLACEHOLDER.sub(lambda m: _as_text(lookup(m.group(1))), template)


def fill_structure(template: Any, lookup: Callable[[str], Any]) -> Any:
    """A JSON value with its placeholders filled; "{name}" alone becomes the value itself, with its JSON type."""
    if isinstance(template, str):
        whole = PLACEHOLDER.fullmatch(template)
        if whole:
            return lookup(whole.group(1))
        return fill_text(template, lookup)
    if isinstance(template, Mapping):
        out = {}
        for key, value in template.items():
            filled = fill_structure(value, lookup)
            if filled is None and isinstance(value, str) and PLACEHOLDER.fullmatch(value):
                continue  # an optional argument left out: leave its key out too
            out[key] = filled
        return out
    if isinstance(template, list):
        return [fill_structure(value, lookup) for value in template]
    return template


def topic_value_problem(value: Any) -> str | None:
    """Why `value` may not fill a topic level, or None if it may."""
    text = _as_text(value)
    if text == "":
        return "is empty"
    bad = [c for c in _TOPIC_FORBIDDEN if c in text]
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        return f"holds {shown}: a topic argument cannot change the topic's levels"
    if len(text.encode("utf-8")) > 256:
        return "is longer than 256 bytes"
    return None


def subscription_filter(template: str) -> str:
    """The filter that covers every topic a template can produce: each level holding a placeholder becomes '+'."""
    return "/".join("+" if PLACEHOLDER.search(level) else level for level in template.split("/"))


def check_topic_template(template: str, known: set[str], what: str) -> None:
    stripped = PLACEHOLDER.sub("x", template)
    if any(c in stripped for c in ("+", "#", "\x00")):
        raise ValueError(f"{what} {template!r}: a template is one topic, without wildcards ('+', '#')")
    if "{" in stripped or "}" in stripped:
        raise ValueError(f"{what} {template!r}: a placeholder is {{name}} with a letter, digits and '_'")
    unknown = placeholders(template) - known
    if unknown:
        raise ValueError(f"{what} {template!r}: {sorted(unknown)} are not parameters of the tool")


def get_path(obj: Any, path: str) -> Any:
    """obj['a']['b'] for 'a.b' (list indexes as numbers), or _MISSING."""
    for part in path.split("."):
        if isinstance(obj, Mapping) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return _MISSING
    return obj


# -- JSON schema -> pydantic model ----------------------------------------------------------------------------------

_SCALARS: dict[str, type] = {"string": str, "integer": int, "number": float, "boolean": bool}


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _python_type(name: str, prop: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    constraints: dict[str, Any] = {}
    if "enum" in prop:
        values = prop["enum"]
        if not isinstance(values, list) or not values or not all(
            isinstance(v, str | int | float | bool) for v in values
        ):
            raise ValueError(f"parameter {name!r}: 'enum' must be a non-empty list of scalars")
        return Literal[tuple(values)], constraints
    kind = prop.get("type")
    if kind in ("integer", "number"):
        for key, arg in (("minimum", "ge"), ("maximum", "le"), ("exclusiveMinimum", "gt"), ("exclusiveMaximum", "lt")):
            if key in prop:
                constraints[arg] = prop[key]
        return _SCALARS[kind], constraints
    if kind == "string":
        for key, arg in (("minLength", "min_length"), ("maxLength", "max_length"), ("pattern", "pattern")):
            if key in prop:
                constraints[arg] = prop[key]
        return str, constraints
    if kind == "boolean":
        return bool, constraints
    if kind == "array":
        items = prop.get("items") or {}
        item_type, _ = _python_type(f"{name}[]", items)
        for key, arg in (("minItems", "min_length"), ("maxItems", "max_length")):
            if key in prop:
                constraints[arg] = prop[key]
        return list[item_type], constraints  # type: ignore[valid-type]
    raise ValueError(
        f"parameter {name!r}: type {kind!r} is not supported (string, integer, number, boolean, array, enum)"
    )


def args_model_from_schema(
    tool_name: str, schema: Mapping[str, Any], topic_fields: frozenset[str] = frozenset()
) -> type[BaseModel]:
    """A pydantic model (extra fields forbidden) for an object JSON schema; `topic_fields` must be topic-safe."""
    if schema.get("type", "object") != "object":
        raise ValueError("parameters: the schema of the arguments is an object ('type': 'object')")
    props = schema.get("properties") or {}
    if not isinstance(props, Mapping):
        raise ValueError("parameters.properties must be a table")
    required = set(schema.get("required") or [])
    unknown_required = required - set(props)
    if unknown_required:
        raise ValueError(f"parameters.required names unknown properties {sorted(unknown_required)}")
    fields: dict[str, Any] = {}
    for name, prop in props.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name):
            raise ValueError(f"parameter name {name!r}: letters, digits and '_' only")
        if not isinstance(prop, Mapping):
            raise ValueError(f"parameter {name!r}: its schema must be a table")
        py_type, constraints = _python_type(name, prop)
        description = prop.get("description")
        if name in required:
            fields[name] = (py_type, Field(..., description=description, **constraints))
        elif "default" in prop:
            fields[name] = (py_type, Field(prop["default"], description=description, **constraints))
        else:
            fields[name] = (py_type | None, Field(None, description=description, **constraints))

    def _topic_safe(self: BaseModel) -> BaseModel:
        for name in sorted(topic_fields):
            value = getattr(self, name, None)
            if value is None:
                raise ValueError(f"{name}: needed to build the topic")
            problem = topic_value_problem(value)
            if problem:
                raise ValueError(f"{name}: {problem}")
        return self

    validators: dict[str, Any] = {"_topic_safe": model_validator(mode="after")(_topic_safe)} if topic_fields else {}
    model: type[BaseModel] = create_model(f"{tool_name}_args", __base__=_Args, __validators__=validators, **fields)
    return model


def check_tool_config(cfg: MqttToolConfig) -> None:
    """Config-time checks (raise ValueError): the schema builds a model, templates use known parameters only."""
    props = cfg.parameters.get("properties") or {}
    known = set(props) if isinstance(props, Mapping) else set()
    check_topic_template(cfg.topic, known, "topic")
    if cfg.confirm_topic is not None:
        check_topic_template(cfg.confirm_topic, known, "confirm_topic")
    elif cfg.confirm_match is not None:
        raise ValueError("confirm_match needs a confirm_topic")
    for what, template in (("payload", cfg.payload), ("confirm_match", cfg.confirm_match)):
        unknown = placeholders(template) - known
        if unknown:
            raise ValueError(f"{what}: {sorted(unknown)} are not parameters of the tool")
    for i, example in enumerate(cfg.examples):
        if set(example) != {"request", "arguments"} or not isinstance(example.get("arguments"), Mapping):
            raise ValueError(f"examples[{i}]: a table with 'request' (text) and 'arguments' (table)")
    args_model_from_schema(cfg.name, cfg.parameters, _topic_fields(cfg))


def _topic_fields(cfg: MqttToolConfig) -> frozenset[str]:
    return frozenset(placeholders(cfg.topic) | placeholders(cfg.confirm_topic or ""))


# -- the tool -------------------------------------------------------------------------------------------------------

@dataclass
class _Waiter:
    match: dict[str, Any] | None
    event: threading.Event = field(default_factory=threading.Event)
    message: Message | None = None


class Confirmations:
    """Waiters for device confirmations, by exact topic; fed by the bus's subscription thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, list[_Waiter]] = {}

    def expect(self, topic: str, match: dict[str, Any] | None) -> _Waiter:
        waiter = _Waiter(match)
        with self._lock:
            self._waiters.setdefault(topic, []).append(waiter)
        return waiter

    def forget(self, topic: str, waiter: _Waiter) -> None:
        with self._lock:
            waiters = self._waiters.get(topic, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(topic, None)

    def on_message(self, msg: Message) -> None:
        if msg.retain:
            return  # a stored state from before, not the device answering us
        with self._lock:
            waiters = list(self._waiters.get(msg.topic, []))
        if not waiters:
            return
        state = _decode(msg.payload)
        for waiter in waiters:
            if waiter.event.is_set():
                continue
            if waiter.match and not all(get_path(state, k) == v for k, v in waiter.match.items()):
                continue
            waiter.message = msg
            waiter.event.set()


def _decode(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return payload.decode("utf-8", errors="replace")


class MqttTool:
    def __init__(self, cfg: MqttToolConfig, bus: MqttBus, confirmations: Confirmations) -> None:
        self.cfg = cfg
        self.bus = bus
        self.confirmations = confirmations
        self.args_model = args_model_from_schema(cfg.name, cfg.parameters, _topic_fields(cfg))

    def tool(self) -> Tool:
        examples = tuple((str(e["request"]), dict(e["arguments"])) for e in self.cfg.examples)
        # the registry's limit stays above the confirmation wait, so a silent device is device_timeout
        return Tool(self.cfg.name, self.cfg.description, self.args_model, self.call,
                    self.cfg.confirm_timeout_s + 2.0, examples)

    def _lookup(self, args: BaseModel) -> Callable[[str], Any]:
        values = args.model_dump()

        def lookup(name: str) -> Any:
            value = get_path(values, name)
            if value is _MISSING:
                raise ToolError(ErrorCode.INVALID_ARGUMENTS, f"{self.cfg.name}: argument {name!r} is missing")
            return value

        return lookup

    def _topic(self, template: str, lookup: Callable[[str], Any]) -> str:
        def safe(name: str) -> Any:
            value = lookup(name)
            problem = topic_value_problem(value)
            if problem:  # the args model already refused it; kept here so no path can skip the check
                raise ToolError(ErrorCode.INVALID_ARGUMENTS, f"{self.cfg.name}: {name} {problem}")
            return value

        return fill_text(template, safe)

    def payload(self, args: BaseModel) -> bytes:
        lookup = self._lookup(args)
        if self.cfg.payload is None:
            body: Any = args.model_dump(exclude_none=True)
        else:
            body = fill_structure(self.cfg.payload, lookup)
        if isinstance(body, str):
            return body.encode("utf-8")
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def call(self, args: BaseModel) -> dict[str, Any]:
        cfg = self.cfg
        lookup = self._lookup(args)
        topic = self._topic(cfg.topic, lookup)
        payload = self.payload(args)
        if not self.bus.connected.is_set():
            raise ToolError(ErrorCode.TOOL_FAILED, f"{cfg.name}: not connected to the broker; nothing was sent")
        waiter = confirm_topic = None
        if cfg.confirm_topic is not None:
            confirm_topic = self._topic(cfg.confirm_topic, lookup)
            match = fill_structure(cfg.confirm_match, lookup) if cfg.confirm_match else None
            waiter = self.confirmations.expect(confirm_topic, match)  # before publishing: no race
        started = time.monotonic()
        try:
            info = self.bus.publish(topic, payload, qos=cfg.qos, retain=cfg.retain)
            if waiter is None or confirm_topic is None:
                if cfg.qos and not self.bus.wait_published(info, cfg.confirm_timeout_s):
                    raise ToolError(ErrorCode.DEVICE_TIMEOUT, f"{cfg.name}: the broker did not take the message")
                return {"published": True, "topic": topic, "payload": _decode(payload)}
            if not waiter.event.wait(cfg.confirm_timeout_s):
                raise ToolError(
                    ErrorCode.DEVICE_TIMEOUT,
                    f"{cfg.name}: no confirmation on {confirm_topic} within {cfg.confirm_timeout_s:g} s",
                    {"topic": topic, "confirm_topic": confirm_topic},
                )
            assert waiter.message is not None
            return {
                "confirmed": True,
                "topic": confirm_topic,
                "state": _decode(waiter.message.payload),
                "latency_ms": round((waiter.message.received - started) * 1000, 3),
            }
        finally:
            if waiter is not None and confirm_topic is not None:
                self.confirmations.forget(confirm_topic, waiter)


def build_mqtt_tools(configs: list[MqttToolConfig], bus: MqttBus, subscriptions: Subscriptions) -> list[Tool]:
    """The configured MQTT tools, with their confirmation filters added to the bus's subscriptions."""
    confirmations = Confirmations()
    tools = []
    filters: set[str] = set()
    for cfg in configs:
        tools.append(MqttTool(cfg, bus, confirmations).tool())
        if cfg.confirm_topic is not None:
            filters.add(subscription_filter(cfg.confirm_topic))
    for topic_filter in sorted(filters):
        subscriptions.add(topic_filter, confirmations.on_message, qos=1)
    return tools
