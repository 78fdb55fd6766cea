"""Prompt formats per model family: how tools are declared and what a tool call looks like.

A format gives the router three things: the prompt prefix that declares the tools (evaluated once per tool set and
reused), the text around the request, and the call syntax that the constrained decoder writes around the values
the model chooses. Three families: FunctionGemma's native declarations and `<start_function_call>`, Hermes/Qwen
`<tool_call>` JSON through the GGUF's own chat template, and a generic JSON form for models with no tool
template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from edged.llm.functiongemma import render_declaration
from edged.router import ToolSpec

NONE_TOOL = "none"


@dataclass(frozen=True)
class CallSyntax:
    """The literal text around the parts the model chooses. The decoder forces all of it."""

    opener: str  # text that starts the list of calls; the model chooses it (or not) where `opener_is_choice`
    name_open: str
    name_close: str
    key_open: str  # format string with {key}
    arg_sep: str
    str_open: str
    str_close: str
    args_close: str
    call_sep: str  # chosen by the model against `calls_end`
    calls_end: tuple[str, ...]  # ways the model may end the list of calls
    opener_is_choice: bool = False  # True: "no call" is the model not opening a call (Hermes, FunctionGemma)
    call_starts: tuple[str, ...] = ()  # first tokens that mean "a call comes" (small models skip the tags)
    json_values: bool = True  # numbers/bools/enums as JSON literals
    none_name: str = NONE_TOOL  # the pseudo-tool that says "no call" where not opening a call is no choice
    joint_forced: bool = False  # tokenize consecutive forced pieces as one text (see CallDecoder._tokenize_forced)


def none_name(syntax: CallSyntax, tool_names: list[str]) -> str:
    """The "no call" pseudo-tool's name for this tool set: never one of the real tools' names."""
    name = syntax.none_name
    while name in tool_names:
        name += "_"
    return name


@dataclass
class PromptFormat:
    family: str
    syntax: CallSyntax
    examples: bool = False  # few-shot examples help models not trained for tools

    def prefix(self, tools: list[ToolSpec]) -> str:
        """Everything before the request's own text: evaluated once per tool set and reused."""
        raise NotImplementedError

    def suffix(self) -> str:
        """Text after the request up to where the model's answer starts."""
        raise NotImplementedError


# --- generic (a model with no tool template, e.g. the Gemma 3 270M base stand-in) ---------------------------------


def _signature(tool: ToolSpec) -> str:
    props = tool.parameters.get("properties", {})
    args = []
    for key, schema in props.items():
        kind = schema.get("type", "any")
        if "enum" in schema:
            kind = "|".join(json.dumps(v) for v in schema["enum"])
        args.append(f"{key}: {kind}")
    return f"{tool.name}({', '.join(args)})"


def synthetic_example(tool: ToolSpec) -> tuple[str, dict[str, Any]]:
    """A made-up request for a tool that came without examples, so an untrained model sees the call's shape."""
    props: dict[str, Any] = tool.parameters.get("properties", {})
    args: dict[str, Any] = {}
    for key in tool.parameters.get("required", list(props)):
        schema = props.get(key, {})
        kind = schema.get("type")
        if "enum" in schema:
            args[key] = schema["enum"][0]
        elif kind == "integer":
            args[key] = 2
        elif kind == "number":
            args[key] = 2.5
        elif kind == "boolean":
            args[key] = True
        else:
            args[key] = key.replace("_", " ").title()
    words = " ".join(str(v).replace("_", " ") for v in args.values())
    return f"{tool.description.rstrip('.')}: {words}".strip(": "), args


def _json_calls(calls: list[tuple[str, dict[str, Any]]]) -> str:
    return json.dumps([{"name": n, "arguments": a} for n, a in calls])


def _keyed_calls(calls: list[tuple[str, dict[str, Any]]]) -> str:
    """`[{"get_weather": {"city": "Oslo"}}]`: the calls as the keyed syntax writes them."""
    return json.dumps([{n: a} for n, a in calls])


# Keyed by the tool's name, a one-argument call costs 5 forced tokens where `{"name": ..., "arguments": ...}` costs
# 13, and on a small CPU each forced token is ~5 ms of batch evaluation. Measured on the Gemma 3 270M base stand-in
# (router only), against the named form: IoT eval exact 37.1 % vs 25.7 %, names 61.9 % vs 46.7 %, no-tool 12/15 vs
# 10/15; the seed's requests 4/4. A Python-call form (`get_weather(city="Oslo")`, 4 tokens) lost half the tool
# choices once 10+ tools were offered. "No call" is `nothing`: after "Calls:", the English prior of "none" drew the
# model to it for plain requests; it must also win with most of the probability (CallDecoder.choose's abstain).
KEYED_SYNTAX = CallSyntax(
    opener=' [{"', name_open="", name_close='": {', key_open='"{key}": ', arg_sep=", ", str_open='"', str_close='"',
    args_close="}}", call_sep=', {"', calls_end=("]",), none_name="nothing", joint_forced=True,
)
JSON_SYNTAX = CallSyntax(
    opener="[", name_open='{"name": "', name_close='", "arguments": {', key_open='"{key}": ', arg_sep=", ",
    str_open='"', str_close='"', args_close="}}", call_sep=", ", calls_end=("]",),
)


@dataclass
class GenericFormat(PromptFormat):
    """For a model with no tool template (e.g. the Gemma 3 270M base stand-in): signatures, few-shot examples, and
    calls as a JSON list keyed by tool name (`keyed`, the default) or of `{"name", "arguments"}` objects."""

    family: str = "generic"
    syntax: CallSyntax = KEYED_SYNTAX
    examples: bool = True
    keyed: bool = True
    turn_open: str = ""
    turn_close: str = ""

    def __post_init__(self) -> None:
        self.syntax = KEYED_SYNTAX if self.keyed else JSON_SYNTAX

    def prefix(self, tools: list[ToolSpec]) -> str:
        render = _keyed_calls if self.keyed else _json_calls
        none = none_name(self.syntax, [t.name for t in tools])
        lines = ["Functions:"]
        lines += [f"- {_signature(t)}: {t.description}" for t in tools]
        lines.append(f"- {none}(): when no function fits the request")
        lines.append("")
        lines.append("Map each request to a JSON list of function calls. Copy values from the request.")
        lines.append("")
        shots = [(q, [(t.name, a)]) for t in tools for q, a in (t.examples[:1] or (synthetic_example(t),))][:8]
        if len(shots) >= 2:
            (q1, c1), (q2, c2) = shots[0], shots[1]
            shots.append((f"{q1.rstrip('?.!')} and {q2[0].lower()}{q2[1:]}", c1 + c2))
        shots.append(("Tell me a story about a dragon.", [(none, {})]))
        for query, calls in shots:
            lines.append(f"{self.turn_open}Request: {query}\nCalls: {render(calls)}{self.turn_close}")
            lines.append("")
        return "\n".join(lines) + f"{self.turn_open}Request: "

    def suffix(self) -> str:
        # keyed: the opener carries the space (' [{"' is how the examples' tokens run)
        return "\nCalls:" if self.keyed else "\nCalls: "


# --- Hermes / Qwen (<tool_call> JSON in the GGUF's chat template) -------------------------------------------------

QUERY_MARK = "\x00QUERY\x00"


def render_template(template: str, tools: list[ToolSpec], bos: str = "", eos: str = "",
                    enable_thinking: bool = False) -> tuple[str, str]:
    """Render the GGUF's Jinja chat template with the tools and a marked user turn; split at the mark."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    openai_tools = [
        {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
        for t in tools
    ]
    text = env.from_string(template).render(
        messages=[{"role": "user", "content": QUERY_MARK}], tools=openai_tools, add_generation_prompt=True,
        bos_token=bos, eos_token=eos, enable_thinking=enable_thinking,
    )
    before, _, after = text.partition(QUERY_MARK)
    return before, after


@dataclass
class HermesFormat(PromptFormat):
    family: str = "qwen"
    template: str = ""
    end_token: str = "<|im_end|>"
    syntax: CallSyntax = field(default_factory=lambda: CallSyntax(
        opener="<tool_call>\n", name_open='{"name": "', name_close='", "arguments": {', key_open='"{key}": ',
        arg_sep=", ", str_open='"', str_close='"', args_close="}}\n</tool_call>", call_sep="\n<tool_call>\n",
        calls_end=("<|im_end|>", "\n<|im_end|>", "\n<|endoftext|>"), opener_is_choice=True,
        call_starts=("<tool_call>", '{"', "{", "{\n", "```", "``"),
    ))
    _suffix: str = ""

    def prefix(self, tools: list[ToolSpec]) -> str:
        before, after = render_template(self.template, tools)
        self._suffix = after
        return before

    def suffix(self) -> str:
        return self._suffix


# --- FunctionGemma (native declarations, <start_function_call>) ---------------------------------------------------


@dataclass
class FunctionGemmaFormat(PromptFormat):
    family: str = "functiongemma"
    syntax: CallSyntax = field(default_factory=lambda: CallSyntax(
        opener="<start_function_call>", name_open="call:", name_close="{", key_open="{key}:", arg_sep=",",
        str_open="<escape>", str_close="<escape>", args_close="}<end_function_call>",
        call_sep="<start_function_call>", calls_end=("<end_of_turn>", "<start_function_response>"),
        opener_is_choice=True,
        call_starts=("<start_function_call>",), json_values=False,
    ))

    def prefix(self, tools: list[ToolSpec]) -> str:
        decls = "".join(render_declaration(t) for t in tools)
        return (
            "<bos><start_of_turn>developer\nYou are a model that can do function calling with the following "
            f"functions{decls}<end_of_turn>\n<start_of_turn>user\n"
        )

    def suffix(self) -> str:
        return "<end_of_turn>\n<start_of_turn>model\n"


def choose_format(family: str | None, metadata: dict[str, str], name: str = "") -> PromptFormat:
    """Pick the format from an explicit family, else from the GGUF's metadata and chat template."""
    template = metadata.get("tokenizer.chat_template", "")
    if family is None:
        if "start_function_call" in template or "functiongemma" in name.lower():
            family = "functiongemma"
        elif "<tool_call>" in template:
            family = "qwen"
        elif metadata.get("general.architecture", "").startswith("gemma"):
            family = "gemma3"
        else:
            family = "generic"
    if family == "functiongemma":
        return FunctionGemmaFormat()
    if family == "qwen":
        if "<tool_call>" not in template:
            raise ValueError("family 'qwen' needs a GGUF chat template with <tool_call> support")
        return HermesFormat(template=template)
    if family == "gemma3":
        return GenericFormat(family="gemma3")
    return GenericFormat()
