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
        return cls(str(fn["name"]), str(fn.get("description", "")), dict(fn.get("parameters") or {}))


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
