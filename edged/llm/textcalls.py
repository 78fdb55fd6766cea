"""Tool calls written as text: what models (and servers) do when they don't return parsed `tool_calls`.

Seen in practice: llama-cpp-python's OpenAI server with a Qwen2.5 GGUF answers a tool request with the call as a
bare JSON object in `content`, a markdown ```json fence, or Hermes `<tool_call>` tags; after a tool result it may
repeat the call with its arguments as a JSON *string*. This module finds such calls in free text.

`parse_text_calls(text, known)` returns the calls whose names are in `known` and the remaining prose. JSON that is
not a call of a known tool (a call of an unknown one included) stays in the prose: nothing the model wrote
silently disappears. `<think>` blocks are
removed first (a call considered while thinking is not a call made).
"""

from __future__ import annotations

import json
import re
from typing import Any

from edged.router import ProposedCall

MAX_SCAN_CHARS = 32_000  # bare-JSON scanning is quadratic in the worst case; model output is far shorter

_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL)
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"```[A-Za-z_]*[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)
_STRAY_TAGS = re.compile(r"</?tool_call>")
_DECODER = json.JSONDecoder()


def _arguments(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return {}
    if isinstance(raw, str):
        raw = raw.strip()
        if not raw:
            return {}
        try:
            raw = json.loads(raw)
        except ValueError:
            return None
    return raw if isinstance(raw, dict) else None


def as_call(obj: Any) -> ProposedCall | None:
    """A call-shaped JSON value to a call: {"name", "arguments"|"parameters"} or OpenAI's {"function": {...}}."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict) and "name" not in obj:
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name or set(obj) - {"name", "arguments", "parameters", "id", "type"}:
        return None
    args = _arguments(obj.get("arguments", obj.get("parameters")))
    return None if args is None else ProposedCall(name.strip(), args)


def _calls_in(value: Any) -> list[ProposedCall] | None:
    """All calls in a JSON value (one call, a list of calls, or {"tool_calls": [...]}), None if it is not calls."""
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list) and len(value) == 1:
        value = value["tool_calls"]
    items = value if isinstance(value, list) else [value]
    if not items:
        return None
    calls = [as_call(item) for item in items]
    if any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def _json_values(text: str) -> list[tuple[int, int, Any]]:
    """Top-level JSON objects/lists in `text` as (start, end, value), left to right, non-overlapping."""
    found: list[tuple[int, int, Any]] = []
    pos = 0
    limit = min(len(text), MAX_SCAN_CHARS)
    while pos < limit:
        starts = [i for i in (text.find("{", pos), text.find("[", pos)) if i != -1]
        if not starts:
            break
        start = min(starts)
        try:
            value, end = _DECODER.raw_decode(text, start)
        except ValueError:
            pos = start + 1
            continue
        found.append((start, end, value))
        pos = end
    return found


def _gaps(spans: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """The parts of range(length) not covered by the sorted, non-overlapping `spans`."""
    gaps, pos = [], 0
    for start, end in spans:
        gaps.append((pos, start))
        pos = end
    gaps.append((pos, length))
    return gaps


def _any_known(calls: list[ProposedCall] | None, known: set[str]) -> bool:
    return any(c.name in known for c in calls or [])


def parse_text_calls(text: str, known: set[str]) -> tuple[list[ProposedCall], str]:
    """Calls of `known` tools written in `text`, in order, and the prose left once they are cut out."""
    text = _THINK.sub("", text or "")
    calls: list[ProposedCall] = []
    spans: list[tuple[int, int, list[ProposedCall], str]] = []  # (start, end, calls, text left in their place)

    def take(start: int, end: int, found: list[ProposedCall]) -> None:
        unknown = [{"name": c.name, "arguments": c.arguments} for c in found if c.name not in known]
        left = json.dumps(unknown[0] if len(unknown) == 1 else unknown) if unknown else ""
        spans.append((start, end, [c for c in found if c.name in known], left))

    # 1. Hermes tags; 2. markdown fences: the whole block is the call (or calls) when its JSON is calls
    for pattern in (_TOOL_CALL, _FENCE):
        for match in pattern.finditer(text):
            if any(s < match.end() and match.start() < e for s, e, _, _ in spans):
                continue
            body = match.group(1)
            inner = _json_values(body)
            leftover = "".join(body[a:b] for a, b in _gaps([(s, e) for s, e, _ in inner], len(body)))
            if inner and not leftover.strip() and all(_any_known(_calls_in(v), known) for _, _, v in inner):
                take(match.start(), match.end(), [c for _, _, v in inner for c in (_calls_in(v) or [])])
    # 3. bare JSON in the rest
    for start, end, value in _json_values(text):
        if any(s < end and start < e for s, e, _, _ in spans):
            continue
        found_bare = _calls_in(value)
        if _any_known(found_bare, known):
            take(start, end, found_bare or [])
    spans.sort(key=lambda span: span[0])
    prose_parts: list[str] = []
    pos = 0
    for start, end, found, left in spans:
        prose_parts.extend((text[pos:start], left))
        calls.extend(found)
        pos = end
    prose_parts.append(text[pos:])
    prose = _STRAY_TAGS.sub("", "\n".join(part.strip() for part in prose_parts if part.strip()))
    return calls, prose.strip()
