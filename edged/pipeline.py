"""The pipeline: one command in, one result out. Direct calls run a tool; queries go through the router tiers."""

from __future__ import annotations

import time
from typing import Any

import structlog

from edged.protocol import CallResult, Command, ErrorCode, ErrorInfo, Result
from edged.router import RouteOutcome, Router, ToolSpec
from edged.tools.registry import ToolError, ToolRegistry

log = structlog.get_logger(__name__)


class Pipeline:
    """Turns a validated Command into a Result. Never raises: every failure becomes an `error` result."""

    def __init__(self, registry: ToolRegistry, device_id: str, default_deadline_ms: int,
                 router: Router | None = None) -> None:
        self.registry = registry
        self.device_id = device_id
        self.default_deadline_ms = default_deadline_ms
        self.router = router

    def tool_specs(self) -> list[ToolSpec]:
        """The device's own tools as the router sees them."""
        return [ToolSpec(t.name, t.description, t.parameters, t.examples) for t in self.registry.allowed()]

    def deadline_for(self, command: Command, received: float) -> float:
        return received + (command.deadline_ms or self.default_deadline_ms) / 1000

    def handle(self, command: Command, received: float) -> Result:
        started = time.monotonic()
        deadline = self.deadline_for(command, received)
        try:
            if started > deadline:
                result = Result.failure(command.id, ErrorCode.DEADLINE_EXCEEDED, "deadline passed while queued")
            elif command.call is not None:
                result = self._direct(command, deadline)
            else:
                result = self._query(command, deadline)
        except Exception as exc:  # a bug must cost one request, never the daemon
            log.exception("pipeline_failed", error=str(exc))
            result = Result.failure(command.id, ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")
        result.device = self.device_id
        result.timings_ms.setdefault("queue", round((started - received) * 1000, 3))
        result.timings_ms["total"] = round((time.monotonic() - received) * 1000, 3)
        return result

    def _execute(self, name: str, arguments: dict[str, Any], deadline: float) -> CallResult:
        call = CallResult(name=name, arguments=arguments)
        try:
            call.result = self.registry.run(name, arguments, timeout_s=deadline - time.monotonic())
        except ToolError as exc:
            call.error = ErrorInfo(code=exc.code, message=exc.message, details=exc.details)
        return call

    def _direct(self, command: Command, deadline: float) -> Result:
        assert command.call is not None
        t0 = time.monotonic()
        call = self._execute(command.call.name, command.call.arguments, deadline)
        timings = {"tools": round((time.monotonic() - t0) * 1000, 3)}
        if call.error is not None:
            return Result(id=command.id, status="error", tier=0, calls=[call], error=call.error, timings_ms=timings)
        return Result(id=command.id, status="ok", tier=0, calls=[call], timings_ms=timings)

    def _query(self, command: Command, deadline: float) -> Result:
        assert command.query is not None
        if self.router is None:
            return Result.failure(
                command.id, ErrorCode.NO_MODEL,
                "no router model is loaded on this device; send a direct 'call' or fetch a model",
            )
        client_tools = command.tools is not None
        try:
            specs = (
                [ToolSpec.from_openai(t) for t in command.tools or []]
                if client_tools
                else self.tool_specs()
            )
        except (KeyError, TypeError, AttributeError) as exc:
            return Result.failure(command.id, ErrorCode.BAD_COMMAND, f"invalid tool schema in 'tools': {exc}")
        t0 = time.monotonic()
        outcome: RouteOutcome = self.router.route(command.query, specs, deadline)
        timings = {"route": round((time.monotonic() - t0) * 1000, 3), **outcome.timings_ms}
        if outcome.none_fit:
            result = Result.failure(
                command.id, ErrorCode.NEEDS_REASONING, outcome.reason or "no tool fits this request"
            )
            result.tier, result.model, result.timings_ms, result.usage = 1, outcome.model, timings, outcome.usage
            return result
        if client_tools:
            calls = [CallResult(name=c.name, arguments=c.arguments) for c in outcome.calls]
            return Result(id=command.id, status="ok", tier=1, calls=calls, model=outcome.model, timings_ms=timings,
                          usage=outcome.usage)
        t1 = time.monotonic()
        calls = [self._execute(c.name, c.arguments, deadline) for c in outcome.calls]
        timings["tools"] = round((time.monotonic() - t1) * 1000, 3)
        failed = next((c.error for c in calls if c.error is not None), None)
        return Result(
            id=command.id, status="error" if failed else "ok", tier=1, calls=calls, error=failed,
            answer=outcome.answer, model=outcome.model, timings_ms=timings, usage=outcome.usage,
        )
