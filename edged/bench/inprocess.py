"""In-process measurements: raw llama.cpp speed, the router on the seed's requests, the naive grammar path, tier 2.

Everything here runs in the bench's own process on engines loaded by `edged.llm.loader`, through the public
behaviour of `Engine`, `LocalRouter` and `Thinker` only.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from edged.bench.common import Case, calls_match, percentiles, ratio
from edged.llm.engine import Engine
from edged.llm.formats import GenericFormat
from edged.llm.textcalls import parse_text_calls
from edged.router import ToolSpec

_FILLER = (
    "The quick brown fox jumps over the lazy dog while the weather in Tokyo stays mild and the kitchen lights "
    "switch on at dusk. A small device on the shelf listens for requests, routes them to tools and reports back. "
)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def raw_speed(engine: Engine, *, prefill_tokens: int = 256, decode_tokens: int = 64) -> dict[str, Any]:
    """The limit: prefill of a fresh prompt in one batch, then greedy decoding by `llm.eval`, no grammar, no sampler.

    Also greedy `create_completion` of the same length (llama.cpp's sampler chain, still no grammar).
    """
    import numpy as np

    llm = engine.llm
    with engine.lock:
        tokens = engine.tokenize(_FILLER * 40, bos=True)[:prefill_tokens]
        engine.rewind(0)
        t0 = time.perf_counter()
        llm.eval(tokens)
        prefill_s = time.perf_counter() - t0
        steps: list[float] = []
        for _ in range(decode_tokens):
            if llm.n_tokens + 1 >= engine.n_ctx:
                break
            token = int(np.argmax(engine.logits()))
            t1 = time.perf_counter()
            llm.eval([token])
            steps.append(time.perf_counter() - t1)
        # create_completion on an already evaluated prompt: only generation is timed (EOS banned: full length)
        engine.rewind(0)
        llm.eval(tokens)
        ban = {t: -1e9 for t in engine.eos_ids}
        t2 = time.perf_counter()
        out: Any = llm.create_completion(tokens, max_tokens=decode_tokens, temperature=0.0, logit_bias=ban)
        gen_s = time.perf_counter() - t2
        generated = int(out["usage"]["completion_tokens"])
        engine.rewind(0)
    decode_s = sum(steps)
    return {
        "prefill_tokens": len(tokens),
        "prefill_tokens_per_s": round(len(tokens) / prefill_s, 1),
        "decode_tokens": len(steps),
        "decode_tokens_per_s": round(len(steps) / decode_s, 1) if decode_s else None,
        "decode_ms_per_token": _ms(decode_s / len(steps)) if steps else None,
        "completion_tokens": generated,
        "completion_tokens_per_s": round(generated / gen_s, 1) if gen_s else None,
    }


def _calls(outcome: Any) -> list[dict[str, Any]]:
    return [{"name": c.name, "arguments": c.arguments} for c in outcome.calls]


def route_cases(router: Any, cases: list[Case], runs: int, budget_s: float) -> dict[str, Any]:
    """Warm the router's prompt for the cases' tool sets, then route each case `runs` times (after one warm-up)."""
    for specs in {json.dumps(c.tools, sort_keys=True): c.specs for c in cases}.values():
        warm = getattr(router, "warm", None)
        if warm is not None:
            warm(specs)
    per_case: dict[str, Any] = {}
    end = time.monotonic() + budget_s
    for case in cases:
        specs = case.specs
        first = router.route(case.query, specs, time.monotonic() + 60)
        samples: list[float] = []
        outcome = first
        for i in range(runs):
            if i and time.monotonic() > end:
                break
            t0 = time.perf_counter()
            outcome = router.route(case.query, specs, time.monotonic() + 60)
            samples.append(_ms(time.perf_counter() - t0))
        usage = dict(outcome.usage)
        # prompt tokens evaluated for this request (the reused prefix excluded) + one model step per choice
        tokens = max(0.0, usage.get("prompt_tokens", 0.0)) + usage.get("decode_steps", 0.0)
        per_case[case.id] = {
            "query": case.query, "multi": case.multi, "ms": percentiles(samples), "samples_ms": samples,
            "calls": _calls(outcome), "match": calls_match(_calls(outcome), case.expected),
            "usage": usage, "tokens_evaluated": tokens, "cold_calls": _calls(first),
        }
    return per_case


def summarize_router(per_case: dict[str, Any]) -> dict[str, Any]:
    single = [s for c in per_case.values() if not c["multi"] for s in c["samples_ms"]]
    multi = [s for c in per_case.values() if c["multi"] for s in c["samples_ms"]]
    every = single + multi
    return {
        "avg_warm_ms": round(sum(every) / len(every), 3) if every else None,
        "single_tool_ms": percentiles(single),
        "multi_tool_ms": percentiles(multi),
        "all_ms": percentiles(every),
        "tokens_per_query": round(sum(c["tokens_evaluated"] for c in per_case.values()) / len(per_case), 1)
        if per_case else None,
        "prompt_tokens_per_query": round(sum(c["usage"].get("prompt_tokens", 0) for c in per_case.values())
                                         / len(per_case), 1) if per_case else None,
        "decode_steps_per_query": round(sum(c["usage"].get("decode_steps", 0) for c in per_case.values())
                                        / len(per_case), 1) if per_case else None,
        "correct": sum(1 for c in per_case.values() if c["match"]["correct"]),
        "n_cases": len(per_case),
    }


# --- the naive path: llama-cpp-python's own JSON-schema grammar over the same prompt ---------------------------------


def _call_schema(tools: list[ToolSpec]) -> dict[str, Any]:
    return {"anyOf": [{"type": "object", "properties": {"name": {"const": t.name},
                                                        "arguments": t.parameters or {"type": "object"}},
                       "required": ["name", "arguments"]} for t in tools]}


def naive_grammar(router: Any, tools: list[ToolSpec]) -> Any:
    """A GBNF grammar for one or more calls: Hermes `<tool_call>` tags, else a JSON list (the generic format's
    JSON form: llama-cpp-python's JSON-schema grammar is what a user would reach for)."""
    from llama_cpp import LlamaGrammar
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    call = _call_schema(tools)
    syntax = router.fmt.syntax
    if syntax.opener.startswith("<tool_call>"):
        body = json_schema_to_gbnf(json.dumps(call))
        body = re.sub(r"^root ::=", "call ::=", body, flags=re.MULTILINE)
        root = 'root ::= "<tool_call>\\n" call "\\n</tool_call>" ("\\n<tool_call>\\n" call "\\n</tool_call>")*\n'
        return LlamaGrammar.from_string(root + body, verbose=False)
    return LlamaGrammar.from_json_schema(json.dumps({"type": "array", "items": call, "minItems": 1}), verbose=False)


def naive_prompt(router: Any, query: str, tools: list[ToolSpec]) -> list[int]:
    """The router's prompt, built the way the router builds it (prefix with the tools, the request, the suffix)."""
    engine: Engine = router.engine
    fmt = router.fmt
    if isinstance(fmt, GenericFormat) and fmt.keyed:
        fmt = GenericFormat(family=fmt.family, keyed=False)  # llama-cpp-python's JSON-schema grammar: named calls
    prefix = fmt.prefix(tools)
    suffix = fmt.suffix()
    return (engine.tokenize(prefix, bos=not prefix.startswith("<bos>"))
            + engine.tokenize(query.strip(), special=False) + engine.tokenize(suffix))


def naive_cases(router: Any, cases: list[Case], runs: int, budget_s: float, warmup: int = 1) -> dict[str, Any]:
    """The 'before': grammar-constrained generation by llama-cpp-python (prompt prefix reuse included).

    The router has just evaluated the same prompt prefix, so even without a warm-up run only the request is new.
    """
    engine: Engine = router.engine
    per_case: dict[str, Any] = {}
    end = time.monotonic() + budget_s
    for case in cases:
        specs = case.specs
        names = {t.name for t in specs}
        prompt = naive_prompt(router, case.query, specs)
        grammar = naive_grammar(router, specs)
        samples: list[float] = []
        text = ""
        generated = 0
        for i in range(runs + warmup):
            if samples and time.monotonic() > end:
                break
            with engine.lock:
                t0 = time.perf_counter()
                out: Any = engine.llm.create_completion(prompt, max_tokens=96, temperature=0.0, grammar=grammar)
                dt = time.perf_counter() - t0
            text = str(out["choices"][0]["text"])
            generated = int(out["usage"]["completion_tokens"])
            if i >= warmup:
                samples.append(_ms(dt))
        found, _ = parse_text_calls(text, names)
        calls = [{"name": c.name, "arguments": c.arguments} for c in found]
        per_case[case.id] = {"multi": case.multi, "ms": percentiles(samples), "samples_ms": samples,
                             "generated_tokens": generated,
                             "ms_per_generated_token": round(percentiles(samples)["p50"] / generated, 2)  # type: ignore[operator]
                             if generated and samples else None,
                             "text": text[:300], "calls": calls, "match": calls_match(calls, case.expected)}
    single = [s for c in per_case.values() if not c["multi"] for s in c["samples_ms"]]
    multi = [s for c in per_case.values() if c["multi"] for s in c["samples_ms"]]
    return {"cases": per_case, "single_tool_ms": percentiles(single), "multi_tool_ms": percentiles(multi),
            "all_ms": percentiles(single + multi),
            "correct": sum(1 for c in per_case.values() if c["match"]["correct"])}


# --- tier 2 ----------------------------------------------------------------------------------------------------------


def thinker_speed(thinker: Any, engine: Engine, tools: list[ToolSpec], raw: dict[str, Any], runs: int,
                  budget_s: float) -> dict[str, Any]:
    """The thinker's generation speed on a chat request (words, no call) against raw decoding of the same file."""
    from edged.tiers import Conversation

    query = "Write a short poem about the sea and the wind, in four lines."
    rates: list[float] = []
    walls: list[float] = []
    generated: list[float] = []
    answer: Any = None
    end = time.monotonic() + budget_s
    for i in range(runs + 1):
        if i > 1 and time.monotonic() > end:
            break
        tokens0, secs0 = engine.generated_tokens, engine.decode_s
        t0 = time.perf_counter()
        answer = thinker.answer(Conversation(query, tools, None, time.monotonic() + 120))
        wall = time.perf_counter() - t0
        d_tokens, d_secs = engine.generated_tokens - tokens0, engine.decode_s - secs0
        if i and d_secs > 0:  # the first run warms the prompt
            rates.append(d_tokens / d_secs)
            walls.append(_ms(wall))
            generated.append(float(answer.usage.get("generated_tokens", d_tokens)))
    rate = round(sorted(rates)[len(rates) // 2], 1) if rates else None
    return {
        "query": query,
        "tokens_per_s": rate,
        "generated_tokens": generated,
        "wall_ms": percentiles(walls),
        "raw_decode_tokens_per_s": raw.get("decode_tokens_per_s"),
        "raw_completion_tokens_per_s": raw.get("completion_tokens_per_s"),
        "ratio_vs_raw_decode": ratio(rate, raw.get("decode_tokens_per_s")),
        "ratio_vs_raw_completion": ratio(rate, raw.get("completion_tokens_per_s")),
        "answer": (answer.answer or "")[:200] if answer is not None else None,
        "gave_up": answer.gave_up if answer is not None else None,
    }
