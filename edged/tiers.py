"""What the pipeline needs from tiers 2 and 3: answer a request, possibly over several tool-calling steps.

Tier 1 (the router) only proposes calls; tiers 2 and 3 hold a conversation: they call tools through the
pipeline's `Executor` (which validates and runs them), read the results and answer in words.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from edged.protocol import CallResult
from edged.router import ToolSpec

# Validates and runs one call (or, for a command's own `tools`, returns it unexecuted): never raises.
Executor = Callable[[str, dict[str, Any]], CallResult]


@dataclass
class TierAnswer:
    calls: list[CallResult] = field(default_factory=list)
    answer: str | None = None
    gave_up: str | None = None  # why this tier could not answer (the pipeline escalates), None if it did
    model: str | None = None
    usage: dict[str, float] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Conversation:
    """Inputs of one tier-2/3 request."""

    query: str
    tools: list[ToolSpec]
    execute: Executor | None  # None: the command brought its own tools; return the first calls unexecuted
    deadline: float  # time.monotonic()
    enable_thinking: bool | None = None

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()


class Tier(Protocol):
    name: str

    def answer(self, conversation: Conversation) -> TierAnswer:
        """Answer or give up (`gave_up` set); never raise for a model's misbehaviour."""
        ...


class RemoteTier(Tier, Protocol):
    def available(self) -> bool:
        """True while the remote node is believed reachable (connectivity monitor, circuit breaker closed)."""
        ...

    def state(self) -> dict[str, Any]:
        """For status and telemetry: e.g. {"state": "up", "failures": 0, "last_ok": ...}."""
        ...


@dataclass
class ReplyAddress:
    """Where a command's result goes; the outbox stores it to answer later."""

    topic: str
    correlation_data: bytes | None = None


class Outbox(Protocol):
    def put(self, command_json: str, command_id: str, reply: ReplyAddress, deadline_wall: float) -> None:
        """Store durably (fsync'd) before returning; the command is then answered `queued`."""
        ...

    def depth(self) -> int:
        ...
