"""The engine's own generation loop and its reuse of evaluated logits, on the real Gemma 3 270M file."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import GEMMA

from edged.llm.engine import DeadlineExceeded, Engine

pytestmark = pytest.mark.model
PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    if not GEMMA.exists():
        pytest.skip(f"{GEMMA} missing: run scripts/setup (edged models fetch)")
    e = Engine(GEMMA, n_ctx=1024, n_threads=2)
    yield e
    e.close()


def _greedy(engine: Engine, tokens: list[int], n: int) -> list[int]:
    """Reference: argmax decoding, one `feed` per token."""
    engine.rewind(0)
    engine.sync(tokens)
    out = []
    for _ in range(n):
        token = int(np.argmax(engine.logits()))
        out.append(token)
        engine.feed([token])
    return out


def test_greedy_generation_matches_argmax_decoding_and_reuses_the_prompt(engine: Engine) -> None:
    tokens = engine.tokenize(PROMPT, bos=True)
    expected = _greedy(engine, tokens, 8)
    engine.rewind(0)
    engine.sync(tokens)  # as the thinker's decoder leaves it: the prompt evaluated, its logits in place
    decodes = engine._decodes
    text, used, cut = engine.generate(tokens, 8, temperature=0.0, top_p=1.0, top_k=0)
    assert cut and used == 8
    assert text == b"".join(engine.piece(t) for t in expected).decode("utf-8", "replace")
    # one model step per generated token but the last: the prompt's last token was not evaluated again
    assert engine._decodes - decodes == 7


def test_bias_stop_and_deadline(engine: Engine) -> None:
    tokens = engine.tokenize(PROMPT, bos=True)
    first = _greedy(engine, tokens, 1)[0]
    text, _, _ = engine.generate(tokens, 3, temperature=0.0, top_p=1.0, top_k=0, bias={first: -1e9})
    assert not text.startswith(engine.piece(first).decode("utf-8", "replace"))
    full, _, _ = engine.generate(tokens, 8, temperature=0.0, top_p=1.0, top_k=0)
    word = full.strip().split()[0]
    cut, used, budget_cut = engine.generate(tokens, 8, temperature=0.0, top_p=1.0, top_k=0, stop=(word,))
    assert word not in cut and not budget_cut and used >= 1
    with pytest.raises(DeadlineExceeded):
        engine.generate(tokens, 8, temperature=0.7, top_p=0.9, top_k=20, deadline=time.monotonic() - 1)


def test_restored_prefix_is_evaluated_again_before_its_logits_are_used(engine: Engine) -> None:
    """Two prompts of one length: after restoring the first, the logits held are still the second's, so `sync`
    must evaluate again rather than take the held tokens as ready."""
    a = engine.tokenize("Turn on the kitchen lights now", bos=True)
    b = engine.tokenize("What is the weather in Oslo?", bos=True)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    engine.rewind(0)
    engine.sync(a)
    want = engine.logits().copy()
    saved = engine.snapshot()
    engine.rewind(0)
    engine.sync(b)
    assert engine.restore(*saved)
    decodes = engine._decodes
    engine.sync(a)
    assert engine._decodes == decodes + 1
    assert np.allclose(engine.logits(), want, atol=1e-2)
    engine.sync(a)  # now held and fresh: nothing to evaluate
    assert engine._decodes == decodes + 1
