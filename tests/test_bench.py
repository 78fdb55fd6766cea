"""`edged bench --quick` once, end to end: every section there with sane numbers (targets reported, not tested)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from conftest import GEMMA, MODELS_DIR, MOSQUITTO, QWEN, REPO

pytestmark = [pytest.mark.slow, pytest.mark.model, pytest.mark.mqtt]


def _positive(value: Any, what: str) -> None:
    assert isinstance(value, int | float) and value > 0, f"{what}: {value!r}"


def _spread(block: dict[str, Any], what: str) -> None:
    _positive(block["p50"], f"{what} p50")
    assert block["p95"] >= block["p50"], f"{what}: p95 {block['p95']} < p50 {block['p50']}"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed")
    if not (GEMMA.is_file() and QWEN.is_file()):
        pytest.skip(f"model files missing in {MODELS_DIR}")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "edged", "bench", "--quick", "--models-dir", str(MODELS_DIR),
         "--router", "gemma3-270m-q4km", "--thinker", "qwen2.5-coder-0.5b", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=840,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "targets (reported, not asserted)" in proc.stdout
    return dict(json.loads(out.read_text()))


@pytest.mark.timeout(900)
def test_bench_quick_writes_every_section(report: dict[str, Any]) -> None:
    assert report["meta"]["quick"] is True
    for section in ("models", "daemon", "peer", "derived"):
        assert section in report, section

    # per model: file size, raw speed (the limit), the router on the seed's requests, tokens per query
    gemma, qwen = report["models"]["gemma3-270m-q4km"], report["models"]["qwen2.5-coder-0.5b"]
    for name, m in (("gemma", gemma), ("qwen", qwen)):
        assert m["present"] is True
        _positive(m["file_bytes"], f"{name} size")
        _positive(m["raw"]["prefill_tokens_per_s"], f"{name} prefill")
        _positive(m["raw"]["decode_tokens_per_s"], f"{name} raw decode")
        _positive(m["router"]["avg_warm_ms"], f"{name} warm")
        _positive(m["router"]["multi_tool_ms"]["p50"], f"{name} multi-tool")
        _positive(m["router"]["tokens_per_query"], f"{name} tokens/query")
        assert set(m["router"]["cases"]) == {"seed1", "seed2", "seed3", "seed4"}
    assert gemma["file_bytes"] == GEMMA.stat().st_size
    # the naive grammar path on the router, and tier-2 speed on the thinker
    _spread(gemma["naive"]["all_ms"], "naive")
    _positive(qwen["thinker"]["tokens_per_s"], "tier 2 tokens/s")
    _positive(qwen["thinker"]["ratio_vs_raw_decode"], "tier 2 ratio")

    d = report["daemon"]
    _positive(d["ready_s_router_only"], "READY (router)")
    _positive(d["ready_s_both"], "READY (both)")
    for label in ("single_tool", "two_tool"):
        _spread(d["e2e"][label]["e2e_ms"], f"e2e {label}")
        _spread(d["e2e"][label]["route_ms"], f"route {label}")
    for case in d["e2e"]["cases"].values():
        assert case["status"] == "ok", case
    _positive(d["routed_throughput"]["sequential"]["rps"], "sequential rps")
    _positive(d["routed_throughput"]["concurrent"]["rps"], "concurrent rps")
    direct = d["direct_throughput"]
    assert direct["complete"] and direct["replies"] == direct["commands"], direct
    _positive(direct["calls_per_s"], "direct calls/s")
    assert sorted(d["tool_growth"], key=int) == ["3", "10", "30", "50"]
    for size, g in d["tool_growth"].items():
        assert g["status"] == "ok", (size, g)
        _spread(g["e2e_ms"], f"growth {size}")
    res = d["resources"]
    assert res["rss_bytes"] > res["model_files_bytes"] / 2
    assert res["model_files_bytes"] == GEMMA.stat().st_size + QWEN.stat().st_size
    assert 0 <= res["idle_cpu_percent"] < 200

    peer = report["peer"]["gemma3-270m-q4km"]
    assert "error" not in peer, peer
    _spread(peer["all_ms"], "peer")
    assert 0 <= peer["correct"] <= 4

    derived = report["derived"]
    for key in ("single_tool_e2e_over_inprocess", "single_tool_e2e_over_route_timing",
                "growth_e2e_p50_largest_over_smallest", "peer_over_inprocess", "peer_over_e2e",
                "naive_over_inprocess", "tier2_over_raw_decode"):
        _positive(derived[key], key)
    assert set(derived["targets"]) >= {"single_tool_e2e_p50_ms", "peer_p50_over_edged_e2e_p50",
                                       "growth_p50_50_over_3", "direct_calls_per_s", "rss_over_files_mb"}
    for t in derived["targets"].values():
        assert t["met"] in (True, False), t


def test_no_process_left_behind(report: dict[str, Any]) -> None:
    """Every broker, daemon and peer the bench started is stopped before it returns (all ran in its workdir)."""
    import psutil

    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info.get("cmdline") or [])
            env = proc.environ() if "edged" in cmd or "llama_cpp" in cmd or "mosquitto" in cmd else {}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "edged-bench-" in cmd or "edged-bench-" in env.get("EDGED_STATE__DIR", "") + env.get("EDGED_BENCH", ""):
            left.append(cmd)
    assert not left, left
    assert report["meta"]["seconds"] > 0
