"""Tier 1: the in-process router. A request and a tool set in, schema-valid tool calls (or "none fits") out."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

from edged.llm.decoder import CallDecoder
from edged.llm.engine import ContextFull, DeadlineExceeded, Engine
from edged.llm.formats import PromptFormat
from edged.router import RouteOutcome, ToolSpec

_CONTROL = re.compile(r"<(?=[|/a-z_])")


def neutralize(text: str) -> str:
    """Text from clients must not read as a control token (`<tool_call>`, `<|im_end|>`) in the prompt."""
    return _CONTROL.sub("< ", text)


@dataclass
class _Prefix:
    tokens: list[int]
    suffix: list[int]
    state: bytes | None = None  # the KV cells of `tokens`, once evaluated


def tool_set_key(tools: list[ToolSpec]) -> str:
    blob = json.dumps([[t.name, t.description, t.parameters, t.examples] for t in tools], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class LocalRouter:
    """Routes with one Engine; one request at a time (the engine's lock), tool prompts tokenized once per set."""

    def __init__(self, engine: Engine, fmt: PromptFormat, *, name: str, min_confidence: float = 0.0,
                 copy_bias: float = 2.5, prompt_cache: int = 16, prompt_cache_mb: float = 64.0) -> None:
        self.engine = engine
        self.fmt = fmt
        self.name = name
        self.min_confidence = min_confidence
        self.copy_bias = copy_bias
        self._prefixes: OrderedDict[str, _Prefix] = OrderedDict()
        self._prefix_cap = prompt_cache
        self._prefix_bytes = prompt_cache_mb * 1e6

    def _prompt_parts(self, tools: list[ToolSpec]) -> tuple[list[int], list[int]]:
        """The tool set's prompt prefix and suffix as tokens, with the prefix's KV cells evaluated only once.

        The context holds one prefix at a time; the KV cells of the others are kept as snapshots (bounded by
        count and bytes, least recently used first out), so switching tool sets costs a memory copy, not a prefill.
        """
        key = tool_set_key(tools)
        cached = self._prefixes.get(key)
        if cached is None:
            safe = [ToolSpec(neutralize(t.name), neutralize(t.description), t.parameters, t.examples) for t in tools]
            prefix = self.fmt.prefix(safe)
            bos = not prefix.startswith("<bos>")
            cached = _Prefix(self.engine.tokenize(prefix, bos=bos), self.engine.tokenize(self.fmt.suffix()))
            self._prefixes[key] = cached
        self._prefixes.move_to_end(key)
        held = self.engine.n_past
        holds_prefix = held >= len(cached.tokens) and self.engine.tokens()[: len(cached.tokens)] == cached.tokens
        if not holds_prefix:
            if cached.state is None or not self.engine.restore(cached.tokens, cached.state):
                self.engine.sync(cached.tokens)
                _, cached.state = self.engine.snapshot()
            self._evict()
        return cached.tokens, cached.suffix

    def _evict(self) -> None:
        total = sum(len(p.state or b"") for p in self._prefixes.values())
        while len(self._prefixes) > 1 and (len(self._prefixes) > self._prefix_cap or total > self._prefix_bytes):
            _, old = self._prefixes.popitem(last=False)
            total -= len(old.state or b"")

    def warm(self, tools: list[ToolSpec]) -> None:
        """Evaluate a tool set's prompt prefix now (at start-up), so the first request pays only for its own text."""
        with self.engine.lock:
            prefix, _ = self._prompt_parts(tools)
            self.engine.sync(prefix)

    def route(self, query: str, tools: list[ToolSpec], deadline: float) -> RouteOutcome:
        if not tools:
            return RouteOutcome(none_fit=True, reason="no tools on offer", model=self.name)
        t0 = time.monotonic()
        with self.engine.lock:
            waited = time.monotonic() - t0
            prefix, suffix = self._prompt_parts(tools)
            prompt = prefix + self.engine.tokenize(neutralize(query.strip()), special=False) + suffix
            decoder = CallDecoder(self.engine, self.fmt, copy_bias=self.copy_bias)
            try:
                out = decoder.decode(prompt, query, tools, deadline)
            except DeadlineExceeded:
                return RouteOutcome(none_fit=True, reason="deadline_exceeded", model=self.name)
            except ContextFull as exc:
                return RouteOutcome(none_fit=True, reason=f"request too long: {exc}", model=self.name)
            finally:
                self.engine.requests += 1
        timings = {"lock_wait": round(waited * 1000, 3)}
        stats = {
            "prompt_tokens": float(out.prompt),
            "reused_tokens": float(out.reused),
            "decode_steps": float(out.steps),
            "forced_tokens": float(out.forced),
            "confidence": round(out.confidence, 4),
        }
        if out.none_fit:
            return RouteOutcome(none_fit=True, reason="no tool fits this request", model=self.name, usage=stats,
                                timings_ms=timings)
        if out.confidence < self.min_confidence:
            return RouteOutcome(calls=out.calls, none_fit=True, model=self.name, usage=stats, timings_ms=timings,
                                reason=f"low confidence {out.confidence:.2f} in the tool choice")
        return RouteOutcome(calls=out.calls, model=self.name, usage=stats, timings_ms=timings)
