"""The escalation policy, in one place: when tier 1 hands a request to tier 2, and tier 2 to tier 3.

Every escalation is recorded in the result (`escalations: [{"from": 1, "reason": ...}]`) and counted in
telemetry, so a fleet operator can see why requests leave the cheap tier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edged.llm.grounding import looks_dependent, ungrounded_arguments
from edged.protocol import CallResult, ErrorCode
from edged.router import RouteOutcome, ToolSpec


def free_form_keys(tool: ToolSpec | None) -> set[str]:
    """Arguments whose values are not free text (enums, numbers with no digits in sight are still checked)."""
    if tool is None:
        return set()
    props: dict[str, Any] = tool.parameters.get("properties", {})
    return {k for k, v in props.items() if "enum" in v or v.get("type") == "boolean"}


@dataclass(frozen=True)
class EscalationPolicy:
    min_confidence: float = 0.0
    check_grounding: bool = True

    def after_router(self, outcome: RouteOutcome, query: str, calls: list[CallResult] | None,
                     tools: list[ToolSpec]) -> str | None:
        """Why tier 1's answer is not good enough, or None to accept it. `calls` are the validated calls."""
        if outcome.none_fit:
            if outcome.reason == "deadline_exceeded":
                return "deadline_exceeded"
            return "no_tool_fits" if not outcome.calls else "low_confidence"
        confidence = outcome.usage.get("confidence")
        if confidence is not None and confidence < self.min_confidence:
            return "low_confidence"
        if calls is not None and any(c.error is not None and c.error.code == ErrorCode.INVALID_ARGUMENTS
                                     for c in calls):
            return "invalid_arguments"
        if self.check_grounding:
            if looks_dependent(query):  # a value must come from an earlier call's result: only tier 2 chains
                return "depends_on_earlier_result"
            by_name = {t.name: t for t in tools}
            for call in outcome.calls:
                if ungrounded_arguments(call, query, exempt=free_form_keys(by_name.get(call.name))):
                    return "ungrounded_argument"
        return None

    @staticmethod
    def record(escalations: list[dict[str, Any]], tier: int, reason: str) -> None:
        escalations.append({"from": tier, "reason": reason})
