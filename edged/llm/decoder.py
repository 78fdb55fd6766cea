"""Schema-constrained decoding of tool calls, one model step per token the model really has to choose.

The tool schemas are compiled into a decoding plan instead of a GBNF grammar checked against the whole vocabulary
at every step: the call syntax (braces, keys, quotes) is forced text fed as one batch; a tool name, an enum value
or a boolean is a choice in a token trie, where only branching points cost a model step and the model's
probabilities among the allowed tokens give the confidence; strings and numbers are generated greedily from the
best allowed candidates. The output therefore always parses into calls of known tools with arguments of the
declared types; pydantic still validates them before anything runs.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edged.llm.engine import DeadlineExceeded, Engine
from edged.llm.formats import CallSyntax, PromptFormat, none_name
from edged.llm.grounding import looks_compound, mention_score, relevant, ungrounded_arguments
from edged.router import ProposedCall, ToolSpec

TOP_K = 48
_NUMBER = re.compile(r"-?\d*\.?\d*(e-?\d*)?")
_INTEGER = re.compile(r"-?\d*")


@dataclass
class Decoded:
    calls: list[ProposedCall] = field(default_factory=list)
    none_fit: bool = False
    confidence: float = 1.0
    steps: int = 0  # model steps that chose a token
    forced: int = 0  # tokens fed as forced text
    reused: int = 0  # prompt tokens reused from the cache
    prompt: int = 0  # prompt tokens evaluated


@dataclass
class _Trie:
    children: dict[int, _Trie] = field(default_factory=dict)
    option: int | None = None  # index of the option that ends here


def _numbers_possible(tool: ToolSpec, query: str) -> bool:
    """A tool with a required number can only be called from a request with digits in it."""
    props = tool.parameters.get("properties", {})
    needs_number = any(props.get(k, {}).get("type") in ("integer", "number") and "enum" not in props.get(k, {})
                       for k in tool.parameters.get("required", list(props)))
    return not needs_number or any(ch.isdigit() for ch in query)


def _draft(node: _Trie, hints: list[float]) -> tuple[list[int], _Trie] | None:
    """The best-hinted child of `node` and the forced tokens after it, when they lead to another choice (only then
    does a right guess save a step): (tokens, the node where that choice is), else None."""
    best: tuple[float, int] | None = None
    for token, child in node.children.items():
        score = max(hints[i] for i in _options_below(child))
        if score > 0 and (best is None or score > best[0]):
            best = (score, token)
    if best is None:
        return None
    tokens, child = [best[1]], node.children[best[1]]
    while child.option is None and len(child.children) == 1:
        token, child = next(iter(child.children.items()))
        tokens.append(token)
    return (tokens, child) if child.option is None else None


def _options_below(node: _Trie) -> list[int]:
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        if n.option is not None:
            out.append(n.option)
        stack.extend(n.children.values())
    return out


class CallDecoder:
    """Decodes calls for one request; holds the engine lock's owner's state for that request only."""

    def __init__(self, engine: Engine, fmt: PromptFormat, *, copy_bias: float = 2.5, max_calls: int = 4,
                 max_string_tokens: int = 24, speculative: bool = True) -> None:
        self.speculative = speculative
        self.engine = engine
        self.fmt = fmt
        self.syntax: CallSyntax = fmt.syntax
        self.copy_bias = copy_bias
        self.max_calls = max_calls
        self.max_string_tokens = max_string_tokens
        self.deadline = float("inf")
        self.out = Decoded()
        self._copy_ids: np.ndarray = np.zeros(0, dtype=np.int64)
        self._pending: list[int] = []
        self._forced: list[str] = []  # forced text not yet tokenized
        self._prompt: list[int] | None = None

    # -- primitives ------------------------------------------------------------------------------------------------

    def _tok(self, text: str) -> tuple[int, ...]:
        return self.engine.tokenize_piece(text)

    def _force(self, text: str) -> None:
        """Forced text is not evaluated now: it rides along with the next model step's batch."""
        self._forced.append(text)

    def _tokenize_forced(self) -> None:
        """Where the syntax asks for it (`joint_forced`), consecutive forced pieces are tokenized as one text:
        'city=' + '"' as the model writes it ('="'), so it reads its usual tokens, not the seams of our syntax.
        Measured per format: it helps the generic keyed syntax, and cost Qwen one case of the IoT eval (Hermes)."""
        if not self._forced:
            return
        pieces = ["".join(self._forced)] if self.syntax.joint_forced else self._forced
        for piece in pieces:
            tokens = self._tok(piece)
            self._pending.extend(tokens)
            self.out.forced += len(tokens)
        self._forced = []

    def _accept(self, token: int) -> None:
        """A token the model chose: likewise evaluated with the next batch, not in a call of its own."""
        self._tokenize_forced()
        self._pending.append(token)

    def _flush(self, guess: list[int] | None = None) -> np.ndarray | None:
        """Evaluate everything pending in one llama_decode call (the prompt too, the first time).

        With `guess`, those tokens ride along too, and the logits before them are returned."""
        self._tokenize_forced()
        guess = guess or []
        before = None
        if self._prompt is not None:
            batch = self._prompt + self._pending
            reused, before = self.engine.sync(batch + guess, peek=len(guess))
            self.out.reused = min(reused, len(self._prompt))
            self.out.prompt = max(0, len(self._prompt) - reused)  # the request's own tokens, evaluated now
            self._prompt = None
        elif self._pending or guess:
            before = self.engine.feed(self._pending + guess, peek=len(guess))
        self._pending = []
        return before

    def _check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise DeadlineExceeded("deadline passed during decoding")

    def _step_logits(self, guess: list[int] | None = None) -> np.ndarray:
        """One model step: the logits after everything pending (with `guess`: before the guessed tokens, which
        ride along; `engine.logits()` then gives those after them)."""
        self._check_deadline()
        before = self._flush(guess)
        self.out.steps += 1
        return self.engine.logits() if before is None else before

    def choose(self, options: list[str], abstain: int | None = None,
               hints: list[float] | None = None) -> tuple[int, float]:
        """Let the model pick one of `options` (full texts, fed as it goes); returns (index, confidence).

        `abstain` is the index of a "no call" option: it wins only with most of the probability, as "no call" does
        where it is the model not opening a call, not merely by being the likeliest single token.

        `hints` (a score per option, e.g. the request's words in a tool's name) drafts the model's answer where
        options share their first tokens ('get' of get_weather and get_time): the hinted branch is evaluated in
        the same batch as the step that chooses it, so a right guess saves the next step and a wrong one costs
        a few tokens of batch. The model still chooses every token; the hint never does."""
        # text all options share is forced first, so the model chooses between the parts that differ, each
        # tokenized on its own: '"kitchen"' and '"living_room"' would otherwise start with different tokens ('"k'
        # and '"'), and a merged token like '"k' would compete unfairly with the bare '"'
        # (cut after a quote, space or newline: never inside a word, where '"o' + 'n' would be unnatural, nor
        # inside a control token such as '<tool_call>')
        shared = os.path.commonprefix(options) if len(options) > 1 else ""  # noqa: RUF071 (text, not paths)
        # a space stays with the word after it (' kitchen', as tokenizers write words), so the cut is before it
        shared = shared[: max(0, shared.rfind('"') + 1, shared.rfind("\n") + 1, shared.rfind(" "))]
        if shared and all(len(text) > len(shared) for text in options):
            self._force(shared)
            options = [text[len(shared):] for text in options]
        root = _Trie()
        for index, text in enumerate(options):
            node = root
            for token in self._tok(text):
                node = node.children.setdefault(token, _Trie())
            node.option = index
        node, confidence = root, 1.0
        ready: np.ndarray | None = None  # logits at `node`, evaluated by a right guess
        while node.option is None:
            if len(node.children) == 1:
                token, node = next(iter(node.children.items()))
                self._tokenize_forced()
                self._pending.append(token)
                self.out.forced += 1
                continue
            if ready is not None:
                logits, ready, draft = ready, None, None
            else:
                draft = _draft(node, hints) if hints is not None else None
                logits = self._step_logits(draft[0] if draft is not None else None)
            ids = np.fromiter(node.children.keys(), dtype=np.int64)
            scores = logits[ids].astype(np.float64)
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            best = int(np.argmax(probs))
            if abstain is not None and probs[best] < 0.5 and len(ids) > 1 and set(
                    _options_below(node.children[int(ids[best])])) == {abstain}:
                probs[best] = -1.0
                best = int(np.argmax(probs))
            confidence *= float(probs[best])
            token = int(ids[best])
            if draft is not None:
                guessed, then = draft
                if token == guessed[0]:  # right: the branch is evaluated, and so are the logits after it
                    self.out.forced += len(guessed) - 1
                    node, ready = then, self.engine.logits()
                    continue
                self.engine.rewind(self.engine.n_past - len(guessed))
            self._accept(token)
            node = node.children[token]
        assert node.option is not None
        return node.option, confidence

    def _candidates(self, logits: np.ndarray, bias: bool) -> list[int]:
        """Best tokens first: the top-k of the logits, plus the request's own tokens with a copy bias."""
        top = np.argpartition(logits, -TOP_K)[-TOP_K:]
        scores = {int(t): float(logits[t]) for t in top}
        if bias and len(self._copy_ids):
            for t, s in zip(self._copy_ids.tolist(), logits[self._copy_ids].tolist(), strict=True):
                scores[t] = s + self.copy_bias
        return sorted(scores, key=scores.__getitem__, reverse=True)

    # -- values ----------------------------------------------------------------------------------------------------

    def _string(self) -> str:
        self._force(self.syntax.str_open)
        close = self.syntax.str_close.encode()
        out = b""
        for _ in range(self.max_string_tokens):
            logits = self._step_logits()
            chosen = None
            for token in self._candidates(logits, bias=True):
                piece = self.engine.piece(token)
                if self.engine.is_end(token) or close in piece:
                    cut = piece.split(close)[0] if close in piece else b""
                    if out or cut.strip():
                        out += cut
                        chosen = -1
                        break
                    continue  # an empty value is never the model's best guess: take the next candidate
                if b"\n" in piece or b"\\" in piece or (b'"' in piece and self.syntax.json_values) or not piece:
                    continue
                chosen = token
                out += piece
                break
            if chosen is None or chosen == -1:
                break
            self._accept(chosen)
        self._force(self.syntax.str_close)
        return out.decode("utf-8", "replace").strip()

    def _number(self, integer: bool) -> int | float | None:
        pattern = _INTEGER if integer else _NUMBER
        text = ""
        for _ in range(24):
            logits = self._step_logits()
            chosen = None
            for token in self._candidates(logits, bias=True):
                piece = self.engine.piece(token).decode("utf-8", "replace")
                candidate = (text + piece).strip() if not text else text + piece
                if piece.strip() and pattern.fullmatch(candidate):
                    chosen, text = token, candidate
                    break
                if any(ch.isdigit() for ch in text) and (not piece or not piece[0].isalnum()):
                    break  # the model ends the number here
            if chosen is None:
                break
            self._accept(chosen)
        if not any(ch.isdigit() for ch in text):
            return None
        try:
            return int(text) if integer else (int(text) if re.fullmatch(r"-?\d+", text) else float(text))
        except ValueError:
            return None

    def _json_value(self) -> Any:
        """Arrays and objects: greedy until brackets balance (rare in device tools)."""
        text = ""
        depth = 0
        for _ in range(64):
            logits = self._step_logits()
            token = self._candidates(logits, bias=True)[0]
            piece = self.engine.piece(token).decode("utf-8", "replace")
            text += piece
            depth += piece.count("[") + piece.count("{") - piece.count("]") - piece.count("}")
            self._accept(token)
            if depth <= 0 and text.strip():
                break
        try:
            return json.loads(text)
        except ValueError:
            return text

    def _value(self, schema: dict[str, Any]) -> Any:
        kind = schema.get("type")
        if "enum" in schema:
            values = list(schema["enum"])
            if self.syntax.json_values:
                texts = [json.dumps(v) for v in values]
            else:
                texts = [f"{self.syntax.str_open}{v}{self.syntax.str_close}" if isinstance(v, str) else
                         json.dumps(v) for v in values]
            index, _ = self.choose(texts)
            return values[index]
        if kind == "boolean":
            index, _ = self.choose(["true", "false"])
            return index == 0
        if kind == "integer":
            return self._number(integer=True)
        if kind == "number":
            return self._number(integer=False)
        if kind == "string" or (kind is None and "anyOf" not in schema):
            return self._string()
        return self._json_value()

    # -- calls -----------------------------------------------------------------------------------------------------

    def _arguments(self, tool: ToolSpec) -> dict[str, Any]:
        props: dict[str, Any] = tool.parameters.get("properties", {})
        required = [k for k in tool.parameters.get("required", list(props)) if k in props]
        args: dict[str, Any] = {}
        for i, key in enumerate(required):
            self._force((self.syntax.arg_sep if i else "") + self.syntax.key_open.format(key=key))
            args[key] = self._value(props[key])
        self._force(self.syntax.args_close)
        return args

    def decode(self, prompt: list[int], query: str, tools: list[ToolSpec], deadline: float) -> Decoded:
        self.deadline = deadline
        self.out = Decoded()
        query_tokens = self.engine.tokenize(query, special=False) + self.engine.tokenize(" " + query, special=False)
        self._copy_ids = np.array(sorted(set(query_tokens)), dtype=np.int64)
        self._prompt, self._pending, self._forced = prompt, [], []
        syntax = self.syntax
        by_name = {t.name: t for t in tools}
        if syntax.opener_is_choice:
            logits = self._step_logits()
            starts = sorted({self._tok(text)[0] for text in syntax.call_starts or (syntax.opener,)})
            probs = np.exp(logits - logits.max())
            p_call = float(probs[starts].sum() / probs.sum())
            if p_call < 0.5:
                self.out.none_fit, self.out.confidence = True, 1 - p_call
                return self.out
            self.out.confidence = p_call
        self._force(syntax.opener)
        no_call = none_name(syntax, list(by_name))
        names = list(by_name) + ([] if syntax.opener_is_choice else [no_call])
        compound = self.speculative and looks_compound(query)
        for n in range(self.max_calls):
            if n > 0:
                if not compound:
                    break  # one request, one call: not worth a model step to ask for more
                more, _ = self.choose([syntax.call_sep, *syntax.calls_end])
                if more != 0:
                    if compound and n == 1:
                        self._speculative_call(query, names, by_name)
                    break
            self._force(syntax.name_open)
            index, confidence = self.choose([name + syntax.name_close for name in names],
                                            abstain=names.index(no_call) if no_call in names else None,
                                            hints=[mention_score(by_name[name].name, by_name[name].description, query)
                                                   if name in by_name else 0.0 for name in names])
            name = names[index]
            if name == no_call:
                self.out.none_fit = not self.out.calls
                break
            call = ProposedCall(name, self._arguments(by_name[name]))
            if n > 0 and (call in self.out.calls or ungrounded_arguments(call, query)):
                break  # a repeat or an invented value: the model had nothing more to call
            if n == 0:
                self.out.confidence *= confidence
            self.out.calls.append(call)
        return self.out

    def _speculative_call(self, query: str, names: list[str], by_name: dict[str, ToolSpec], tries: int = 2) -> None:
        """The model would stop, but the request reads as two ("... and ..."): try the other tools, those the
        request mentions first, then as the model ranks them; keep the first call whose values all come from the
        request."""
        syntax = self.syntax
        called = {c.name for c in self.out.calls}
        options = [name for name in names
                   if name not in called and name in by_name and _numbers_possible(by_name[name], query)]
        if not options:
            return  # no other tool could be called from this request: not worth a model step
        self._pending, self._forced = [], []  # the end of the list the model chose is not written
        self._force(syntax.call_sep + syntax.name_open)
        self._flush()
        mark = self.engine.n_past
        logits = self._step_logits()
        ranked = sorted(options, key=lambda name: (not relevant(name, by_name[name].description, query),
                                                   -float(logits[self._tok(name + syntax.name_close)[0]])))
        for name in ranked[:tries]:
            self._pending, self._forced = [], []
            self.engine.rewind(mark)
            self._force(name + syntax.name_close)
            call = ProposedCall(name, self._arguments(by_name[name]))
            if not ungrounded_arguments(call, query):
                self.out.calls.append(call)
                return
