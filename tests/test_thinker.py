"""Tier 2 on the real Qwen2.5 stand-in GGUF, and the escalation from tier 1 (Gemma) to tier 2."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import GEMMA, MODELS_DIR, QWEN

from edged.config import Config
from edged.escalation import EscalationPolicy
from edged.llm.thinker import _THINK, qwen_sampling
from edged.models_runtime import LoadedModels, load_models
from edged.pipeline import Pipeline
from edged.protocol import Command
from edged.telemetry import Metrics
from edged.tools.builtin import builtin_tools
from edged.tools.registry import ToolRegistry


def test_think_blocks_are_removed_from_answers() -> None:
    assert _THINK.sub("", "<think>\nlet me see\n</think>\n\nIt is 42.").strip() == "It is 42."
    assert _THINK.sub("", "<think>never closed").strip() == ""


def test_qwen3_recommended_sampling() -> None:
    assert qwen_sampling(True, None) == qwen_sampling(True, None).__class__(0.6, 0.95, 20)
    assert qwen_sampling(False, None).temperature == 0.7 and qwen_sampling(False, None).top_p == 0.8
    assert qwen_sampling(False, 0.0).temperature == 0.0


@pytest.fixture(scope="module")
def models() -> Iterator[LoadedModels]:
    if not (QWEN.exists() and GEMMA.exists()):
        pytest.skip("model files missing: run scripts/setup")
    config = Config.model_validate({
        "models": {"dir": str(MODELS_DIR), "router": "gemma3-270m-q4km", "thinker": "qwen2.5-coder-0.5b",
                   "n_threads": 2},
        "thinker": {"temperature": 0, "seed": 1},
    })
    loaded = load_models(config)
    assert loaded.info["router"]["state"] == "loaded" and loaded.info["thinker"]["state"] == "loaded"
    yield loaded
    loaded.close()


def _pipeline(models: LoadedModels, metrics: Metrics | None = None, router: bool = True) -> Pipeline:
    registry = ToolRegistry()
    registry.register_all(builtin_tools())
    return Pipeline(registry, "dev", 120_000, router=models.router if router else None, thinker=models.thinker,
                    policy=EscalationPolicy(), metrics=metrics)


@pytest.mark.model
def test_two_step_request_uses_the_first_result_in_the_second_call(models: LoadedModels) -> None:
    pipeline = _pipeline(models, router=False)
    query = "Look up Alice in my contacts, then tell me the weather in her city."
    result = pipeline.handle(Command(id="t2", query=query), time.monotonic())
    assert result.status == "ok" and result.tier == 2
    assert [(c.name, c.arguments) for c in result.calls] == [
        ("search_contacts", {"name": "Alice"}), ("get_weather", {"city": "Tokyo"})]  # Tokyo came from step 1
    assert result.calls[1].result["city"] == "Tokyo"
    assert result.answer and "Tokyo" in result.answer and "{" not in result.answer
    assert result.usage["steps"] >= 2


@pytest.mark.model
def test_a_chained_request_leaves_tier_1_for_the_thinker(models: LoadedModels) -> None:
    """With the router in front: tier 1 writes every call at once from the request's words, so "her city" would
    become get_weather(city="Alice") (the Gemma stand-in does exactly that); the policy hands it over."""
    query = "Look up Alice in my contacts, then tell me the weather in her city."
    result = _pipeline(models).handle(Command(id="t3", query=query), time.monotonic())
    assert result.escalations[0] == {"from": 1, "reason": "depends_on_earlier_result"}
    assert result.status == "ok" and result.tier == 2
    assert [(c.name, c.arguments) for c in result.calls] == [
        ("search_contacts", {"name": "Alice"}), ("get_weather", {"city": "Tokyo"})]


@pytest.mark.model
def test_a_warmed_thinker_evaluates_only_the_request_s_own_turn(models: LoadedModels) -> None:
    thinker: Any = models.thinker
    engine = thinker.engine
    tools = _pipeline(models).tool_specs()
    engine.rewind(0)  # as after start-up: nothing of the conversation evaluated yet
    before = engine.prompt_tokens
    thinker.warm(tools)
    opening = engine.prompt_tokens - before
    before = engine.prompt_tokens
    result = _pipeline(models, router=False).handle(Command(id="w", query="Write a haiku about the sea"),
                                                    time.monotonic())
    assert result.status == "ok" and result.tier == 2
    assert opening > 200  # system prompt and tool declarations
    assert engine.prompt_tokens - before < 40  # the request's turn, not the opening again


@pytest.mark.model
def test_the_warm_up_gives_way_to_a_request_in_progress(models: LoadedModels) -> None:
    """The daemon warms the thinker while tier 1 serves: each step of the warm-up waits while the router's engine
    is busy, and the steps evaluate the opening once, with nothing evaluated twice."""
    thinker: Any = models.thinker
    router_lock = models.router.engine.lock  # type: ignore[union-attr]
    engine = thinker.engine
    tools = _pipeline(models).tool_specs()
    engine.rewind(0)
    before, steps = engine.prompt_tokens, []

    def give_way() -> None:
        steps.append(engine.llm.n_tokens)
        with router_lock:
            pass

    with router_lock:  # a route in progress
        warming = threading.Thread(target=thinker.warm, args=(tools,), kwargs={"step": 32, "give_way": give_way})
        warming.start()
        time.sleep(0.5)
        assert engine.llm.n_tokens == 0 and steps == [0]  # waiting for the route, nothing evaluated
    warming.join(60)
    opening = engine.llm.n_tokens
    assert opening > 200 and engine.prompt_tokens - before == opening  # each token evaluated once
    assert steps == list(range(0, opening, 32))  # one step of 32 tokens after each give-way


def test_which_requests_depend_on_an_earlier_result() -> None:
    from edged.llm.grounding import looks_dependent

    assert looks_dependent("Look up Alice in my contacts, then tell me the weather in her city.")
    assert looks_dependent("Find Bob and then tell me the weather there")
    assert not looks_dependent("Weather in Oslo, then look up Emma")
    assert not looks_dependent("Weather in London and find Bob's contact")
    assert not looks_dependent("What is the weather in Tokyo?")


@pytest.mark.model
def test_chat_request_is_answered_in_words_without_calls(models: LoadedModels) -> None:
    result = _pipeline(models, router=False).handle(Command(id="c", query="Write a haiku about the sea"),
                                                      time.monotonic())
    assert result.status == "ok" and result.tier == 2 and not result.calls
    assert result.answer and len(result.answer.split()) >= 3


@pytest.mark.model
def test_tier1_hands_over_to_tier2_and_says_why(models: LoadedModels) -> None:
    metrics = Metrics()
    pipeline = _pipeline(models, metrics)
    chat = pipeline.handle(Command(id="e", query="Write a haiku about the sea"), time.monotonic())
    # the stand-in router either finds no tool or proposes one with a value the request never gave (the city
    # of a tool's example): both hand over before anything runs, and say so
    assert chat.tier == 2 and len(chat.escalations) == 1 and chat.escalations[0]["from"] == 1
    reason = chat.escalations[0]["reason"]
    assert reason in {"no_tool_fits", "ungrounded_argument"} and not chat.calls
    simple = pipeline.handle(Command(id="s", query="What is the weather in Tokyo?"), time.monotonic())
    assert simple.tier == 1 and simple.escalations == [] and simple.calls[0].arguments == {"city": "Tokyo"}
    for r in (chat, simple):
        metrics.record(r.status, r.tier, r.timings_ms["total"])
    snap = metrics.snapshot()
    assert snap["tiers"] == {"1": 1, "2": 1} and snap["escalations"] == {f"1:{reason}": 1}


@pytest.mark.model
def test_budget_exhaustion_gives_up_instead_of_hanging(models: LoadedModels) -> None:
    thinker = models.thinker
    assert thinker is not None
    saved = thinker.max_tokens  # type: ignore[attr-defined]
    thinker.max_tokens = 2  # type: ignore[attr-defined]
    try:
        result = _pipeline(models, router=False).handle(Command(id="b", query="Write a long story"),
                                                          time.monotonic())
    finally:
        thinker.max_tokens = saved  # type: ignore[attr-defined]
    assert {"from": 2, "reason": "budget"} in result.escalations
