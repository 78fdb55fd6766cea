"""The tool registry: each tool has a pydantic model of its arguments, a description and a timeout.

Arguments are validated before a tool runs, whoever proposed them (a client's direct call or a model), so a call
that fails validation never executes; a tool that raises or overruns gives an error for that call only.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from edged.protocol import ErrorCode


class ToolError(Exception):
    """A call that did not produce a result; `code` goes into the result's error."""

    def __init__(self, code: ErrorCode, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


def _clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Pydantic's JSON schema without the noise ('title') that costs prompt tokens and means nothing to a model."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title":
            continue
        if isinstance(value, dict):
            value = _clean_schema(value) if key != "properties" else {k: _clean_schema(v) for k, v in value.items()}
        elif isinstance(value, list):
            value = [_clean_schema(v) if isinstance(v, dict) else v for v in value]
        out[key] = value
    return out


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    args_model: type[BaseModel]
    func: Callable[[Any], Any]
    timeout_s: float = 5.0
    examples: tuple[tuple[str, dict[str, Any]], ...] = ()  # (request, arguments): few-shot for untrained models
    # run on the worker's own thread, with no timeout and no thread hand-off: pure, instant tools (the built-ins),
    # and tools/debug.py's sleep, which must really hold the worker
    inline: bool = False

    @property
    def parameters(self) -> dict[str, Any]:
        return _clean_schema(self.args_model.model_json_schema())

    def openai_schema(self) -> dict[str, Any]:
        """The OpenAI-style function schema, the lingua franca of tool-calling models and clients."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def validate(self, arguments: dict[str, Any]) -> BaseModel:
        try:
            return self.args_model.model_validate(arguments)
        except ValidationError as exc:
            problems = [
                {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]}
                for e in exc.errors(include_url=False, include_input=False)
            ]
            summary = "; ".join(f"{p['loc'] or '(arguments)'}: {p['msg']}" for p in problems[:5])
            raise ToolError(
                ErrorCode.INVALID_ARGUMENTS, f"{self.name}: invalid arguments: {summary}", problems
            ) from exc


@dataclass
class ToolRegistry:
    """Tools by name, with an optional allowlist: a tool outside it is never offered to a model nor run."""

    allow: frozenset[str] | None = None
    _tools: dict[str, Tool] = field(default_factory=dict)
    _pool: cf.ThreadPoolExecutor = field(
        default_factory=lambda: cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="tool")
    )

    def register(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} registered twice")
        self._tools[tool.name] = tool

    def register_all(self, tools: Iterable[Tool]) -> None:
        for tool in tools:
            self.register(tool)

    def allowed(self) -> list[Tool]:
        return [t for t in self._tools.values() if self.allow is None or t.name in self.allow]

    def names(self) -> list[str]:
        return [t.name for t in self.allowed()]

    def get(self, name: str) -> Tool:
        tool = self._tools.get(name)
        if tool is None:
            raise ToolError(ErrorCode.UNKNOWN_TOOL, f"no tool named {name[:128]!r}", {"known": self.names()})
        if self.allow is not None and name not in self.allow:
            raise ToolError(ErrorCode.TOOL_NOT_ALLOWED, f"tool {name!r} is not allowed on this device")
        return tool

    def run(self, name: str, arguments: dict[str, Any], timeout_s: float | None = None) -> Any:
        """Validate and run one call; raises ToolError for anything that is not a result."""
        tool = self.get(name)
        args = tool.validate(arguments)
        limit = min(tool.timeout_s, timeout_s) if timeout_s is not None else tool.timeout_s
        if tool.inline:
            try:
                return tool.func(args)
            except ToolError:
                raise
            except Exception as exc:
                raise ToolError(ErrorCode.TOOL_FAILED, f"{name} failed: {type(exc).__name__}: {exc}") from exc
        future = self._pool.submit(tool.func, args)
        try:
            return future.result(timeout=max(limit, 0.001))
        except cf.TimeoutError as exc:
            future.cancel()
            raise ToolError(ErrorCode.TOOL_TIMEOUT, f"{name} did not finish within {limit:.3g} s") from exc
        except ToolError:
            raise
        except Exception as exc:
            raise ToolError(ErrorCode.TOOL_FAILED, f"{name} failed: {type(exc).__name__}: {exc}") from exc

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
