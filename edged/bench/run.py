"""`edged bench`: measure the models present, in-process and through the daemon, next to the peer; table + JSON.

Phases, one after another so they never compete for the cores:
1. in-process, per model file (router and thinker): file size, raw llama.cpp prefill and decoding (the limit), the
   router on the seed's requests (warm), tokens per query, the naive grammar-constrained path; tier-2 generation;
2. a private mosquitto and `edged run` with the router only: time to READY=1, end-to-end latency of single- and
   two-tool requests, routed requests/s, direct tool calls/s (C clients), latency as the tool set grows;
3. the daemon with router and thinker: READY time, RSS against the files' sizes, idle CPU;
4. the peer (`python -m llama_cpp.server`) on the router's GGUF, asked the same requests over HTTP.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edged.bench.common import SEED_CASES, Case, percentiles, ratio

MB = 1_000_000
PAIR_GAP_S = 0.05
DEFAULT_MODELS_DIR = Path.home() / ".cache" / "edged" / "models"


@dataclass
class Plan:
    """How much to measure: the full run, or `--quick` (a test's budget)."""

    raw_decode: int = 64
    inproc_runs: int = 20
    naive_runs: int = 3
    thinker_runs: int = 3
    e2e_runs: int = 20
    e2e_warmup: int = 2
    sequential: int = 40
    clients: int = 4
    per_client: int = 10
    direct: int = 5000
    growth_sizes: tuple[int, ...] = (3, 10, 30, 50)
    growth_runs: int = 15
    idle_s: float = 5.0
    peer_runs: int = 5
    budget_s: float = 60.0  # per loop: every loop is bounded by count and by time
    quick_mode: bool = False

    @classmethod
    def quick(cls) -> Plan:
        return cls(raw_decode=16, inproc_runs=2, naive_runs=1, thinker_runs=1, e2e_runs=3, e2e_warmup=1,
                   sequential=4, clients=4, per_client=1, direct=300, growth_runs=2, idle_s=2.0, peer_runs=1,
                   budget_s=8.0, quick_mode=True)


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _load_config(models_dir: Path | None) -> Any:
    from edged.config import ConfigError, load_config

    try:
        config = load_config(None)
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from exc
    if models_dir is not None:
        config.models.dir = models_dir
    elif not config.models.dir and not os.environ.get("EDGED_MODELS_DIR") and DEFAULT_MODELS_DIR.is_dir():
        config.models.dir = DEFAULT_MODELS_DIR  # where scripts/setup puts them
    return config


def _models(config: Any, router: str | None, thinker: str | None) -> list[dict[str, Any]]:
    """The router and thinker files: role(s), spec, path, present or not (one entry when both are the same file)."""
    from edged.llm.loader import resolve

    out: dict[str, dict[str, Any]] = {}
    for role, spec in (("router", router), ("thinker", thinker)):
        if not spec:
            continue
        try:
            path, entry = resolve(config, spec)
        except Exception as exc:
            out[f"{role}:{spec}"] = {"roles": [role], "spec": spec, "path": None, "present": False, "error": str(exc)}
            continue
        key = str(path.resolve()) if path.exists() else str(path)
        item = out.setdefault(key, {"roles": [], "spec": spec, "name": entry.name if entry else path.name,
                                    "path": path, "present": path.is_file()})
        item["roles"].append(role)
    return list(out.values())


# --- phase 1 --------------------------------------------------------------------------------------------------------


def phase_inprocess(config: Any, models: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    from edged.bench import inprocess
    from edged.llm.loader import build_router, build_thinker

    out: dict[str, Any] = {}
    for m in models:
        if not m["present"]:
            out[m["name"] if "name" in m else m["spec"]] = {"present": False, "roles": m["roles"],
                                                            "error": m.get("error", "file not present")}
            continue
        name = m["name"]
        _log(f"in-process: loading {name}")
        router, info, close, _stats = build_router(config, m["spec"])
        try:
            engine = router.engine
            res: dict[str, Any] = {"present": True, "roles": m["roles"], "file": str(m["path"]),
                                   "file_bytes": m["path"].stat().st_size, "load_s": info.get("load_s"),
                                   "format": info.get("format"), "n_threads": engine.llm.n_threads}
            _log(f"in-process: raw llama.cpp speed of {name}")
            res["raw"] = inprocess.raw_speed(engine, decode_tokens=plan.raw_decode)
            _log(f"in-process: router on the seed's requests ({name})")
            per_case = inprocess.route_cases(router, SEED_CASES, plan.inproc_runs, plan.budget_s)
            res["router"] = {**inprocess.summarize_router(per_case), "cases": per_case}
            res["tool_template"] = "tools" in (engine.chat_template or "")
            if "router" in m["roles"] or not plan.quick_mode:
                _log(f"in-process: naive grammar-constrained generation ({name})")
                res["naive"] = inprocess.naive_cases(router, SEED_CASES, plan.naive_runs, plan.budget_s,
                                                     warmup=0 if plan.quick_mode else 1)
                res["naive"]["speedup_p50"] = ratio(res["naive"]["all_ms"]["p50"], res["router"]["all_ms"]["p50"], 1)
            if "thinker" in m["roles"]:
                _log(f"in-process: tier-2 generation ({name})")
                thinker, _tinfo, _tclose, _ = build_thinker(config, m["spec"], engine=engine)
                # raw decoding measured again right before: the ratio compares neighbours in time, not phases
                # minutes apart on a machine whose load may have changed
                adjacent = inprocess.raw_speed(engine, decode_tokens=plan.raw_decode)
                res["thinker"] = inprocess.thinker_speed(thinker, engine, [], adjacent, plan.thinker_runs,
                                                         plan.budget_s)
        finally:
            close()
        out[name] = res
    return out


# --- phases 2 and 3 -------------------------------------------------------------------------------------------------


def _failure(exc: Exception, daemon: Any) -> dict[str, Any]:
    _log(f"FAILED: {type(exc).__name__}: {exc}")
    proc = daemon.proc
    return {"error": f"{type(exc).__name__}: {exc}",
            "daemon_exit": None if proc is None else proc.poll(), "daemon_log": str(daemon.log_path),
            "daemon_log_tail": daemon._tail()[-1500:]}


@contextlib.contextmanager
def _paired_router(config: Any, spec: str) -> Iterator[Callable[[Case], float]]:
    """The daemon's router file loaded in this process too: `route(case)` in ms, timed next to each e2e request."""
    from edged.llm.loader import build_router

    router, _info, close, _stats = build_router(config, spec)

    def route(case: Case) -> float:
        # a pause on each side: llama.cpp's worker threads (OpenMP) spin for a moment after their last step, and
        # the two processes' threads must not take turns on the same two cores inside a measurement
        time.sleep(PAIR_GAP_S)
        t0 = time.perf_counter()
        router.route(case.query, case.specs, time.monotonic() + 60)
        elapsed = (time.perf_counter() - t0) * 1000
        time.sleep(PAIR_GAP_S)
        return elapsed

    try:
        yield route
    finally:
        close()


def phase_daemon(config: Any, models: list[dict[str, Any]], router: str | None, thinker: str | None, plan: Plan,
                 workdir: Path, models_dir: Path) -> dict[str, Any]:
    from edged.bench import mqtt_load
    from edged.client import EdgedClient
    from edged.localproc import free_port, mosquitto_binary

    out: dict[str, Any] = {}
    if mosquitto_binary() is None:
        return {"skipped": "mosquitto is not installed"}
    router_present = any(m["present"] and "router" in m["roles"] for m in models)
    thinker_present = any(m["present"] and "thinker" in m["roles"] for m in models)
    broker = mqtt_load.Broker(free_port(), workdir)
    broker.start()
    try:
        base = {"EDGED_MODELS_DIR": str(models_dir), "EDGED_TELEMETRY__INTERVAL_S": "10"}
        if router_present:
            device = "bench-a"
            daemon = mqtt_load.DaemonProc(broker, workdir, device,
                                          {**base, "EDGED_MODELS__ROUTER": str(router), "EDGED_MODELS__THINKER": ""})
            try:
                _log("daemon (router only): starting")
                out["ready_s_router_only"] = round(daemon.start(), 3)
                with EdgedClient("127.0.0.1", broker.port) as client, _paired_router(config, str(router)) as inproc:
                    mqtt_load.wait_serving(client, device)
                    _log("daemon: end-to-end latency, each request also routed in-process right before")
                    out["e2e"] = mqtt_load.e2e_latency(client, device, SEED_CASES, plan.e2e_runs, plan.e2e_warmup,
                                                       plan.budget_s, inproc=inproc)
                    _log("daemon: latency as the tool set grows")
                    out["tool_growth"] = mqtt_load.tool_growth(client, device, list(plan.growth_sizes),
                                                               plan.growth_runs, plan.budget_s)
                _log("daemon: routed requests/s")
                out["routed_throughput"] = mqtt_load.routed_throughput(
                    broker.port, device, SEED_CASES, plan.sequential, plan.clients, plan.per_client, plan.budget_s)
                _log("daemon: direct tool calls/s (mosquitto_pub -l / mosquitto_sub -C)")
                out["direct_throughput"] = mqtt_load.direct_throughput(broker.port, device, plan.direct)
            except Exception as exc:  # recorded; the other phases still run
                out["error_router_only"] = _failure(exc, daemon)
            finally:
                daemon.stop()
        else:
            out["e2e"] = {"skipped": "no router file"}
        device = "bench-b"
        env = {**base, "EDGED_MODELS__ROUTER": str(router or ""), "EDGED_MODELS__THINKER": str(thinker or "")}
        daemon = mqtt_load.DaemonProc(broker, workdir, device, env)
        try:
            _log("daemon (router + thinker): starting")
            out["ready_s_both"] = round(daemon.start(), 3)
            with EdgedClient("127.0.0.1", broker.port) as client:
                mqtt_load.wait_serving(client, device)
                if not router_present:
                    out["direct_throughput"] = mqtt_load.direct_throughput(broker.port, device, plan.direct)
                at_ready = mqtt_load.resources(daemon.pid, 0.0)["rss_bytes"]
                if router_present:
                    client.request(device, {"id": f"rss-r-{time.time_ns()}", "query": SEED_CASES[0].query,
                                            "tools": SEED_CASES[0].tools}, timeout=60)
                if thinker_present:
                    client.request(device, {"id": f"rss-t-{time.time_ns()}", "query": "Say hello in three words.",
                                            "tier": 2, "deadline_ms": 60000}, timeout=90)
                time.sleep(0.5)
            _log(f"daemon: RSS and idle CPU over {plan.idle_s} s")
            res = mqtt_load.resources(daemon.pid, plan.idle_s)
            files = sum(m["path"].stat().st_size for m in models if m["present"])
            out["resources"] = {**res, "rss_at_ready_bytes": at_ready, "model_files_bytes": files,
                                "rss_over_files_mb": round((res["rss_bytes"] - files) / MB, 1),
                                "models": [m.get("name") for m in models if m["present"]]}
        except Exception as exc:
            out["error_both"] = _failure(exc, daemon)
        finally:
            daemon.stop()
    finally:
        broker.stop()
    return out


# --- phase 4 --------------------------------------------------------------------------------------------------------


def phase_peer(models: list[dict[str, Any]], inproc: dict[str, Any], plan: Plan, workdir: Path,
               full: bool) -> dict[str, Any]:
    from edged.bench import peer
    from edged.llm.engine import default_threads

    if not peer.available():
        return {"skipped": "llama_cpp.server is not importable: pip install 'llama-cpp-python[server]'"}
    out: dict[str, Any] = {}
    for m in models:
        if not m["present"] or ("router" not in m["roles"] and not full):
            continue
        _log(f"peer: llama_cpp.server on {m['name']}")
        try:
            # a GGUF whose chat template ignores tools (the Gemma 3 base stand-in) would get a prompt without
            # them and answer nothing at once: the server's own function-calling format is then the fair peer
            chat_format = None if inproc.get(m["name"], {}).get("tool_template", True) else "chatml-function-calling"
            out[m["name"]] = peer.run_peer(m["path"], workdir, SEED_CASES, plan.peer_runs, plan.budget_s * 2,
                                           n_threads=default_threads(), chat_format=chat_format)
        except Exception as exc:
            out[m["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


# --- report ---------------------------------------------------------------------------------------------------------


def _p50(block: Any) -> float | None:
    return block.get("p50") if isinstance(block, dict) else None


def _all_e2e(e2e: dict[str, Any]) -> dict[str, Any]:
    return percentiles([s for c in e2e.get("cases", {}).values() for s in c["e2e_samples"]])


def derive(report: dict[str, Any], router_name: str | None, thinker_name: str | None) -> dict[str, Any]:
    """Ratios and targets: reported, never asserted."""
    inproc = report["models"].get(router_name or "", {}) if router_name else {}
    daemon = report["daemon"]
    e2e = daemon.get("e2e", {})
    r: dict[str, Any] = {}
    router = inproc.get("router", {})
    if e2e.get("cases"):
        e2e_all = _all_e2e(e2e)
        e2e["all"] = {"e2e_ms": e2e_all}
        for label, key in (("single_tool", "single_tool_ms"), ("two_tool", "multi_tool_ms")):
            e2e_p50 = _p50(e2e[label]["e2e_ms"])
            r[f"{label}_e2e_over_route_timing"] = ratio(e2e_p50, _p50(e2e[label]["route_ms"]))
            # paired in-process timings (right before each request) where measured, else phase 1's
            paired = _p50(e2e[label].get("inproc_ms")) or _p50(router.get(key))
            r[f"{label}_e2e_over_inprocess"] = ratio(e2e_p50, paired)
    growth = daemon.get("tool_growth", {})
    sizes = sorted(growth, key=int)
    if sizes:
        r["growth_e2e_p50_largest_over_smallest"] = ratio(_p50(growth[sizes[-1]]["e2e_ms"]),
                                                          _p50(growth[sizes[0]]["e2e_ms"]))
        r["growth_route_p50_largest_over_smallest"] = ratio(_p50(growth[sizes[-1]]["route_ms"]),
                                                            _p50(growth[sizes[0]]["route_ms"]))
    peer = report["peer"].get(router_name or "", {}) if router_name else {}
    if "all_ms" in peer:
        r["peer_over_inprocess"] = ratio(_p50(peer["all_ms"]), _p50(router.get("all_ms")), 2)
        r["peer_over_e2e"] = ratio(_p50(peer["all_ms"]), _p50(e2e.get("all", {}).get("e2e_ms")), 2)
        r["peer_single_over_e2e_single"] = ratio(_p50(peer["single_tool_ms"]),
                                                 _p50(e2e.get("single_tool", {}).get("e2e_ms")), 2)
    naive = inproc.get("naive", {})
    if naive:
        r["naive_over_inprocess"] = ratio(_p50(naive.get("all_ms")), _p50(router.get("all_ms")), 2)
    tier2 = report["models"].get(thinker_name or "", {}).get("thinker", {}) if thinker_name else {}
    if tier2:
        r["tier2_over_raw_decode"] = tier2.get("ratio_vs_raw_decode")
    res = daemon.get("resources", {})
    direct = daemon.get("direct_throughput", {})

    def target(value: float | None, op: str, limit: float) -> dict[str, Any]:
        met = None if value is None else (value <= limit if op == "<=" else value >= limit)
        return {"value": value, "target": f"{op} {limit}", "met": met}

    r["targets"] = {
        "single_tool_e2e_p50_ms": target(_p50(e2e.get("single_tool", {}).get("e2e_ms")), "<=", 150),
        "peer_p50_over_edged_e2e_p50": target(r.get("peer_over_e2e"), ">=", 5),
        "e2e_p50_over_inprocess_p50": target(r.get("single_tool_e2e_over_inprocess"), "<=", 1.15),
        "e2e_p50_over_daemon_route_p50": target(r.get("single_tool_e2e_over_route_timing"), "<=", 1.15),
        "growth_p50_50_over_3": target(r.get("growth_e2e_p50_largest_over_smallest"), "<=", 1.3),
        "direct_calls_per_s": target(direct.get("calls_per_s"), ">=", 2000),
        "tier2_over_raw_decoding": target(r.get("tier2_over_raw_decode"), ">=", 0.9),
        "rss_over_files_mb": target(res.get("rss_over_files_mb"), "<=", 300),
    }
    return r


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}{unit}" if abs(v) >= 10 else f"{v:.2f}{unit}"
    return f"{v}{unit}"


def table(report: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
    add(f"edged bench  {report['meta']['when']}  {report['meta']['cpu_count']} cpus  "
        f"{'quick' if report['meta']['quick'] else 'full'}  load avg at start {report['meta']['loadavg_start']}")
    add("")
    add(f"{'model':28} {'roles':15} {'MB':>6} {'prefill t/s':>11} {'raw t/s':>8} {'warm ms':>8} "
        f"{'multi ms':>9} {'tok/query':>9} {'ok':>5} {'naive ms':>9} {'naive ok':>8}")
    for name, m in report["models"].items():
        if not isinstance(m, dict):
            add(f"in-process phase: {m}")
            continue
        if not m.get("present"):
            add(f"{name:28} {','.join(m.get('roles', [])):15} absent: {m.get('error')}")
            continue
        router, naive, raw = m.get("router", {}), m.get("naive", {}), m.get("raw", {})
        add(f"{name[:28]:28} {','.join(m['roles']):15} {m['file_bytes'] / MB:6.0f} "
            f"{_fmt(raw.get('prefill_tokens_per_s')):>11} {_fmt(raw.get('decode_tokens_per_s')):>8} "
            f"{_fmt(router.get('avg_warm_ms')):>8} {_fmt(_p50(router.get('multi_tool_ms'))):>9} "
            f"{_fmt(router.get('tokens_per_query')):>9} {router.get('correct')}/{router.get('n_cases')!s:3} "
            f"{_fmt(_p50(naive.get('all_ms'))):>9} {naive.get('correct')}/{len(naive.get('cases', {}))}")
        if "thinker" in m:
            t = m["thinker"]
            add(f"{'':28} tier 2: {_fmt(t.get('tokens_per_s'))} tok/s vs raw "
                f"{_fmt(t.get('raw_decode_tokens_per_s'))} (ratio {_fmt(t.get('ratio_vs_raw_decode'))}), "
                f"completion API {_fmt(t.get('raw_completion_tokens_per_s'))}")
    d = report["daemon"]
    add("")
    if "skipped" in d:
        add(f"daemon: skipped ({d['skipped']})")
    for key in ("error", "error_router_only", "error_both"):
        if key in d:
            err = d[key] if isinstance(d[key], str) else d[key].get("error")
            add(f"daemon {key}: {err} (logs: {report['meta'].get('workdir_kept')})")
    e2e = d.get("e2e", {})
    if e2e.get("cases"):
        add(f"{'over MQTT (router only)':28} {'e2e p50':>8} {'e2e p95':>8} {'route p50':>10} {'in-proc p50':>11}"
            f" {'paired in-proc':>14}")
        models = report["models"]
        inproc: dict[str, Any] = next((m.get("router", {}) for m in models.values()
                                       if isinstance(m, dict) and "router" in m.get("roles", [])), {})
        for label, key in (("single_tool", "single_tool_ms"), ("two_tool", "multi_tool_ms")):
            b = e2e[label]
            add(f"{label:28} {_fmt(_p50(b['e2e_ms'])):>8} {_fmt(b['e2e_ms'].get('p95')):>8} "
                f"{_fmt(_p50(b['route_ms'])):>10} {_fmt(_p50(inproc.get(key))):>11} "
                f"{_fmt(_p50(b.get('inproc_ms'))):>14}")
    if "routed_throughput" in d:
        rt = d["routed_throughput"]
        add(f"routed requests/s: {_fmt(rt['sequential']['rps'])} sequential, "
            f"{_fmt(rt['concurrent']['rps'])} with {rt['concurrent']['clients']} clients")
    if "direct_throughput" in d:
        dt = d["direct_throughput"]
        add(f"direct tool calls/s (C clients): {_fmt(dt.get('calls_per_s'))} "
            f"({dt.get('ok')}/{dt.get('commands')} ok, {dt.get('busy')} busy, in {dt.get('seconds')} s)"
            if "skipped" not in dt
            else f"direct tool calls: skipped ({dt['skipped']})")
    if d.get("tool_growth"):
        add("tool set growth (e2e p50 ms): " + ", ".join(
            f"{k} tools {_fmt(_p50(v['e2e_ms']))}" + ("" if v["status"] == "ok" else f" [{v['status']}]")
            for k, v in sorted(d["tool_growth"].items(), key=lambda kv: int(kv[0]))))
    if "resources" in d:
        r = d["resources"]
        add(f"daemon with both models: RSS {r['rss_bytes'] / MB:.0f} MB vs files {r['model_files_bytes'] / MB:.0f} MB"
            f" (+{r['rss_over_files_mb']:.0f} MB), idle CPU {r['idle_cpu_percent']:.2f} %, READY after "
            f"{_fmt(d.get('ready_s_both'))} s (router only {_fmt(d.get('ready_s_router_only'))} s)")
    add("")
    for name, p in report["peer"].items():
        if not isinstance(p, dict):
            continue
        if "error" in p or "skipped" in p:
            add(f"peer {name}: {p.get('error') or p.get('skipped')}")
            continue
        add(f"peer llama_cpp.server ({name}): p50 {_fmt(_p50(p['all_ms']))} ms, p95 {_fmt(p['all_ms'].get('p95'))} ms,"
            f" single p50 {_fmt(_p50(p['single_tool_ms']))}, two-tool p50 {_fmt(_p50(p['multi_tool_ms']))}; "
            f"right calls {p['correct']}/{len(p['cases'])} (parsed tool_calls {p['parsed_tool_calls']})")
    if "skipped" in report["peer"]:
        add(f"peer: skipped ({report['peer']['skipped']})")
    add("")
    add("targets (reported, not asserted):")
    for key, t in report["derived"].get("targets", {}).items():
        mark = {True: "ok  ", False: "MISS", None: "n/a "}[t["met"]]
        add(f"  {mark} {key:34} {_fmt(t['value']):>10}  (target {t['target']})")
    return "\n".join(lines)


def run_bench(*, models_dir: Path | None = None, router: str | None = None, thinker: str | None = None,
              out: Path = Path("bench-results/bench.json"), quick: bool = False) -> dict[str, Any]:
    plan = Plan.quick() if quick else Plan()
    config = _load_config(models_dir)
    router_spec = router if router is not None else config.models.router
    thinker_spec = thinker if thinker is not None else config.models.thinker
    models = _models(config, router_spec, thinker_spec)
    mdir = config.models_dir
    t0 = time.monotonic()
    report: dict[str, Any] = {"meta": {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": quick, "host": platform.node(),
        "cpu_count": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "router": router_spec, "thinker": thinker_spec,
        "models_dir": str(mdir), "plan": plan.__dict__,
    }}
    try:
        import llama_cpp

        report["meta"]["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    router_name = next((m.get("name") for m in models if "router" in m["roles"] and m["present"]), None)
    thinker_name = next((m.get("name") for m in models if "thinker" in m["roles"] and m["present"]), None)
    workdir = Path(tempfile.mkdtemp(prefix="edged-bench-"))
    try:
        router_arg = str(next((m["path"] for m in models if "router" in m["roles"] and m["present"]), "")) or None
        thinker_arg = str(next((m["path"] for m in models if "thinker" in m["roles"] and m["present"]), "")) or None
        phases: list[tuple[str, Any]] = [
            ("models", lambda: phase_inprocess(config, models, plan)),
            ("daemon", lambda: phase_daemon(config, models, router_arg, thinker_arg, plan, workdir, mdir)),
            ("peer", lambda: phase_peer(models, report["models"], plan, workdir, full=not quick)),
        ]
        for key, phase in phases:
            try:
                report[key] = phase()
            except Exception as exc:  # one broken phase must not cost the others' figures
                _log(f"phase {key} FAILED: {type(exc).__name__}: {exc}")
                report[key] = {"error": f"{type(exc).__name__}: {exc}"}
        report["derived"] = derive(report, router_name, thinker_name)
    finally:
        report["meta"]["seconds"] = round(time.monotonic() - t0, 1)
        report["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        failed = any(isinstance(report.get(k), dict) and ("error" in report[k] or any(
            isinstance(v, dict) and "error" in v for v in report[k].values())) for k in ("models", "daemon", "peer"))
        report["meta"]["workdir_kept"] = str(workdir) if failed else None
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
        if not failed:  # kept, with the daemons' and the peer's logs, when something went wrong
            shutil.rmtree(workdir, ignore_errors=True)
    return report
