"""FunctionGemma's native text format: declarations in, calls out.

Declarations: `<start_function_declaration>declaration:NAME{description:<escape>...<escape>,parameters:{...}}
<end_function_declaration>` with upper-case type names and every string wrapped in `<escape>`.
Calls: `<start_function_call>call:NAME{key:<escape>text<escape>,n:5,flag:true,obj:{k:<escape>v<escape>}}
<end_function_call>`, several in a row for parallel calls.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edged.router import ProposedCall, ToolSpec

ESC = "<escape>"
CALL_START = "<start_function_call>"
CALL_END = "<end_function_call>"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def render_value(value: Any) -> str:
    if isinstance(value, str):
        return f"{ESC}{value}{ESC}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{render_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(render_value(v) for v in value) + "]"
    return json.dumps(value)


def _upper_types(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: (v.upper() if k == "type" and isinstance(v, str) else _upper_types(v)) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_upper_types(v) for v in schema]
    return schema


def render_declaration(tool: ToolSpec) -> str:
    body = {"description": tool.description, "parameters": _upper_types(tool.parameters)}
    return f"<start_function_declaration>declaration:{tool.name}{render_value(body)}<end_function_declaration>"


def render_call(name: str, arguments: dict[str, Any]) -> str:
    return f"{CALL_START}call:{name}{render_value(arguments)}{CALL_END}"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, what: str) -> ValueError:
        return ValueError(f"{what} at offset {self.pos}: {self.text[self.pos:self.pos + 30]!r}")

    def value(self) -> Any:
        t = self.text
        if t.startswith(ESC, self.pos):
            end = t.find(ESC, self.pos + len(ESC))
            if end < 0:
                raise self.error("unterminated <escape> string")
            out = t[self.pos + len(ESC):end]
            self.pos = end + len(ESC)
            return out
        if t.startswith("{", self.pos):
            return self.obj()
        if t.startswith("[", self.pos):
            self.pos += 1
            items: list[Any] = []
            while not t.startswith("]", self.pos):
                items.append(self.value())
                if t.startswith(",", self.pos):
                    self.pos += 1
                elif not t.startswith("]", self.pos):
                    raise self.error("expected ',' or ']'")
            self.pos += 1
            return items
        for word, val in (("true", True), ("false", False), ("null", None)):
            if t.startswith(word, self.pos):
                self.pos += len(word)
                return val
        match = _NUMBER.match(t, self.pos)
        if match:
            self.pos = match.end()
            num = match.group()
            return int(num) if re.fullmatch(r"-?\d+", num) else float(num)
        raise self.error("expected a value")

    def obj(self) -> dict[str, Any]:
        t = self.text
        if not t.startswith("{", self.pos):
            raise self.error("expected '{'")
        self.pos += 1
        out: dict[str, Any] = {}
        while not t.startswith("}", self.pos):
            colon = t.find(":", self.pos)
            if colon < 0:
                raise self.error("expected 'key:'")
            key = t[self.pos:colon].strip()
            if not re.fullmatch(r"[\w.-]+", key):
                raise self.error(f"bad key {key!r}")
            self.pos = colon + 1
            out[key] = self.value()
            if t.startswith(",", self.pos):
                self.pos += 1
            elif not t.startswith("}", self.pos):
                raise self.error("expected ',' or '}'")
        self.pos += 1
        return out


def parse_calls(text: str) -> list[ProposedCall]:
    """Every `<start_function_call>call:NAME{...}<end_function_call>` in `text`, in order."""
    calls = []
    pos = 0
    while (start := text.find(CALL_START, pos)) >= 0:
        p = _Parser(text)
        p.pos = start + len(CALL_START)
        if not text.startswith("call:", p.pos):
            raise p.error("expected 'call:'")
        p.pos += len("call:")
        brace = text.find("{", p.pos)
        if brace < 0:
            raise p.error("expected '{' after the function name")
        name = text[p.pos:brace]
        p.pos = brace
        calls.append(ProposedCall(name, p.obj()))
        if not text.startswith(CALL_END, p.pos):
            raise p.error("expected <end_function_call>")
        pos = p.pos + len(CALL_END)
    return calls
