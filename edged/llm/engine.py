"""One loaded GGUF: the llama.cpp context, a lock, token-level primitives and accounting.

The router drives decoding token by token (it decides what the model may say), so the engine exposes the few
primitives it needs: make the context hold a given token prefix (reusing what is already evaluated), feed forced
tokens as one batch, and read the last row of logits without copying it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from edged.llm.compute import COMPUTE


def default_threads() -> int:
    """Physical cores where psutil can tell (hyper-threads slow llama.cpp down), else logical ones."""
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except Exception:
        return max(1, os.cpu_count() or 1)


def build_warning() -> str | None:
    """Why this llama.cpp build may crash here, if we know of a reason: the daemon says so in its log before the
    first model step, so a restart loop under systemd has a cause next to it."""
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    if "AMX_INT8 = 1" in info:
        return ("llama.cpp was built with AMX kernels, which crash in the first matrix product on some CPUs "
                "(ggml-org/llama.cpp#20824); rebuild llama-cpp-python with scripts/setup (it compiles them out)")
    return None


class Engine:
    def __init__(self, path: Path, *, n_ctx: int = 4096, n_threads: int = 0, n_gpu_layers: int = 0,
                 n_batch: int = 64, kv_cache_type: str = "q8_0", use_mmap: bool = False) -> None:
        threads = n_threads or default_threads()
        # flash attention either way: a quantized V cache needs it, and with f16 it is as fast or faster on CPU
        kv_type = llama_cpp.GGML_TYPE_Q8_0 if kv_cache_type == "q8_0" else llama_cpp.GGML_TYPE_F16
        kv: dict[str, Any] = {"flash_attn": True, "type_k": kv_type, "type_v": kv_type}
        t0 = time.monotonic()
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            # swa_full: Gemma 3's sliding-window layers keep every position, so a cached prefix stays reusable
            self.llm = COMPUTE.run(lambda: llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                n_batch=n_batch, n_ubatch=n_batch, n_gpu_layers=n_gpu_layers, logits_all=False,
                verbose=False, swa_full=True, use_mmap=use_mmap, **kv,
            ))
        self.load_s = time.monotonic() - t0
        # every model step of this engine, ours and llama-cpp-python's own (create_completion), on the one
        # compute thread: one OpenMP team per process (see edged/llm/compute.py)
        step = self.llm._ctx.decode
        self.llm._ctx.decode = lambda batch: COMPUTE.run(self._counted, step, batch)  # type: ignore[method-assign]
        self._decodes = 0  # llama_decode calls so far: logits read later belong to the last one
        self._fresh: tuple[int, int] | None = None  # (decodes, n_tokens) when the logits are the last token's
        self.path = path
        self.lock = threading.Lock()
        self.n_vocab = self.llm.n_vocab()
        self.n_ctx = n_ctx
        self.metadata: dict[str, str] = dict(self.llm.metadata)
        self._pieces: dict[int, bytes] = {}
        self._piece_tokens: dict[str, tuple[int, ...]] = {}
        self._vocab = self.llm._model.vocab
        self.eos_ids = {t for t in (self.llm.token_eos(),) if t >= 0}
        self._sampler_cache: dict[tuple[Any, ...], Any] = {}
        # accounting, read by telemetry
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.prompt_s = 0.0
        self.decode_s = 0.0
        self.requests = 0

    def _counted(self, step: Any, batch: Any) -> None:
        self._decodes += 1
        step(batch)

    def _mark_fresh(self) -> None:
        self._fresh = (self._decodes, int(self.llm.n_tokens))

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def tokenize(self, text: str, *, bos: bool = False, special: bool = True) -> list[int]:
        """Text to tokens; `special=False` for text from outside, so it cannot smuggle in control tokens."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=bos, special=special))

    def tokenize_piece(self, text: str) -> tuple[int, ...]:
        """Syntax pieces and tool names, tokenized once per engine rather than once per request: with 50 tools the
        router's name trie took ~250 tokenizer calls (~6 ms) per request. Bounded: cleared past 8192 texts."""
        cached = self._piece_tokens.get(text)
        if cached is None:
            if len(self._piece_tokens) >= 8192:
                self._piece_tokens.clear()
            cached = self._piece_tokens[text] = tuple(self.tokenize(text))
        return cached

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens by their text), cached: the vocabulary never changes."""
        cached = self._pieces.get(token)
        if cached is None:
            cached = self.llm._model.detokenize([token], special=True)
            self._pieces[token] = cached
        return cached

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token)) or token in self.eos_ids

    @property
    def n_past(self) -> int:
        return int(self.llm.n_tokens)

    def tokens(self) -> list[int]:
        return [int(t) for t in self.llm.input_ids[: self.llm.n_tokens]]

    def rewind(self, n: int) -> None:
        """Forget everything after the first `n` evaluated tokens."""
        if n < self.llm.n_tokens:
            self._fresh = None
            if not self.llm._ctx.kv_cache_seq_rm(-1, n, -1):
                self.llm.reset()
                self.llm._ctx.kv_cache_clear()
                return
            self.llm.n_tokens = n

    def sync(self, tokens: list[int], peek: int = 0) -> tuple[int, npt.NDArray[np.float32] | None]:
        """Make the context hold exactly `tokens`, evaluating only what differs from what it holds.

        Returns how many tokens were reused, and with `peek` the logits before the last `peek` tokens (see `feed`).
        At least the last token (with `peek`, the last peek + 1) is re-evaluated so its logits are fresh.
        """
        held = self.llm.input_ids[: self.llm.n_tokens]
        if not peek and self._fresh == (self._decodes, len(tokens)) and len(held) == len(tokens) and np.array_equal(
                held, np.asarray(tokens, dtype=held.dtype)):
            return len(tokens), None  # held, with the last token's logits still there: nothing to evaluate
        limit = min(len(held), len(tokens) - 1 - peek)
        common = 0
        if limit > 0:
            mismatch = np.nonzero(held[:limit] != np.asarray(tokens[:limit], dtype=held.dtype))[0]
            common = int(mismatch[0]) if len(mismatch) else limit
        self.rewind(common)
        common = self.llm.n_tokens
        return common, self.feed(tokens[common:], prompt=True, peek=peek)

    def feed(self, tokens: list[int], *, prompt: bool = False, peek: int = 0) -> npt.NDArray[np.float32] | None:
        """Evaluate tokens in one batch (forced text, or the request itself).

        `peek`: the last `peek` tokens are a guess evaluated along (speculation); the logits before them are
        returned (a copy), and `logits()` gives those after them. A wrong guess is undone with `rewind`.
        """
        if not tokens:
            return None
        if self.llm.n_tokens + len(tokens) > self.n_ctx:
            raise ContextFull(f"context of {self.n_ctx} tokens is full")
        t0 = time.perf_counter()
        before = None
        if peek >= self.llm.n_batch:
            raise ValueError(f"a guess of {peek} tokens does not fit one batch of {self.llm.n_batch}")
        if peek and peek >= len(tokens):  # nothing new before the guess: the logits before it are those held now
            before = self.logits().copy()
            self.llm.eval(tokens)
        elif peek:
            head, tail = tokens[: -(peek + 1)], tokens[-(peek + 1):]
            if head:
                self.llm.eval(head)
            before = self._eval_two_rows(tail)
        else:
            self.llm.eval(tokens)
        self._mark_fresh()
        dt = time.perf_counter() - t0
        if prompt or len(tokens) > 1:
            self.prompt_tokens += len(tokens)
            self.prompt_s += dt
        else:
            self.generated_tokens += 1
            self.decode_s += dt
        return before

    def _eval_two_rows(self, tokens: list[int]) -> npt.NDArray[np.float32]:
        """One llama_decode of `tokens` with logits for the first and the last: llama-cpp-python's `eval` keeps
        only the last row. Returns the first row (a copy)."""
        llm = self.llm
        n_past = llm.n_tokens
        llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
        llm._batch.set_batch(tokens, n_past, logits_all=False)
        llm._batch.batch.logits[0] = True
        llm._ctx.decode(llm._batch)
        llm.input_ids[n_past: n_past + len(tokens)] = tokens
        llm.n_tokens += len(tokens)
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(0), shape=(self.n_vocab,)).copy()

    # -- saved prompt prefixes (one per tool set) -------------------------------------------------------------

    def snapshot(self) -> tuple[list[int], bytes]:
        """The evaluated tokens and their KV cells, to restore later instead of evaluating them again."""
        ctx = self.llm._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0)
        return self.tokens(), bytes(memoryview(buf)[:written])  # slicing the ctypes array would build a list

    def restore(self, tokens: list[int], state: bytes) -> bool:
        """Put a snapshot back; False (and an empty context) if llama.cpp refuses it."""
        self.llm._ctx.kv_cache_clear()
        self.llm.n_tokens = 0
        self._fresh = None
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if llama_cpp.llama_state_seq_set_data(self.llm._ctx.ctx, buf, len(state), 0) != len(state):
            self.llm._ctx.kv_cache_clear()
            return False
        self.llm.input_ids[: len(tokens)] = tokens
        self.llm.n_tokens = len(tokens)
        return True

    def logits(self) -> npt.NDArray[np.float32]:
        """The last evaluated token's logits: a view into llama.cpp's buffer, valid until the next feed."""
        ptr = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def generate(self, tokens: list[int], max_tokens: int, *, temperature: float, top_p: float, top_k: int,
                 min_p: float = 0.05, seed: int = -1, stop: tuple[str, ...] = (),
                 bias: dict[int, float] | None = None, deadline: float = float("inf")) -> tuple[str, int, bool]:
        """Free generation after `tokens` by llama.cpp's sampler chain; returns (text, tokens, cut by the budget).

        Our loop, not `create_completion`: that re-evaluates the prompt's last token the router or thinker has just
        evaluated (one model step per answer), and applies a logit bias in Python over the whole vocabulary at every
        token. Here the bias is llama.cpp's own sampler, and the prompt's logits are used as they are. The time of
        the whole loop (sampling included) is accounted as decoding."""
        self.sync(tokens)
        sampler = self._sampler(temperature, top_p, top_k, min_p, seed, bias)
        ctx = self.llm._ctx.ctx
        out, used, cut = b"", 0, False
        stops = [s.encode() for s in stop]
        t0 = time.perf_counter()
        while used < max_tokens:
            if time.monotonic() > deadline:
                raise DeadlineExceeded("deadline passed during generation")
            token = int(llama_cpp.llama_sampler_sample(sampler, ctx, -1))
            if self.is_end(token):
                break
            out += self.piece(token)
            used += 1
            hit = next((out.index(s) for s in stops if s in out), None)
            if hit is not None:
                out = out[:hit]
                break
            if used == max_tokens:  # the budget's last token is not evaluated: nothing would read its logits
                cut = True
                break
            if self.llm.n_tokens + 1 > self.n_ctx:
                raise ContextFull(f"context of {self.n_ctx} tokens is full")
            self.llm.eval([token])
            self._mark_fresh()
        self.generated_tokens += used
        self.decode_s += time.perf_counter() - t0
        return out.decode("utf-8", "replace"), used, cut

    def _sampler(self, temperature: float, top_p: float, top_k: int, min_p: float, seed: int,
                 bias: dict[int, float] | None) -> Any:
        """A sampler chain as create_completion builds it (top-k, top-p, min-p, temperature, draw; greedy at 0),
        with the bias first. Kept per settings: a chain is built once, and reset (its RNG reseeded) per use."""
        key = (temperature, top_p, top_k, min_p, seed, tuple(sorted((bias or {}).items())))
        chain = self._sampler_cache.get(key)
        if chain is None:
            if len(self._sampler_cache) >= 16:
                self._sampler_cache.clear()
            chain = self._sampler_cache[key] = llama_cpp._internals.LlamaSampler()
            if bias:
                chain.add_logit_bias(self.n_vocab, bias)
            if temperature <= 0:
                chain.add_greedy()
            else:
                chain.add_top_k(top_k)
                chain.add_top_p(top_p, 1)
                chain.add_min_p(min_p, 1)
                chain.add_temp(temperature)
                chain.add_dist(seed if seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED)
        else:
            llama_cpp.llama_sampler_reset(chain.sampler)
        return chain.sampler

    def stats(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prompt_tokens_per_s": round(self.prompt_tokens / self.prompt_s, 1) if self.prompt_s else None,
            "tokens_per_s": round(self.generated_tokens / self.decode_s, 1) if self.decode_s else None,
        }

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.close()


class ContextFull(Exception):
    """The request does not fit in the context window."""


class DeadlineExceeded(Exception):
    """The request's deadline passed while the model was working on it."""
