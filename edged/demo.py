"""`scripts/demo`: the main job on an embedded default, end to end on this machine.

Starts a private mosquitto on a free port, the daemon with its default config (Gemma 3 270M stand-in as the tier-1
router, Qwen2.5 0.5B stand-in as the tier-2 thinker, if the files are present), sends the seed's example requests
and a few direct calls, prints each result and one telemetry message, then stops the daemon cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edged.client import EdgedClient
from edged.localproc import free_port, mosquitto_binary, wait_port

REQUESTS: list[dict[str, Any]] = [
    {"id": "seed-1", "query": "What is the weather in Tokyo?"},
    {"id": "seed-2", "query": "Add 25 and 17"},
    {"id": "seed-3", "query": "Find contact info for Alice"},
    {"id": "seed-4", "query": "Weather in London and find Bob's contact"},
    {"id": "chain", "query": "Look up Alice in my contacts, then tell me the weather in her city."},
    {"id": "chat", "query": "Write a haiku about the sea"},
    {"id": "direct-1", "call": {"name": "add_numbers", "arguments": {"a": 25, "b": 17}}},
    {"id": "direct-2", "call": {"name": "get_weather", "arguments": {"city": "Tokyo"}}},
    {"id": "bad", "call": {"name": "launch_rockets", "arguments": {}}},
]






def _mosquitto() -> str:
    found = mosquitto_binary()
    if found is None:
        raise SystemExit("mosquitto is not installed: run scripts/setup (it installs it with apt-get)")
    return found


def _summary(result: dict[str, Any]) -> str:
    parts = [f"status={result.get('status')}", f"tier={result.get('tier')}"]
    for call in result.get("calls") or []:
        outcome = call.get("result") if call.get("error") is None else call["error"]["code"]
        parts.append(f"\n      {call['name']}({json.dumps(call['arguments'])}) -> {json.dumps(outcome)}")
    if result.get("answer"):
        parts.append(f"\n      answer: {result['answer']}")
    if result.get("error"):
        parts.append(f"\n      error: {result['error']['code']}: {result['error']['message']}")
    if result.get("escalations"):
        parts.append(f"\n      escalations: {result['escalations']}")
    total = (result.get("timings_ms") or {}).get("total")
    if total is not None:
        parts.append(f"\n      {total:.0f} ms")
    return " ".join(parts)


def main() -> int:
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="edged-demo-"))
    (work / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n")
    broker = subprocess.Popen([_mosquitto(), "-c", str(work / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    daemon = None
    try:
        wait_port(port)
        env = {**os.environ, "EDGED_MQTT__PORT": str(port), "EDGED_MQTT__HOST": "127.0.0.1",
               "EDGED_DEVICE__ID": "demo", "EDGED_STATE__DIR": str(work / "state"),
               "EDGED_TELEMETRY__INTERVAL_S": "2", "EDGED_LOG__FORMAT": "json"}
        print(f"broker: mosquitto on 127.0.0.1:{port}; daemon log: {work / 'edged.log'}")
        status: dict[str, Any] = {}
        telemetry: list[dict[str, Any]] = []
        got_status = threading.Event()

        def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            body = json.loads(msg.payload)
            if msg.topic.endswith("/status") and body.get("state") in ("online", "degraded"):
                status.update(body)
                got_status.set()
            elif msg.topic.endswith("/telemetry"):
                telemetry.append(body)

        watcher = mqtt.Client(CallbackAPIVersion.VERSION2)
        watcher.on_message = on_message
        watcher.connect("127.0.0.1", port)
        watcher.subscribe([("edged/demo/status", 1), ("edged/demo/telemetry", 0)])
        watcher.loop_start()
        daemon = subprocess.Popen([sys.executable, "-m", "edged", "run"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=open(work / "edged.log", "wb"))
        if not got_status.wait(180):
            raise SystemExit(f"the daemon did not come up; see {work / 'edged.log'}")
        models = {role: m.get("model", m.get("state")) if m.get("state") == "loaded" else m.get("state")
                  for role, m in status.get("models", {}).items()}
        print(f"daemon: {status['state']}, version {status['version']}, models {models}, tools {status['tools']}\n")
        with EdgedClient("127.0.0.1", port) as client:
            for command in REQUESTS:
                label = command.get("query") or f"call {command['call']['name']}"
                result = client.request("demo", command, timeout=180)
                print(f"> {label}\n    {_summary(result)}")
        seen = len(telemetry)
        end = time.monotonic() + 10
        while len(telemetry) <= seen and time.monotonic() < end:
            time.sleep(0.1)
        if telemetry:
            print("\ntelemetry:", json.dumps(telemetry[-1], indent=2))
        watcher.loop_stop()
        watcher.disconnect()
        return 0
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        broker.terminate()
        broker.wait(10)


if __name__ == "__main__":
    raise SystemExit(main())
