"""The peer: llama-cpp-python's OpenAI-compatible server on the same GGUF, asked the same requests over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from edged.bench.common import Case, calls_match, percentiles
from edged.llm.textcalls import parse_text_calls
from edged.localproc import free_port, stop_process


def available() -> bool:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return False
    return True


class PeerServer:
    """`python -m llama_cpp.server` on a free loopback port; always stopped by `stop()` (use try/finally)."""

    def __init__(self, model: Path, workdir: Path, *, n_ctx: int = 2048, n_threads: int = 0,
                 chat_format: str | None = None) -> None:
        self.chat_format = chat_format
        self.model = model
        self.workdir = workdir
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> float:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--host", "127.0.0.1",
               "--port", str(self.port), "--n_ctx", str(self.n_ctx)]
        if self.n_threads:  # the same threads as edged's engine, for a fair comparison
            cmd += ["--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads)]
        if self.chat_format:
            cmd += ["--chat_format", self.chat_format]
        t0 = time.monotonic()
        env = {**os.environ, "EDGED_BENCH": str(self.workdir)}  # marks it as ours (tests look for leftovers)
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / f"peer-{self.port}.log", "ab"))
        end = t0 + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited {self.proc.returncode}; see {self.workdir}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2) as resp:
                    if resp.status == 200:
                        self.start_s = time.monotonic() - t0
                        return self.start_s
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise TimeoutError(f"llama_cpp.server did not answer within {timeout} s")

    def chat(self, case: Case, max_tokens: int = 64, timeout: float = 120.0) -> dict[str, Any]:
        body = {"messages": [{"role": "user", "content": case.query}], "tools": case.tools, "tool_choice": "auto",
                "temperature": 0.0, "max_tokens": max_tokens}
        req = urllib.request.Request(f"{self.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return dict(json.loads(resp.read()))

    def stop(self) -> None:
        stop_process(self.proc, 10)


def answer_calls(response: dict[str, Any], known: set[str]) -> tuple[list[dict[str, Any]], str]:
    """Calls in an OpenAI chat response: parsed `tool_calls`, else calls written as text in `content`."""
    message = (response.get("choices") or [{}])[0].get("message") or {}
    calls: list[dict[str, Any]] = []
    for tc in message.get("tool_calls") or []:
        fn = tc.get("function") or {}
        args = fn.get("arguments")
        try:
            parsed = json.loads(args) if isinstance(args, str) else (args or {})
        except ValueError:
            parsed = {"_raw": args}
        calls.append({"name": fn.get("name"), "arguments": parsed if isinstance(parsed, dict) else {}})
    content = str(message.get("content") or "")
    if calls:
        return calls, "tool_calls"
    found, _ = parse_text_calls(content, known)
    return [{"name": c.name, "arguments": c.arguments} for c in found], "content" if found else "none"


def run_peer(model: Path, workdir: Path, cases: list[Case], runs: int, budget_s: float, *, n_threads: int = 0,
             n_ctx: int = 2048, chat_format: str | None = None) -> dict[str, Any]:
    server = PeerServer(model, workdir, n_ctx=n_ctx, n_threads=n_threads, chat_format=chat_format)
    try:
        start_s = server.start()
        per_case: dict[str, Any] = {}
        end = time.monotonic() + budget_s
        for case in cases:
            known = {t["function"]["name"] for t in case.tools}
            server.chat(case)  # warm-up: the peer reuses the prompt's prefix too
            samples: list[float] = []
            response: dict[str, Any] = {}
            for i in range(runs):
                if i and time.monotonic() > end:
                    break
                t0 = time.perf_counter()
                response = server.chat(case)
                samples.append(round((time.perf_counter() - t0) * 1000, 3))
            calls, where = answer_calls(response, known)
            message = (response.get("choices") or [{}])[0].get("message") or {}
            per_case[case.id] = {"multi": case.multi, "ms": percentiles(samples), "samples_ms": samples,
                                 "calls": calls, "calls_from": where, "match": calls_match(calls, case.expected),
                                 "content": str(message.get("content") or "")[:300]}
        single = [s for c in per_case.values() if not c["multi"] for s in c["samples_ms"]]
        multi = [s for c in per_case.values() if c["multi"] for s in c["samples_ms"]]
        return {"model": model.name, "chat_format": chat_format or "the GGUF's template",
                "start_s": round(start_s, 3), "n_threads": n_threads or None, "cases": per_case,
                "single_tool_ms": percentiles(single), "multi_tool_ms": percentiles(multi),
                "all_ms": percentiles(single + multi),
                "correct": sum(1 for c in per_case.values() if c["match"]["correct"]),
                "parsed_tool_calls": sum(1 for c in per_case.values() if c["calls_from"] == "tool_calls")}
    finally:
        server.stop()
