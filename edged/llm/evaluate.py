"""`edged eval`: run case files through the same pipeline the daemon uses and score the calls.

Scoring compares calls as sets (order-free). Arguments match when equal after normalising: numbers by value
(25 == 25.0), strings case- and surrounding-space-insensitively.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edged.pipeline import Pipeline
from edged.protocol import Command
from edged.telemetry import percentile


def _norm(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return value.strip().lower()
    if isinstance(value, list):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in sorted(value.items())}
    return value


def _key(call: dict[str, Any]) -> str:
    return json.dumps([call.get("name"), _norm(call.get("arguments") or {})], sort_keys=True)


@dataclass
class Scores:
    cases: int = 0
    scored: int = 0
    exact: int = 0
    names: int = 0
    no_tool_cases: int = 0
    no_tool_right: int = 0
    escalated: int = 0
    latencies: list[float] = field(default_factory=list)

    def add(self, expected: list[dict[str, Any]] | None, calls: list[dict[str, Any]], escalated: bool,
            latency_ms: float) -> None:
        self.cases += 1
        self.escalated += escalated
        self.latencies.append(latency_ms)
        if expected is None:
            return
        self.scored += 1
        self.exact += sorted(map(_key, calls)) == sorted(map(_key, expected))
        self.names += sorted(c["name"] for c in calls) == sorted(c["name"] for c in expected)
        if not expected:
            self.no_tool_cases += 1
            self.no_tool_right += not calls

    def summary(self) -> dict[str, Any]:
        def ratio(a: int, b: int) -> float | None:
            return round(a / b, 4) if b else None

        return {
            "cases": self.cases,
            "exact_match_accuracy": ratio(self.exact, self.scored),
            "name_accuracy": ratio(self.names, self.scored),
            "no_tool_accuracy": ratio(self.no_tool_right, self.no_tool_cases),
            "escalated": self.escalated,
            "latency_p50_ms": percentile(self.latencies, 50),
            "latency_p95_ms": percentile(self.latencies, 95),
        }


def read_cases(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not JSON: {exc}") from exc


def evaluate(pipeline: Pipeline, cases: Path, out: Path | None) -> Scores:
    scores = Scores()
    sink = out.open("w", encoding="utf-8") if out else None
    try:
        for case in read_cases(cases):
            command = Command(id=str(case.get("id", scores.cases + 1)), query=case["query"],
                              tools=case.get("tools"), deadline_ms=120_000)
            t0 = time.monotonic()
            result = pipeline.handle(command, t0)
            latency = round((time.monotonic() - t0) * 1000, 3)
            calls = [{"name": c.name, "arguments": c.arguments} for c in result.calls]
            escalated = bool(result.escalations)
            scores.add(case.get("expected"), calls, escalated, latency)
            if sink:
                sink.write(json.dumps({"id": command.id, "calls": calls, "tier": result.tier, "escalated": escalated,
                                       "latency_ms": latency, "status": result.status,
                                       "error": result.error.code if result.error else None}) + "\n")
    finally:
        if sink:
            sink.close()
    return scores
