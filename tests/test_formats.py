"""Prompt formats: FunctionGemma's declarations and calls, the generic JSON form, and format selection."""

from __future__ import annotations

import pytest

from edged.llm.formats import FunctionGemmaFormat, GenericFormat, choose_format, synthetic_example
from edged.llm.functiongemma import parse_calls, render_call, render_declaration
from edged.router import ProposedCall, ToolSpec

WEATHER = ToolSpec("get_weather", "Get the current weather for a city", {
    "type": "object", "properties": {"city": {"type": "string", "description": "City name"}}, "required": ["city"],
})


def test_functiongemma_declaration_is_rendered_as_the_model_card_shows() -> None:
    assert render_declaration(WEATHER) == (
        "<start_function_declaration>declaration:get_weather{description:<escape>Get the current weather for a "
        "city<escape>,parameters:{type:<escape>OBJECT<escape>,properties:{city:{type:<escape>STRING<escape>,"
        "description:<escape>City name<escape>}},required:[<escape>city<escape>]}}<end_function_declaration>"
    )


def test_functiongemma_nested_types_are_upper_case() -> None:
    tool = ToolSpec("t", "d", {"type": "object", "properties": {
        "n": {"type": "integer"}, "opts": {"type": "object", "properties": {"on": {"type": "boolean"}}},
        "tags": {"type": "array", "items": {"type": "string"}},
    }})
    text = render_declaration(tool)
    for kind in ("OBJECT", "INTEGER", "BOOLEAN", "ARRAY", "STRING"):
        assert f"type:<escape>{kind}<escape>" in text


def test_functiongemma_call_rendering() -> None:
    assert render_call("get_weather", {"city": "Tokyo", "days": 3, "metric": True}) == (
        "<start_function_call>call:get_weather{city:<escape>Tokyo<escape>,days:3,metric:true}<end_function_call>"
    )


def test_functiongemma_parses_escaped_strings_numbers_booleans_nested_and_two_calls() -> None:
    text = (
        "<start_function_call>call:set_scene{name:<escape>Movie, night: {dim}<escape>,level:-2.5,on:false,"
        "target:{room:<escape>living room<escape>,ids:[1,2,3]},note:null}<end_function_call>"
        "<start_function_call>call:get_weather{city:<escape>Tokyo<escape>}<end_function_call>"
    )
    assert parse_calls(text) == [
        ProposedCall("set_scene", {"name": "Movie, night: {dim}", "level": -2.5, "on": False,
                                   "target": {"room": "living room", "ids": [1, 2, 3]}, "note": None}),
        ProposedCall("get_weather", {"city": "Tokyo"}),
    ]


def test_functiongemma_render_parse_round_trip() -> None:
    args = {"a": 25, "b": 17.5, "label": "x}y,z:<w>", "flags": [True, False], "deep": {"k": {"v": "1"}}}
    assert parse_calls(render_call("f", args)) == [ProposedCall("f", args)]


@pytest.mark.parametrize("bad", [
    "<start_function_call>call:f{a:<escape>open}<end_function_call>",
    "<start_function_call>call:f{a:1<end_function_call>",
    "<start_function_call>f{a:1}<end_function_call>",
    "<start_function_call>call:f{a:1}",
])
def test_functiongemma_malformed_calls_are_errors(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_calls(bad)


def test_functiongemma_prompt_has_developer_turn_and_declarations() -> None:
    fmt = FunctionGemmaFormat()
    prefix = fmt.prefix([WEATHER])
    assert prefix.startswith("<bos><start_of_turn>developer\nYou are a model that can do function calling")
    assert render_declaration(WEATHER) in prefix
    assert prefix.endswith("<start_of_turn>user\n")
    assert fmt.suffix() == "<end_of_turn>\n<start_of_turn>model\n"
    assert fmt.syntax.str_open == "<escape>" and not fmt.syntax.json_values


def test_generic_prompt_lists_tools_none_and_examples() -> None:
    tool = ToolSpec("set_light", "Switch a light", {"type": "object", "properties": {
        "room": {"type": "string", "enum": ["kitchen", "hall"]}, "level": {"type": "integer"}}})
    fmt = GenericFormat()
    prefix = fmt.prefix([WEATHER, tool])
    assert 'set_light(room: "kitchen"|"hall", level: integer)' in prefix
    assert "- nothing(): when no function fits the request" in prefix
    assert 'Calls: [{"set_light": {"room": "kitchen", "level": 2}}]\n' in prefix
    assert 'Calls: [{"get_weather": {"city": "City"}}, {"set_light": {"room": "kitchen", "level": 2}}]\n' in prefix
    assert 'Calls: [{"nothing": {}}]\n' in prefix
    assert prefix.endswith("Request: ") and fmt.suffix() == "\nCalls:"
    # the text the decoder forces around the chosen parts is the examples' text
    syntax = fmt.syntax
    call = (syntax.opener + syntax.name_open + "set_light" + syntax.name_close
            + syntax.key_open.format(key="room") + '"kitchen"' + syntax.arg_sep + syntax.key_open.format(key="level")
            + "2" + syntax.args_close + syntax.calls_end[0])
    assert "Calls:" + call + "\n" in prefix
    assert '"nothing_": {}' in fmt.prefix([ToolSpec("nothing", "Do nothing", {})])  # never a real tool's name


def test_generic_named_json_form_for_the_naive_path() -> None:
    fmt = GenericFormat(keyed=False)
    prefix = fmt.prefix([WEATHER])
    assert '[{"name": "get_weather", "arguments": {"city": "City"}}]' in prefix and fmt.syntax.opener == "["


def test_synthetic_example_fills_every_required_argument() -> None:
    query, args = synthetic_example(WEATHER)
    assert args == {"city": "City"} and "City" in query


def test_format_is_chosen_from_metadata() -> None:
    assert choose_format(None, {"tokenizer.chat_template": "... <tool_call> ..."}).family == "qwen"
    assert choose_format(None, {"tokenizer.chat_template": "<start_function_call>"}).family == "functiongemma"
    assert choose_format(None, {"general.architecture": "gemma3"}).family == "gemma3"
    assert choose_format(None, {"general.architecture": "llama"}).family == "generic"
    with pytest.raises(ValueError):
        choose_format("qwen", {"tokenizer.chat_template": "no tools here"})
