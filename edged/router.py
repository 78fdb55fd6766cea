"""The seam where language models plug into the pipeline.

The pipeline only knows this interface: given a request and the tools on offer, a router proposes tool calls or
says that none fits. Tier 1 (llama.cpp in-process) implements it in `edged.llm`; tests can pass any object of
this shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ToolSpec:
    """A tool as a model sees it: name, description and the JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]
    examples: tuple[tuple[str, dict[str, Any]], ...] = ()

    @classmethod
    def from_openai(cls, schema: dict[str, Any]) -> ToolSpec:
        fn = schema.get("function", schema)
        name, params = fn["name"], fn.get("parameters") or {}
        # TypeError, which callers turn into 'bad_command': dict() of a list or string raised ValueError (internal)
        if not isinstance(name, str) or not name:
            raise TypeError(f"tool name must be a non-empty string, got {type(name).__name__}")
        if not isinstance(params, dict):
            raise TypeError(f"'parameters' of {name[:64]!r} must be a JSON object, got {type(params).__name__}")
        return cls(name, str(fn.get("description", "")), dict(params))


@dataclass
class ProposedCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class RouteOutcome:
    """What a router decided: calls, or `none_fit` with a reason (the pipeline escalates or reports it)."""

    calls: list[ProposedCall] = field(default_factory=list)
    none_fit: bool = False
    reason: str | None = None
    answer: str | None = None
    model: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    usage: dict[str, float] = field(default_factory=dict)  # tokens, decode steps, confidence


class Router(Protocol):
    name: str

    def route(self, query: str, tools: list[ToolSpec], deadline: float) -> RouteOutcome:
        """Map `query` to calls among `tools`; `deadline` is a time.monotonic() value not to overrun."""
        ...
