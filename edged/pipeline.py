"""The pipeline: one command in, one result out.

Direct calls run a tool. Queries climb the tiers: the router (tier 1) proposes calls; the escalation policy decides
whether they stand; if not, the thinker (tier 2) holds a short tool-calling conversation; if it gives up, the
remote reasoner (tier 3) gets the request while it is reachable, and otherwise the command falls back to the best
local answer (`degraded`) or waits in the durable outbox (`queued`).
"""

from __future__ import annotations

import json
import time
from typing import Any

import structlog

from edged.escalation import EscalationPolicy
from edged.protocol import CallResult, Command, ErrorCode, ErrorInfo, Result
from edged.router import RouteOutcome, Router, ToolSpec
from edged.telemetry import Metrics
from edged.tiers import Conversation, Executor, Outbox, RemoteTier, ReplyAddress, Tier, TierAnswer
from edged.tools.registry import ToolError, ToolRegistry

log = structlog.get_logger(__name__)


class Pipeline:
    """Turns a validated Command into a Result. Never raises: every failure becomes an `error` result."""

    def __init__(self, registry: ToolRegistry, device_id: str, default_deadline_ms: int,
                 router: Router | None = None, *, thinker: Tier | None = None, remote: RemoteTier | None = None,
                 outbox: Outbox | None = None, on_offline: str = "fallback",
                 policy: EscalationPolicy | None = None, metrics: Metrics | None = None,
                 queue_ttl_s: float = 3600.0) -> None:
        self.registry = registry
        self.device_id = device_id
        self.default_deadline_ms = default_deadline_ms
        self.router = router
        self.thinker = thinker
        self.remote = remote
        self.outbox = outbox
        self.on_offline = on_offline
        self.policy = policy or EscalationPolicy()
        self.metrics = metrics
        self.queue_ttl_s = queue_ttl_s

    def tool_specs(self) -> list[ToolSpec]:
        """The device's own tools as the router sees them."""
        return [ToolSpec(t.name, t.description, t.parameters, t.examples) for t in self.registry.allowed()]

    def deadline_for(self, command: Command, received: float) -> float:
        return received + (command.deadline_ms or self.default_deadline_ms) / 1000

    def handle(self, command: Command, received: float, reply: ReplyAddress | None = None) -> Result:
        started = time.monotonic()
        deadline = self.deadline_for(command, received)
        try:
            if started > deadline:
                result = Result.failure(command.id, ErrorCode.DEADLINE_EXCEEDED, "deadline passed while queued")
            elif command.call is not None:
                result = self._direct(command, deadline)
            else:
                result = self._query(command, deadline, reply)
        except Exception as exc:  # a bug must cost one request, never the daemon
            log.exception("pipeline_failed", error=str(exc))
            result = Result.failure(command.id, ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")
        result.device = self.device_id
        result.timings_ms.setdefault("queue", round((started - received) * 1000, 3))
        result.timings_ms["total"] = round((time.monotonic() - received) * 1000, 3)
        return result

    # -- tools ---------------------------------------------------------------------------------------------------

    def _execute(self, name: str, arguments: dict[str, Any], deadline: float) -> CallResult:
        call = CallResult(name=name, arguments=arguments)
        try:
            call.result = self.registry.run(name, arguments, timeout_s=deadline - time.monotonic())
        except ToolError as exc:
            call.error = ErrorInfo(code=exc.code, message=exc.message, details=exc.details)
        return call

    def _validate_only(self, name: str, arguments: dict[str, Any]) -> CallResult:
        call = CallResult(name=name, arguments=arguments)
        try:
            self.registry.get(name).validate(arguments)
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

    # -- queries -------------------------------------------------------------------------------------------------

    def _escalate(self, escalations: list[dict[str, Any]], tier: int, reason: str) -> None:
        self.policy.record(escalations, tier, reason)
        if self.metrics is not None:
            self.metrics.record_escalation(f"{tier}:{reason}")

    def _query(self, command: Command, deadline: float, reply: ReplyAddress | None) -> Result:
        assert command.query is not None
        client_tools = command.tools is not None
        try:
            specs = [ToolSpec.from_openai(t) for t in command.tools or []] if client_tools else self.tool_specs()
        except (KeyError, TypeError, AttributeError) as exc:
            return Result.failure(command.id, ErrorCode.BAD_COMMAND, f"invalid tool schema in 'tools': {exc}")
        if self.router is None and self.thinker is None and self.remote is None:
            return Result.failure(command.id, ErrorCode.NO_MODEL,
                                  "no model is loaded on this device; send a direct 'call' or fetch a model")
        escalations: list[dict[str, Any]] = []
        timings: dict[str, float] = {}
        start_tier = command.tier or 1
        tier1: Result | None = None
        if start_tier == 1 and self.router is not None:
            tier1, reason = self._tier1(command, specs, deadline, client_tools)
            if reason is None:
                return tier1
            timings.update(tier1.timings_ms)
            self._escalate(escalations, 1, reason)
        execute: Executor | None = None if client_tools else (lambda n, a: self._execute(n, a, deadline))
        conversation = Conversation(command.query, specs, execute, deadline, command.enable_thinking)
        tier2: Result | None = None
        if start_tier <= 2 and self.thinker is not None and time.monotonic() < deadline:
            answer = self._run_tier(self.thinker, conversation, timings, "think")
            tier2 = self._tier_result(command, 2, answer, escalations, timings)
            if answer.gave_up is None:
                return tier2
            self._escalate(escalations, 2, answer.gave_up)
        elif start_tier == 3:
            self._escalate(escalations, 0, "requested")  # counted in telemetry like the others
        best_local = tier2 if tier2 is not None and (tier2.calls or tier2.answer) else tier1
        return self._tier3(command, conversation, escalations, timings, best_local, reply)

    def _tier1(self, command: Command, specs: list[ToolSpec], deadline: float,
               client_tools: bool) -> tuple[Result, str | None]:
        assert command.query is not None and self.router is not None
        t0 = time.monotonic()
        outcome: RouteOutcome = self.router.route(command.query, specs, deadline)
        timings = {"route": round((time.monotonic() - t0) * 1000, 3), **outcome.timings_ms}
        checked = [self._validate_only(c.name, c.arguments) if not client_tools
                   else CallResult(name=c.name, arguments=c.arguments) for c in outcome.calls]
        reason = self.policy.after_router(outcome, command.query, checked, specs)
        if reason is not None:
            result = Result(id=command.id, status="error", tier=1, calls=checked, model=outcome.model,
                            timings_ms=timings, usage=outcome.usage)
            result.error = ErrorInfo(code=ErrorCode.NEEDS_REASONING,
                                     message=outcome.reason or f"tier 1 cannot answer: {reason}")
            failed = next((c.error for c in checked if c.error is not None), None)
            if failed is not None:
                result.error = failed
            return result, reason
        if client_tools:
            return Result(id=command.id, status="ok", tier=1, calls=checked, model=outcome.model,
                          timings_ms=timings, usage=outcome.usage), None
        t1 = time.monotonic()
        calls = [self._execute(c.name, c.arguments, deadline) for c in outcome.calls]
        timings["tools"] = round((time.monotonic() - t1) * 1000, 3)
        failed = next((c.error for c in calls if c.error is not None), None)
        return Result(
            id=command.id, status="error" if failed else "ok", tier=1, calls=calls, error=failed,
            answer=outcome.answer, model=outcome.model, timings_ms=timings, usage=outcome.usage,
        ), None

    @staticmethod
    def _run_tier(tier: Tier, conversation: Conversation, timings: dict[str, float], label: str) -> TierAnswer:
        t0 = time.monotonic()
        try:
            answer = tier.answer(conversation)
        except Exception as exc:
            log.exception("tier_failed", tier=tier.name)
            answer = TierAnswer(gave_up=f"failed: {type(exc).__name__}", model=tier.name)
        timings[label] = round((time.monotonic() - t0) * 1000, 3)
        timings.update({f"{label}_{k}": v for k, v in answer.timings_ms.items()})
        return answer

    @staticmethod
    def _tier_result(command: Command, tier: int, answer: TierAnswer, escalations: list[dict[str, Any]],
                     timings: dict[str, float]) -> Result:
        failed = next((c.error for c in answer.calls if c.error is not None), None)
        status = "ok"
        if answer.gave_up is None and failed is not None and not answer.answer:
            status = "error"
        return Result(id=command.id, status=status, tier=tier, calls=answer.calls, answer=answer.answer,
                      error=failed if status == "error" else None, model=answer.model, timings_ms=dict(timings),
                      usage=answer.usage, escalations=list(escalations))

    def _tier3(self, command: Command, conversation: Conversation, escalations: list[dict[str, Any]],
               timings: dict[str, float], best_local: Result | None, reply: ReplyAddress | None) -> Result:
        remote = self.remote
        if remote is not None and remote.available() and time.monotonic() < conversation.deadline:
            answer = self._run_tier(remote, conversation, timings, "remote")
            if answer.gave_up is None:
                return self._tier_result(command, 3, answer, escalations, timings)
            self._escalate(escalations, 3, answer.gave_up)
        if remote is not None:
            mode = command.on_offline or self.on_offline
            if mode == "queue" and self.outbox is not None and reply is not None:
                # a client's own deadline holds; without one, a queued command waits up to queue_ttl_s
                wait_s = conversation.remaining_s() if command.deadline_ms else self.queue_ttl_s
                deadline_wall = time.time() + max(0.0, wait_s)
                self.outbox.put(command.model_dump_json(exclude_none=True), command.id, reply, deadline_wall)
                return Result(id=command.id, status="queued", tier=3, escalations=escalations, timings_ms=timings)
        return self._fallback(command, escalations, timings, best_local, remote is not None)

    def run_queued(self, command_json: str, deadline: float) -> Result:
        """Tier 3 for a command from the outbox (its tiers 1-2 ran when it came in). `deadline`: time.monotonic().

        When the node could not be reached the result is an error whose last escalation is
        {"from": 3, "reason": "unreachable"}: the outbox keeps the command and tries again later.
        """
        received = time.monotonic()
        try:
            command = command_from_json(command_json)
        except ValueError as exc:
            return Result.failure(None, ErrorCode.BAD_COMMAND, f"stored command is not valid: {exc}")
        escalations: list[dict[str, Any]] = [{"from": 0, "reason": "outbox"}]
        timings: dict[str, float] = {}
        if self.remote is None or command.query is None:
            result = Result.failure(command.id, ErrorCode.NEEDS_REASONING, "tier 3 is not configured")
        else:
            client_tools = command.tools is not None
            try:
                specs = [ToolSpec.from_openai(t) for t in command.tools or []] if client_tools else self.tool_specs()
            except (KeyError, TypeError, AttributeError) as exc:
                return Result.failure(command.id, ErrorCode.BAD_COMMAND, f"invalid tool schema in 'tools': {exc}")
            execute: Executor | None = None if client_tools else (lambda n, a: self._execute(n, a, deadline))
            conversation = Conversation(command.query, specs, execute, deadline, command.enable_thinking)
            answer = self._run_tier(self.remote, conversation, timings, "remote")
            if answer.gave_up is None:
                result = self._tier_result(command, 3, answer, escalations, timings)
            else:
                self._escalate(escalations, 3, answer.gave_up)
                result = Result.failure(command.id, ErrorCode.NEEDS_REASONING,
                                        f"tier 3 could not answer: {answer.gave_up}")
                result.tier, result.escalations, result.timings_ms = 3, escalations, timings
        result.device = self.device_id
        result.timings_ms["total"] = round((time.monotonic() - received) * 1000, 3)
        return result

    @staticmethod
    def _fallback(command: Command, escalations: list[dict[str, Any]], timings: dict[str, float],
                  best_local: Result | None, had_remote: bool) -> Result:
        """The best local answer, marked `degraded` when a better tier exists but was out of reach."""
        if best_local is not None and (best_local.calls or best_local.answer) and had_remote:
            result = best_local.model_copy(deep=True)
            result.status, result.error = "degraded", None
            for call in result.calls:  # a tier-1 proposal that was escalated is shown, never silently run
                if call.result is None and call.error is None:
                    call.error = ErrorInfo(code=ErrorCode.NOT_EXECUTED,
                                           message="proposed by tier 1 but escalated; not run")
        elif best_local is not None:
            result = best_local.model_copy(deep=True)
        else:
            result = Result.failure(command.id, ErrorCode.NEEDS_REASONING,
                                    "no tier could answer this request on this device")
        result.escalations = escalations
        result.timings_ms = {**timings, **result.timings_ms}
        return result


def command_from_json(text: str) -> Command:
    """A stored command (outbox) back to a Command."""
    return Command.model_validate(json.loads(text))
