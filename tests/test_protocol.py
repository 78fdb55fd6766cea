"""decode_command: every class of bad input gets its specific code, and nothing but DecodeError ever escapes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edged.protocol import MAX_JSON_DEPTH, Command, DecodeError, ErrorCode, Result, decode_command

LIMIT = 65536


def _err(payload: bytes, limit: int = LIMIT) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_command(payload, limit)
    return info.value


def _j(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_valid_query_and_call() -> None:
    c = decode_command(b'{"id": "r1", "query": "What is the weather in Tokyo?"}', LIMIT)
    assert c.id == "r1" and c.query == "What is the weather in Tokyo?" and c.call is None
    c = decode_command(_j({"id": "r2", "call": {"name": "add_numbers", "arguments": {"a": 25, "b": 17}},
                           "reply_to": "demo/replies", "deadline_ms": 500, "tier": 2}), LIMIT)
    assert c.call is not None and c.call.name == "add_numbers" and c.call.arguments == {"a": 25, "b": 17}
    assert (c.reply_to, c.deadline_ms, c.tier) == ("demo/replies", 500, 2)


def test_oversized() -> None:
    payload = _j({"id": "big", "query": "x" * 2000})
    err = _err(payload, limit=1024)
    assert err.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert str(len(payload)) in err.message
    decode_command(payload, len(payload))  # exactly at the limit is fine


@pytest.mark.parametrize("payload", [b"\xff\xfe{}", b'{"id": "a", "query": "caf\xe9"}', b"\xc3"])
def test_not_utf8(payload: bytes) -> None:
    assert _err(payload).code is ErrorCode.BAD_ENCODING


def test_lone_surrogate_escape_is_bad_encoding_and_keeps_a_clean_id() -> None:
    err = _err(b'{"id": "s1", "reply_to": "r/t", "call": {"name": "add_numbers", "arguments": {"a": "\\ud800"}}}')
    assert err.code is ErrorCode.BAD_ENCODING
    assert (err.command_id, err.reply_to) == ("s1", "r/t")
    err = _err(b'{"id": "\\udc00", "query": "q"}')
    assert err.command_id is None
    err.to_result().to_json()  # must be publishable
    # a valid surrogate pair is just an emoji
    assert decode_command(b'{"id": "e", "query": "\\ud83d\\ude00"}', LIMIT).query == "\U0001f600"


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b'{"id": "a"', b"{'id': 'a'}", b'{"id": "a", "query": "q"} trailing',
     b'{"id": "a", "call": {"name": "add_numbers", "arguments": {"a": NaN, "b": 1}}}',
     b'{"id": "a", "call": {"name": "add_numbers", "arguments": {"a": Infinity, "b": 1}}}',
     b'{"id": "a", "call": {"name": "add_numbers", "arguments": {"a": 1e400, "b": 1}}}',
     b'{"id": "a", "query": "q", "deadline_ms": ' + b"9" * 5000 + b"}",
     b"[" * 100000 + b"]" * 100000],
    ids=["empty", "text", "truncated", "single-quotes", "trailing", "nan", "infinity", "float-overflow",
         "huge-int", "deep-recursion"],
)
def test_not_json(payload: bytes) -> None:
    assert _err(payload, limit=1 << 20).code is ErrorCode.BAD_JSON


@pytest.mark.parametrize("payload", [b"[]", b'"r1"', b"42", b"null", b"true", b'[{"id": "r1", "query": "q"}]'])
def test_not_an_object(payload: bytes) -> None:
    err = _err(payload)
    assert err.code is ErrorCode.BAD_COMMAND
    assert "JSON object" in err.message


@pytest.mark.parametrize(
    ("obj", "loc"),
    [
        ({"query": "q"}, "id"),
        ({"id": "", "query": "q"}, "id"),
        ({"id": "x" * 200, "query": "q"}, "id"),
        ({"id": 5, "query": "q"}, "id"),
        ({"id": "a"}, "(command)"),
        ({"id": "a", "query": "q", "call": {"name": "add_numbers"}}, "(command)"),
        ({"id": "a", "query": 7}, "query"),
        ({"id": "a", "query": ""}, "query"),
        ({"id": "a", "call": "add_numbers"}, "call"),
        ({"id": "a", "call": {"arguments": {}}}, "call.name"),
        ({"id": "a", "call": {"name": "add_numbers", "arguments": [1, 2]}}, "call.arguments"),
        ({"id": "a", "call": {"name": "add_numbers", "args": {}}}, "call.args"),
        ({"id": "a", "query": "q", "deadline_ms": "soon"}, "deadline_ms"),
        ({"id": "a", "query": "q", "deadline_ms": 0}, "deadline_ms"),
        ({"id": "a", "query": "q", "tier": 7}, "tier"),
        ({"id": "a", "query": "q", "tools": {"name": "x"}}, "tools"),
        ({"id": "a", "query": "q", "reply_to": "a/+/b"}, "reply_to"),
        ({"id": "a", "query": "q", "priority": 1}, "priority"),
    ],
    ids=["missing-id", "empty-id", "long-id", "int-id", "neither", "both", "int-query", "empty-query",
         "str-call", "call-no-name", "list-arguments", "call-unknown-field", "str-deadline", "zero-deadline",
         "bad-tier", "tools-not-list", "wildcard-reply", "unknown-field"],
)
def test_bad_command(obj: dict[str, Any], loc: str) -> None:
    err = _err(_j(obj))
    assert err.code is ErrorCode.BAD_COMMAND
    assert any(p["loc"] == loc for p in err.details), err.details
    assert loc in err.message


def test_bad_command_salvages_id_and_reply_address() -> None:
    err = _err(_j({"id": "r9", "reply_to": "my/replies", "query": "q", "call": {"name": "x"}}))
    assert (err.command_id, err.reply_to) == ("r9", "my/replies")
    result = err.to_result()
    assert result.id == "r9" and result.status == "error" and result.error is not None
    assert result.error.code is ErrorCode.BAD_COMMAND
    err = _err(_j({"id": 9, "reply_to": "a/#", "query": "q"}))
    assert (err.command_id, err.reply_to) == (None, None)


def test_deep_nesting() -> None:
    nested: Any = 1
    for _ in range(MAX_JSON_DEPTH + 5):
        nested = {"k": nested}
    err = _err(_j({"id": "deep", "call": {"name": "add_numbers", "arguments": nested}}))
    assert err.code is ErrorCode.BAD_COMMAND and "nesting" in err.message
    assert err.command_id == "deep"
    shallow: Any = 1
    for _ in range(MAX_JSON_DEPTH - 4):
        shallow = [shallow]
    decode_command(_j({"id": "ok", "call": {"name": "add_numbers", "arguments": {"a": shallow}}}), LIMIT)


# -- properties --------------------------------------------------------------------------------------------------

def _check_outcome(payload: bytes) -> None:
    """decode_command returns a Command or raises DecodeError, and either outcome can be published."""
    try:
        command = decode_command(payload, 4096)
    except DecodeError as err:
        assert isinstance(err.code, ErrorCode)
        json.loads(err.to_result().to_json())
        return
    assert isinstance(command, Command)
    json.loads(Result(id=command.id, status="ok").to_json())
    json.loads(command.model_dump_json())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=5000))
def test_arbitrary_bytes_only_raise_decode_error(payload: bytes) -> None:
    _check_outcome(payload)


# st.text() never yields lone surrogates, but JSON "\\ud800" escapes do: build strings that may hold them
_chars = st.characters(codec=None) | st.characters(categories=["Cs"])
_text = st.lists(_chars, max_size=20).map("".join)
_scalars = st.none() | st.booleans() | st.integers() | st.floats() | _text
_json = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=30,
)
_keys = st.sampled_from(["id", "query", "call", "tools", "reply_to", "deadline_ms", "tier", "name", "arguments"])
_commandish = st.dictionaries(
    _keys | _text,
    _json | st.fixed_dictionaries({"name": _json | _text, "arguments": _json}),
    max_size=6,
)
# close to valid commands, so that arbitrary values reach the model validation and the result
_near_valid = st.fixed_dictionaries(
    {"id": _text | _json},
    optional={
        "query": _text | _json,
        "call": st.fixed_dictionaries({"name": _text, "arguments": st.dictionaries(_text, _json, max_size=4)}),
        "reply_to": _text | _json,
        "deadline_ms": st.integers() | _json,
        "tier": st.integers(0, 4) | _json,
        "tools": st.lists(st.dictionaries(_text, _json, max_size=3), max_size=3) | _json,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_json | _commandish | _near_valid)
def test_arbitrary_json_only_raises_decode_error(obj: Any) -> None:
    try:
        payload = json.dumps(obj, ensure_ascii=True).encode()  # \u escapes: lone surrogates survive to the decoder
    except ValueError:
        return
    _check_outcome(payload)
    try:
        raw = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    except ValueError:
        return
    _check_outcome(raw)  # lone surrogates as raw bytes are not UTF-8
