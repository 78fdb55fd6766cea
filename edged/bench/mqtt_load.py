"""The daemon as deployed, measured from outside: a private mosquitto, `edged run` as a subprocess, MQTT clients.

Latency is measured with edged's own MQTT v5 client (publish to result received); bulk throughput of direct calls
with the C clients (`mosquitto_pub -l` / `mosquitto_sub -C`), as a Python load generator is itself the bottleneck.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edged.bench.common import Case, calls_match, percentiles, tool_set
from edged.client import EdgedClient
from edged.localproc import mosquitto_binary, stop_process, wait_port, which


@dataclass
class Broker:
    """A private mosquitto on a free loopback port."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (scripts/setup installs it)")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "max_queued_messages 200000\nset_tcp_nodelay true\n")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / "mosquitto.log", "ab"))
        wait_port(self.port, 10, self.proc)

    def stop(self) -> None:
        stop_process(self.proc, 10)


@dataclass
class DaemonProc:
    """`edged run` with a NOTIFY_SOCKET of our own: the time from exec to READY=1 is measured, not guessed."""

    broker: Broker
    workdir: Path
    device: str
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    ready_s: float | None = None
    notify_dir: str | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.device}.log"

    def start(self, timeout: float = 180.0) -> float:
        # AF_UNIX paths are limited to ~108 bytes: a short directory of our own
        self.notify_dir = tempfile.mkdtemp(prefix="edb-")
        sock_path = os.path.join(self.notify_dir, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(sock_path)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGED_", "NOTIFY_SOCKET", "WATCHDOG"))}
            env.update({
                "EDGED_MQTT__HOST": "127.0.0.1", "EDGED_MQTT__PORT": str(self.broker.port),
                "EDGED_DEVICE__ID": self.device, "EDGED_STATE__DIR": str(self.workdir / f"state-{self.device}"),
                "EDGED_LOG__FORMAT": "json", "EDGED_LOG__LEVEL": "warning", "NOTIFY_SOCKET": sock_path,
                # throughput measures what the workers finish, not admission: the C clients' flood would otherwise
                # be mostly answered `busy` by the 64-slot default queue (tests/test_reliability covers that)
                "EDGED_LIMITS__QUEUE_SIZE": "20000",
            })
            env.update(self.env)
            t0 = time.monotonic()
            self.proc = subprocess.Popen([sys.executable, "-m", "edged", "run"], env=env,
                                         stdout=subprocess.DEVNULL, stderr=open(self.log_path, "ab"))
            end = t0 + timeout
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no READY=1 within {timeout} s; see {self.log_path}")
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {self.proc.returncode}: {self._tail()}")
                sock.settimeout(min(left, 0.5))
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    continue
                if b"READY=1" in data.split(b"\n"):
                    self.ready_s = time.monotonic() - t0
                    return self.ready_s
        finally:
            sock.close()

    def _tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc, 20)
        if self.notify_dir:
            import shutil

            shutil.rmtree(self.notify_dir, ignore_errors=True)


def _uid() -> str:
    return uuid.uuid4().hex[:10]


def wait_serving(client: EdgedClient, device: str, timeout: float = 30.0) -> None:
    """READY=1 means connected; the first answered direct call means subscribed and serving."""
    end = time.monotonic() + timeout
    while True:
        try:
            client.request(device, {"id": f"ping-{_uid()}", "call": {"name": "add_numbers",
                                                                       "arguments": {"a": 1, "b": 2}}}, timeout=2.0)
            return
        except TimeoutError:
            if time.monotonic() > end:
                raise


def _query(case: Case, tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"id": f"{case.id}-{_uid()}", "query": case.query, "tools": tools if tools is not None else case.tools}


def e2e_latency(client: EdgedClient, device: str, cases: list[Case], runs: int, warmup: int,
                budget_s: float, inproc: Callable[[Case], float] | None = None) -> dict[str, Any]:
    """Per case: publish -> result received (ms), and the daemon's own `route` time for the same requests.

    `inproc` (the same request routed in this process, ms) is timed right before each request, one after the other:
    the daemon's overhead is a ratio of neighbours, not of phases minutes apart on a machine whose speed drifts."""
    per_case: dict[str, Any] = {}
    end = time.monotonic() + budget_s
    for case in cases:
        for _ in range(warmup):
            client.request(device, _query(case), timeout=60)
        e2e: list[float] = []
        route: list[float] = []
        total: list[float] = []
        paired: list[float] = []
        last: dict[str, Any] = {}
        for i in range(runs):
            if i and time.monotonic() > end:
                break
            if inproc is not None:
                paired.append(round(inproc(case), 3))
            t0 = time.perf_counter()
            last = client.request(device, _query(case), timeout=60)
            e2e.append(round((time.perf_counter() - t0) * 1000, 3))
            timings = last.get("timings_ms") or {}
            if "route" in timings:
                route.append(float(timings["route"]))
            if "total" in timings:
                total.append(float(timings["total"]))
        calls = [{"name": c["name"], "arguments": c["arguments"]} for c in last.get("calls") or []]
        per_case[case.id] = {"multi": case.multi, "e2e_ms": percentiles(e2e), "route_ms": percentiles(route),
                             "daemon_total_ms": percentiles(total), "e2e_samples": e2e, "route_samples": route,
                             "inproc_samples": paired,
                             "status": last.get("status"), "tier": last.get("tier"),
                             "match": calls_match(calls, case.expected)}
    out: dict[str, Any] = {"cases": per_case}
    for label, multi in (("single_tool", False), ("two_tool", True)):
        chosen = [c for c in per_case.values() if c["multi"] is multi]
        out[label] = {
            "e2e_ms": percentiles([s for c in chosen for s in c["e2e_samples"]]),
            "route_ms": percentiles([s for c in chosen for s in c["route_samples"]]),
            "inproc_ms": percentiles([s for c in chosen for s in c["inproc_samples"]]),
        }
    return out


def routed_throughput(port: int, device: str, cases: list[Case], sequential: int, clients: int, per_client: int,
                      budget_s: float) -> dict[str, Any]:
    """Routed requests per second: one client one request at a time, then `clients` clients at once."""
    singles = [c for c in cases if not c.multi] or cases
    out: dict[str, Any] = {}
    with EdgedClient("127.0.0.1", port) as client:
        t0 = time.perf_counter()
        done = 0
        end = time.monotonic() + budget_s
        for i in range(sequential):
            if i and time.monotonic() > end:
                break
            client.request(device, _query(singles[i % len(singles)]), timeout=60)
            done += 1
        elapsed = time.perf_counter() - t0
        out["sequential"] = {"requests": done, "seconds": round(elapsed, 3), "rps": round(done / elapsed, 2)}
    made = [EdgedClient("127.0.0.1", port) for _ in range(clients)]
    counts = [0] * clients
    errors: list[str] = []

    def work(k: int) -> None:
        try:
            for i in range(per_client):
                if i and time.monotonic() > stop_at:
                    break
                made[k].request(device, _query(singles[(i + k) % len(singles)]), timeout=60)
                counts[k] += 1
        except Exception as exc:  # reported, not raised: one client's timeout must not hide the others' figures
            errors.append(f"{type(exc).__name__}: {exc}")

    try:
        stop_at = time.monotonic() + budget_s
        threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(clients)]
        t1 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(budget_s + 120)
        elapsed = time.perf_counter() - t1
    finally:
        for c in made:
            c.close()
    total = sum(counts)
    out["concurrent"] = {"clients": clients, "requests": total, "seconds": round(elapsed, 3),
                         "rps": round(total / elapsed, 2) if elapsed else None, "errors": errors[:3]}
    return out


def direct_throughput(port: int, device: str, n: int, timeout: float = 60.0, prefix: str = "edged") -> dict[str, Any]:
    """Direct tool calls through mosquitto with the C clients: `mosquitto_pub -l` fed n lines, `mosquitto_sub -C n`."""
    pub_bin = which("mosquitto_pub")
    sub_bin = which("mosquitto_sub")
    if pub_bin is None or sub_bin is None:
        return {"skipped": "mosquitto-clients are not installed"}
    tag = _uid()
    reply = f"bench/{tag}/replies"
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for i in range(n):
            f.write(json.dumps({"id": f"d{i}-{tag}", "call": {"name": "add_numbers",
                                                             "arguments": {"a": i, "b": 1}}}) + "\n")
        lines_file = f.name
    # stdout to a pipe is block-buffered: line-buffer it (stdbuf) to see the SUBACK; the end is the process's exit
    stdbuf = which("stdbuf")
    cmd = [sub_bin, "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "-q", "1", "-t", reply, "-C", str(n), "-d"]
    sub = subprocess.Popen([stdbuf, "-oL", *cmd] if stdbuf else cmd, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    pub: subprocess.Popen[bytes] | None = None
    subscribed = threading.Event()
    state: dict[str, int] = {"replies": 0, "ok": 0, "busy": 0, "other": 0}

    def read() -> None:
        assert sub.stdout is not None
        for line in sub.stdout:
            if line.startswith("{"):
                state["replies"] += 1
                try:
                    status = json.loads(line).get("status")
                except ValueError:
                    status = None
                state[status if status in ("ok", "busy") else "other"] += 1
            elif "SUBACK" in line:
                subscribed.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not subscribed.wait(10 if stdbuf else 1.0) and stdbuf:
            return {"skipped": "mosquitto_sub got no SUBACK"}
        t0 = time.perf_counter()
        with open(lines_file, "rb") as stdin:
            pub = subprocess.Popen([pub_bin, "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "-q", "1",
                                    "-t", f"{prefix}/{device}/cmd", "-D", "publish", "response-topic", reply, "-l"],
                                   stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            sub.wait(timeout)  # -C n: it exits once the n-th reply is in
        except subprocess.TimeoutExpired:
            pass
        elapsed = time.perf_counter() - t0
        complete = sub.poll() == 0
        reader.join(5)
        return {"commands": n, "replies": state["replies"], "ok": state["ok"], "busy": state["busy"],
                "other": state["other"], "seconds": round(elapsed, 3),
                "calls_per_s": round(state["ok"] / elapsed, 1) if elapsed else None,
                "replies_per_s": round(state["replies"] / elapsed, 1) if elapsed else None,
                "complete": complete}
    finally:
        stop_process(pub, 5)
        stop_process(sub, 5)
        os.unlink(lines_file)


def tool_growth(client: EdgedClient, device: str, sizes: list[int], runs: int, budget_s: float) -> dict[str, Any]:
    """Warm p50 of one single-tool request as the command's own `tools` grow (seed's 3 + synthetic ones).

    The sizes take turns, run by run: on a machine whose speed drifts by tens of percent over a minute, sizes
    measured one after another would compare minutes, not tool sets. Each timed request follows an untimed one
    with the same tools, so it is measured as in steady use (the tool prompt already in the context), not the
    switch between tool sets, which `switch_ms` reports."""
    case = Case("growth", "What is the weather in Tokyo?", [],
                [{"name": "get_weather", "arguments": {"city": "Tokyo"}}])
    tool_sets = {size: tool_set(size) for size in sizes}
    cold: dict[int, float] = {}
    for size, tools in tool_sets.items():
        first = time.perf_counter()
        client.request(device, _query(case, tools), timeout=120)  # evaluates the new tool prompt
        cold[size] = round((time.perf_counter() - first) * 1000, 3)
    e2e: dict[int, list[float]] = {size: [] for size in sizes}
    route: dict[int, list[float]] = {size: [] for size in sizes}
    switch: dict[int, list[float]] = {size: [] for size in sizes}
    last: dict[int, dict[str, Any]] = {}
    end = time.monotonic() + budget_s
    for i in range(runs):
        if i and time.monotonic() > end:
            break
        for size, tools in tool_sets.items():
            t0 = time.perf_counter()
            client.request(device, _query(case, tools), timeout=60)  # back to this tool set: untimed for e2e
            switch[size].append(round((time.perf_counter() - t0) * 1000, 3))
            t0 = time.perf_counter()
            last[size] = client.request(device, _query(case, tools), timeout=60)
            e2e[size].append(round((time.perf_counter() - t0) * 1000, 3))
            if "route" in (last[size].get("timings_ms") or {}):
                route[size].append(float(last[size]["timings_ms"]["route"]))
    out: dict[str, Any] = {}
    for size in sizes:
        result = last.get(size, {})
        calls = [{"name": c["name"], "arguments": c["arguments"]} for c in result.get("calls") or []]
        out[str(size)] = {"tools": size, "cold_ms": cold[size], "switch_ms": percentiles(switch[size]),
                          "e2e_ms": percentiles(e2e[size]), "route_ms": percentiles(route[size]),
                          "status": result.get("status"), "error": (result.get("error") or {}).get("code"),
                          "match": calls_match(calls, case.expected)}
    return out


def resources(pid: int, idle_s: float) -> dict[str, Any]:
    """RSS now and CPU use over `idle_s` seconds of no requests (percent of one core)."""
    import psutil

    proc = psutil.Process(pid)
    rss = proc.memory_info().rss
    cpu0 = proc.cpu_times()
    t0 = time.monotonic()
    time.sleep(idle_s)
    cpu1 = proc.cpu_times()
    wall = time.monotonic() - t0
    busy = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {"rss_bytes": rss, "rss_after_idle_bytes": proc.memory_info().rss, "idle_s": round(wall, 2),
            "idle_cpu_percent": round(100 * busy / wall, 2), "threads": proc.num_threads()}
