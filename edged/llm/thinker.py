"""Tier 2: the in-process thinker (Qwen3 0.6B in production, Qwen2.5 0.5B as the stand-in).

A short conversation in the model's own chat template: tools in `<tools>`, calls in `<tool_call>`, results fed
back as `<tool_response>`, so it can call tools in several steps and then talk about the results. Whether to call
and which call are decoded under the tool schemas (the same decoder as tier 1, so calls are always valid); the
final words and any thinking are sampled freely by llama.cpp. `<think>` text never reaches the answer; its
tokens are counted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edged.llm.decoder import CallDecoder, Decoded
from edged.llm.engine import ContextFull, DeadlineExceeded, Engine
from edged.llm.formats import HermesFormat
from edged.llm.grounding import relevant
from edged.llm.router import neutralize
from edged.protocol import CallResult
from edged.router import ProposedCall, ToolSpec
from edged.tiers import Conversation, TierAnswer

_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)
_GIVE_UP = re.compile(
    r"\b(i (?:can ?not|can't|am unable to|am not able to|don't know how to)|beyond (?:me|my)|"
    r"i'm (?:unable|not able))\b", re.IGNORECASE)
STOPS = ["<|im_end|>", "<|endoftext|>"]
WARM_STEP = 32  # tokens per model step of the warm-up: what a tier-1 request may wait for (~0.2 s on 2 cores)
ANSWER_PRIMER = "Based on the results, "
SYSTEM = (
    "You are the assistant of a smart device and can call tools. When the request needs a fact you do not have "
    "yet (for example where a person lives), first call the tool that finds it, read its result, then make the "
    "next call with what you learned. Never guess a value. When you have what you need, answer the user in one "
    "or two short sentences that use the tool results, without JSON."
)


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int = 20


def qwen_sampling(thinking: bool, temperature: float | None) -> Sampling:
    """Qwen3's recommended sampling for each mode; an explicit temperature (0 = greedy) wins."""
    base = Sampling(0.6, 0.95) if thinking else Sampling(0.7, 0.8)
    return base if temperature is None else Sampling(temperature, base.top_p)


def _openai_tools(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters}} for t in tools]


def _call_content(call: CallResult) -> str:
    if call.error is not None:
        return json.dumps({"error": call.error.code.value, "message": call.error.message})
    return json.dumps(call.result, default=str)


class Thinker:
    def __init__(self, engine: Engine, *, name: str, max_steps: int = 4, max_tokens: int = 384,
                 enable_thinking: bool = False, temperature: float | None = None, seed: int = -1) -> None:
        template = engine.chat_template
        if not template or "<tool_call>" not in template:
            raise ValueError(f"{engine.path.name}: a thinker needs a chat template with <tool_call> support")
        self.engine = engine
        self.name = name
        self.fmt = HermesFormat(template=template)
        self.max_steps = max_steps
        self.max_tokens = max_tokens
        self.enable_thinking = enable_thinking
        self.temperature = temperature
        self.seed = seed
        self.can_think = "enable_thinking" in template
        starts = {self.engine.tokenize(t)[0] for t in self.fmt.syntax.call_starts}
        self._no_calls = {t: -100.0 for t in starts}

    def _render(self, messages: list[dict[str, Any]], tools: list[ToolSpec], thinking: bool) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters.setdefault("tojson", lambda v, **kw: json.dumps(v, ensure_ascii=False))
        return env.from_string(self.fmt.template).render(
            messages=messages, tools=_openai_tools(tools), add_generation_prompt=True, bos_token="",
            eos_token="<|im_end|>", enable_thinking=thinking,
        )

    def _complete(self, tokens: list[int], max_tokens: int, sampling: Sampling, stop: list[str],
                  ban: dict[int, float] | None = None, deadline: float = float("inf")) -> tuple[str, int, bool]:
        """Free generation by llama.cpp's own sampler chain (near raw decoding speed); True if cut by the budget."""
        max_tokens = min(max_tokens, self.engine.n_ctx - len(tokens) - 1)
        if max_tokens <= 0:
            raise ContextFull("no room left in the context")
        return self.engine.generate(tokens, max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                                    top_k=sampling.top_k, seed=self.seed, stop=tuple(stop), bias=ban,
                                    deadline=deadline)

    def warm(self, tools: list[ToolSpec], step: int = WARM_STEP,
             give_way: Callable[[], None] | None = None) -> None:
        """Evaluate the conversation's opening (system prompt, tool declarations) now: the first request then pays
        only for its own turn. Measured with the demo's tools: its first tier-2 request took 4.2 s, ~3 s of it
        this prefill. In steps of `step` tokens, calling `give_way` before each: the daemon warms in the background
        while tier 1 serves, and a route waits for the step under way, not for the whole opening."""
        opening = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ""}]
        tokens = self.engine.tokenize(self._render(opening, tools, self.enable_thinking), bos=True)
        with self.engine.lock:
            for end in range(step, len(tokens) + step, step):
                if give_way is not None:
                    give_way()  # a request in progress elsewhere finishes first: it waits for one step at most
                self.engine.sync(tokens[:end])

    def answer(self, conversation: Conversation) -> TierAnswer:
        thinking = self.can_think and (conversation.enable_thinking if conversation.enable_thinking is not None
                                       else self.enable_thinking)
        sampling = qwen_sampling(thinking, self.temperature)
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM},
                                          {"role": "user", "content": neutralize(conversation.query)}]
        calls: list[CallResult] = []
        seen: list[ProposedCall] = []
        usage = {"steps": 0.0, "generated_tokens": 0.0, "thinking_tokens": 0.0}
        budget = self.max_tokens
        with self.engine.lock:
            self.engine.requests += 1
            try:
                for _ in range(self.max_steps):
                    usage["steps"] += 1
                    prompt = self.engine.tokenize(self._render(messages, conversation.tools, thinking), bos=True)
                    if thinking:
                        text, used, _ = self._complete(prompt, budget, sampling, ["</think>", *STOPS],
                                                      deadline=conversation.deadline)
                        budget -= used
                        usage["thinking_tokens"] += used
                        prompt = prompt + self.engine.tokenize(text + "</think>\n\n", special=False)
                    context = conversation.query + " " + " ".join(m["content"] for m in messages
                                                                  if m["role"] == "tool")
                    decoder = CallDecoder(self.engine, self.fmt, speculative=False)
                    # a chain moves on: a tool already called is not offered again (its result is in the context)
                    # and only to tools the request is about, so a small model cannot drift into unrelated calls
                    called = {c.name for c in seen}
                    offered = [t for t in conversation.tools if t.name not in called
                               and (not seen or relevant(t.name, t.description, conversation.query))]
                    decoded = (decoder.decode(prompt, context, offered, conversation.deadline) if offered
                               else None)
                    if decoded is None:
                        decoded = Decoded(none_fit=True)
                    usage["generated_tokens"] += decoded.steps
                    budget -= decoded.steps
                    new = [c for c in decoded.calls if c not in seen]
                    if new and budget > 0:
                        if conversation.execute is None:  # the command's own tools: return them unexecuted
                            calls += [CallResult(name=c.name, arguments=c.arguments) for c in new]
                            return TierAnswer(calls=calls, model=self.name, usage=usage)
                        seen += new
                        results = [conversation.execute(c.name, c.arguments) for c in new]
                        calls += results
                        messages.append({"role": "assistant", "content": "", "tool_calls": [
                            {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                            for c in new]})
                        messages += [{"role": "tool", "content": _call_content(r)} for r in results]
                        continue
                    if budget <= 0:
                        break
                    # the decoder ruled out a call here: words only, no call written as text; after tool results a
                    # short primer keeps a small model from echoing JSON instead of answering
                    primer = ANSWER_PRIMER if seen else ""
                    text, used, cut = self._complete(prompt + self.engine.tokenize(primer, special=False), budget,
                                                     sampling, STOPS, self._no_calls, conversation.deadline)
                    text = primer + text
                    usage["generated_tokens"] += used
                    if cut:
                        return TierAnswer(calls=calls, answer=_THINK.sub("", text).strip() or None, gave_up="budget",
                                          model=self.name, usage=usage)
                    answer = _THINK.sub("", text).strip()
                    if not answer or _GIVE_UP.search(answer):
                        return TierAnswer(calls=calls, answer=answer or None, gave_up="thinker_gave_up",
                                          model=self.name, usage=usage)
                    return TierAnswer(calls=calls, answer=answer, model=self.name, usage=usage)
            except DeadlineExceeded:
                return TierAnswer(calls=calls, gave_up="deadline_exceeded", model=self.name, usage=usage)
            except ContextFull:
                return TierAnswer(calls=calls, gave_up="budget", model=self.name, usage=usage)
        return TierAnswer(calls=calls, gave_up="budget", model=self.name, usage=usage)
