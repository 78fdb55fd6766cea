"""Home automation through a real mosquitto: config-declared MQTT tools against a simulated zigbee2mqtt light,
sensor triggers (condition, debounce, rate limit), and Home Assistant discovery."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import MODELS_DIR, QWEN, REPO, Broker, Daemon
from paho.mqtt.enums import CallbackAPIVersion

from edged.config import Config
from edged.discovery import ENTITIES, discovery_configs

pytestmark = pytest.mark.mqtt

CONFIG = """
[[mqtt_tools]]
name = "set_light"
description = "Switch the light of a room on or off"
topic = "zigbee2mqtt/{room}_light/set"
payload = { state = "{state}", transition = 0 }
confirm_topic = "zigbee2mqtt/{room}_light"
confirm_match = { state = "{state}" }
confirm_timeout_s = 1.5
examples = [{ request = "switch off the bedroom light", arguments = { room = "bedroom", state = "OFF" } }]
[mqtt_tools.parameters]
type = "object"
required = ["room", "state"]
[mqtt_tools.parameters.properties.room]
type = "string"
enum = ["kitchen", "bedroom", "garage"]
description = "The room"
[mqtt_tools.parameters.properties.state]
type = "string"
enum = ["ON", "OFF"]
description = "ON to switch the light on, OFF to switch it off"

[[mqtt_tools]]
name = "tasmota_power"
description = "Send a power command to a Tasmota plug"
topic = "cmnd/{device}/POWER"
payload = "{state}"
[mqtt_tools.parameters]
type = "object"
required = ["device", "state"]
properties = { device = { type = "string" }, state = { type = "string", enum = ["ON", "OFF", "TOGGLE"] } }

[[mqtt_tools]]
name = "show_text"
description = "Show a text on a display"
topic = "display/{screen}/set"
payload = { text = "{text}", from = "edged", size = "{size}" }
[mqtt_tools.parameters]
type = "object"
required = ["screen", "text"]
[mqtt_tools.parameters.properties]
screen = { type = "string" }
text = { type = "string", maxLength = 200 }
size = { type = "integer", minimum = 1, maximum = 9 }

[[triggers]]
name = "too_hot"
topic = "sensors/+/temperature"
when = { field = "temperature", op = ">", value = 28 }
call = { name = "set_light", arguments = { room = "{topic.1}", state = "ON" } }
debounce_s = 1.0
rate_per_min = 6000
burst = 100

[[triggers]]
name = "humid"
topic = "sensors/+/humidity"
call = { name = "set_light", arguments = { room = "{topic.1}", state = "ON" } }
debounce_s = 0
rate_per_min = 1
burst = 2
"""


class FakeLight:
    """A zigbee2mqtt-style light: applies `zigbee2mqtt/<name>/set` and publishes its new state (retained) on
    `zigbee2mqtt/<name>`, as zigbee2mqtt does. A silent light takes commands and never answers."""

    def __init__(self, port: int, name: str, silent: bool = False) -> None:
        self.name = name
        self.silent = silent
        self.state: dict[str, Any] = {"state": "OFF", "brightness": 254}
        self.commands: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"light-{name}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(f"zigbee2mqtt/{name}/set", qos=1)
        assert subscribed.wait(10)
        self.client.publish(f"zigbee2mqtt/{name}", json.dumps(self.state), qos=1, retain=True).wait_for_publish(5)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            command = json.loads(msg.payload)
        except ValueError:
            return
        with self._lock:
            self.commands.append(command)
            if self.silent:
                return
            self.state.update({k: v for k, v in command.items() if k in ("state", "brightness")})
            state = dict(self.state)
        client.publish(f"zigbee2mqtt/{self.name}", json.dumps(state), qos=1, retain=True)

    def count(self) -> int:
        with self._lock:
            return len(self.commands)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def lights(broker: Broker) -> Iterator[dict[str, FakeLight]]:
    made = {name: FakeLight(broker.port, f"{name}_light", silent=name == "garage")
            for name in ("kitchen", "bedroom", "garage")}
    yield made
    for light in made.values():
        light.close()


@pytest.fixture
def home(broker: Broker, tmp_path: Path) -> Iterator[Any]:
    """home(**env) -> a daemon running CONFIG (plus EDGED_* overrides), stopped at the end."""
    started: list[Daemon] = []
    path = tmp_path / "edged.toml"
    path.write_text(CONFIG)

    def make(**env: str) -> Daemon:
        d = Daemon(broker, tmp_path, "dev1", dict(env), args=["--config", str(path)])
        started.append(d)
        d.start()
        return d

    yield make
    for d in started:
        d.stop()


def call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


# -- MQTT tools -----------------------------------------------------------------------------------------------------

def test_config_file_is_valid() -> None:
    import tomllib

    config = Config.model_validate(tomllib.loads(CONFIG))
    assert [t.name for t in config.mqtt_tools] == ["set_light", "tasmota_power", "show_text"]


def test_readme_and_example_configs_are_valid() -> None:
    import tomllib

    section = (REPO / "README.md").read_text().split("## Home automation", 1)[1]
    config = Config.model_validate(tomllib.loads(section.split("```toml", 1)[1].split("```", 1)[0]))
    assert len(config.mqtt_tools) == 2 and len(config.triggers) == 1 and config.homeassistant.enabled
    example = (REPO / "systemd" / "edged.toml.example").read_text().split("# Home automation", 1)[1]
    uncommented = "\n".join(line.removeprefix("# ") for line in example.splitlines()[1:] if line.startswith("# "))
    config = Config.model_validate(tomllib.loads(uncommented))
    assert config.mqtt_tools[0].name == "set_light" and config.triggers[0].call is not None


def test_direct_call_switches_the_light_and_returns_its_confirmed_state(home, lights, client, listen) -> None:
    status = listen("edged/dev1/status")
    home()
    tools = status.wait_json("edged/dev1/status")["tools"]
    assert {"set_light", "tasmota_power", "show_text", "add_numbers"} <= set(tools)

    result = client.request("dev1", {"id": "l1", "call": call("set_light", room="kitchen", state="ON")})
    assert result["status"] == "ok", result
    confirmed = result["calls"][0]["result"]
    assert confirmed["confirmed"] is True and confirmed["topic"] == "zigbee2mqtt/kitchen_light"
    assert confirmed["state"] == {"state": "ON", "brightness": 254}  # what the device reported, not what we sent
    assert lights["kitchen"].commands == [{"state": "ON", "transition": 0}]
    assert lights["kitchen"].state["state"] == "ON"
    # and off again: the retained "ON" from before is never taken for the confirmation of "OFF"
    result = client.request("dev1", {"id": "l2", "call": call("set_light", room="kitchen", state="OFF")})
    assert result["status"] == "ok" and result["calls"][0]["result"]["state"]["state"] == "OFF", result


def test_a_light_that_never_answers_is_device_timeout(home, lights, client) -> None:
    home()
    t0 = time.monotonic()
    result = client.request("dev1", {"id": "g1", "call": call("set_light", room="garage", state="ON")})
    elapsed = time.monotonic() - t0
    assert result["status"] == "error" and result["error"]["code"] == "device_timeout", result
    assert result["error"]["details"]["confirm_topic"] == "zigbee2mqtt/garage_light"
    assert lights["garage"].commands == [{"state": "ON", "transition": 0}]  # it was sent, never confirmed
    assert 1.4 < elapsed < 5


def test_topic_arguments_cannot_change_the_topic(home, client, listen) -> None:
    home()
    spy = listen("cmnd/#", "display/#")
    for i, device in enumerate(["plug/../other", "plug/1", "#", "plug#", "+", "a+b", "", "nul\x00x", "x" * 300]):
        result = client.request("dev1", {"id": f"t{i}", "call": call("tasmota_power", device=device, state="ON")})
        assert result["status"] == "error" and result["error"]["code"] == "invalid_arguments", (device, result)
    result = client.request("dev1", {"id": "d1", "call": call("show_text", screen="a/b", text="x")})
    assert result["error"]["code"] == "invalid_arguments", result
    # a legitimate call still goes out, and it is the only message that does
    ok = client.request("dev1", {"id": "ok", "call": call("tasmota_power", device="plug_1", state="TOGGLE")})
    assert ok["status"] == "ok" and ok["calls"][0]["result"]["topic"] == "cmnd/plug_1/POWER", ok
    spy.wait_for(lambda m: m.topic == "cmnd/plug_1/POWER")
    time.sleep(0.2)
    assert [(m.topic, m.payload) for m in spy.messages] == [("cmnd/plug_1/POWER", b"TOGGLE")]


def test_payload_is_filled_as_json_values(home, client, listen) -> None:
    home()
    spy = listen("display/#")
    hostile = 'hi", "from": "attacker", "x": {"y": 1} }\\'
    result = client.request("dev1", {"id": "p1", "call": call("show_text", screen="hall", text=hostile, size=3)})
    assert result["status"] == "ok", result
    sent = json.loads(spy.wait_for(lambda m: m.topic == "display/hall/set").payload)
    assert sent == {"text": hostile, "from": "edged", "size": 3}  # a number stays a number
    client.request("dev1", {"id": "p2", "call": call("show_text", screen="hall", text="no size")})
    second = spy.wait_for(lambda m: m.topic == "display/hall/set" and b"no size" in m.payload)
    assert json.loads(second.payload) == {"text": "no size", "from": "edged"}  # an optional argument left out
    bad = client.request("dev1", {"id": "p3", "call": call("show_text", screen="hall", text="x", size="3; rm")})
    assert bad["error"]["code"] == "invalid_arguments"


@pytest.mark.model
@pytest.mark.slow
def test_turn_on_the_kitchen_light_in_natural_language(home, lights, client) -> None:
    if not QWEN.exists():
        pytest.skip(f"{QWEN} missing: run scripts/setup (edged models fetch)")
    # a small tool set keeps the prompt (and the warm-up on a busy 2-core box) short: the light and two built-ins
    home(EDGED_MODELS__ROUTER="qwen2.5-coder-0.5b", EDGED_MODELS__N_THREADS="2", EDGED_MODELS_DIR=str(MODELS_DIR),
         EDGED_TOOLS__ALLOW='["set_light", "get_weather", "add_numbers"]')
    result = client.request("dev1", {"id": "nl1", "query": "turn on the kitchen light"}, timeout=60)
    assert result["status"] == "ok" and result["tier"] == 1, result
    first = result["calls"][0]
    assert first["name"] == "set_light" and first["arguments"] == {"room": "kitchen", "state": "ON"}, result
    assert first["result"]["state"]["state"] == "ON"
    assert lights["kitchen"].state["state"] == "ON" and lights["bedroom"].count() == 0


# -- triggers -------------------------------------------------------------------------------------------------------

def test_trigger_debounces_readings_into_one_actuation_per_window(home, lights, listen) -> None:
    home()
    out = listen("edged/dev1/triggers/#")
    sensor = listen()
    for _ in range(5):  # below the threshold: nothing happens
        sensor.publish("sensors/kitchen/temperature", json.dumps({"temperature": 21.5}))
    sensor.publish("sensors/kitchen/temperature", b"not json")
    t0 = time.monotonic()
    sent = 0
    while time.monotonic() - t0 < 2.45:  # 25 hot readings over ~2.5 debounce windows of 1 s
        sensor.publish("sensors/kitchen/temperature", json.dumps({"temperature": 30 + sent % 3, "battery": 90}))
        sent += 1
        time.sleep(0.1)
    first = out.wait_json("edged/dev1/triggers/too_hot")
    assert first["topic"] == "sensors/kitchen/temperature"
    assert first["request"] == {"name": "set_light", "arguments": {"room": "kitchen", "state": "ON"}}
    assert first["result"]["status"] == "ok" and first["result"]["calls"][0]["result"]["state"]["state"] == "ON"
    time.sleep(0.5)
    runs = lights["kitchen"].count()
    assert sent >= 20 and 2 <= runs <= 3, (sent, runs)
    assert len(out.json("edged/dev1/triggers/too_hot")) == runs
    telemetry = listen("edged/dev1/telemetry").wait_json(
        "edged/dev1/telemetry", lambda b: b["triggers"]["too_hot"]["runs"] == runs)
    stats = telemetry["triggers"]["too_hot"]
    assert stats["skipped"] == 6 and stats["debounced"] == sent - runs and stats["ok"] == runs, stats
    assert telemetry["requests"]["requests_total"] >= runs  # counted with the other requests


def test_trigger_rate_limit_holds_under_a_burst(home, lights, listen) -> None:
    home()
    sensor = listen()
    for i in range(20):  # no debounce; a bucket of 2 that refills at 1 per minute
        sensor.publish("sensors/bedroom/humidity", json.dumps({"humidity": 60 + i}))
    def settled(body: dict[str, Any]) -> bool:
        return bool(body["triggers"]["humid"]["messages"] == 20 and body["triggers"]["humid"]["runs"] == 2)

    telemetry = listen("edged/dev1/telemetry").wait_json("edged/dev1/telemetry", settled)
    stats = telemetry["triggers"]["humid"]
    assert stats["rate_limited"] == 18 and stats["ok"] == 2, stats
    assert lights["bedroom"].count() == 2


# -- Home Assistant discovery ---------------------------------------------------------------------------------------

SENSOR_DEVICE_CLASSES = {"temperature", "data_size", "duration"}  # used here, from HA's sensor device classes
UNITS = {"temperature": {"°C", "°F", "K"}, "data_size": {"B", "kB", "MB", "GB", "KiB", "MiB", "GiB"},
         "duration": {"d", "h", "min", "s", "ms", "µs"}}


def _render(template: str, payload: bytes) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment().from_string(template).render(value_json=json.loads(payload)).strip()


def _configs(listener: Any) -> dict[str, Any]:
    return {m.topic: m for m in listener.messages if m.topic.endswith("/config")}


def test_home_assistant_discovery(daemon_factory, broker, listen) -> None:
    ha = listen("homeassistant/#", "edged/dev1/status", "edged/dev1/ha/state")
    d = daemon_factory.make(EDGED_HOMEASSISTANT__ENABLED="true")
    expected = discovery_configs(Config.model_validate({"device": {"id": "dev1"}, "telemetry": {"interval_s": 1}}))
    assert len(expected) == len(ENTITIES) >= 12
    ha.wait_for(lambda m: len(_configs(ha)) == len(expected), what="every discovery config")

    # retained: a Home Assistant that subscribes later gets them all at once
    late = listen("homeassistant/+/dev1/+/config")
    late.wait_for(lambda m: len(late.messages) == len(expected), what="retained configs")
    assert all(m.retain for m in late.messages)
    status = ha.wait_for(lambda m: m.topic == "edged/dev1/status").payload
    state = ha.wait_for(lambda m: m.topic == "edged/dev1/ha/state", timeout=10).payload

    unique_ids = set()
    for topic, msg in _configs(late).items():
        body = json.loads(msg.payload)
        prefix, component, node, object_id, leaf = topic.split("/")
        assert (prefix, node, leaf) == ("homeassistant", "dev1", "config") and component in ("sensor", "binary_sensor")
        assert body == expected[topic]
        unique_ids.add(body["unique_id"])
        assert body["unique_id"] == f"edged_dev1_{object_id}"
        assert body["device"]["identifiers"] == ["edged_dev1"] and body["device"]["name"] == "edged dev1"
        assert body["device"]["manufacturer"] == "edged" and body["device"]["sw_version"]
        if object_id == "state":  # the status itself: always readable
            assert body["state_topic"] == "edged/dev1/status" and _render(body["value_template"], status) == "online"
            continue
        assert body["state_topic"] == "edged/dev1/ha/state"
        (avail,) = body["availability"]
        assert avail["topic"] == "edged/dev1/status" and avail["payload_available"] == "online"
        assert _render(avail["value_template"], status) == "online"
        assert _render(avail["value_template"], b'{"state": "degraded"}') == "online"
        for gone in (b'{"state": "offline"}', b'{"state": "stopped"}'):
            assert _render(avail["value_template"], gone) == "offline"
        value = _render(body["value_template"], state)
        if component == "binary_sensor":
            assert body["device_class"] == "connectivity" and value in (body["payload_on"], body["payload_off"])
            continue
        assert body["state_class"] == "measurement"
        if "device_class" in body:
            assert body["device_class"] in SENSOR_DEVICE_CLASSES
            assert body["unit_of_measurement"] in UNITS[body["device_class"]]
        if object_id != "queue_depth":
            assert body["unit_of_measurement"]
        if object_id in ("cpu", "memory", "rss", "queue_depth", "tier0_pct"):
            float(value)  # a number; the others may render "None" (no requests yet), which HA shows as unknown
    assert len(unique_ids) == len(expected)

    # Home Assistant restarts: its birth message brings every config again
    before = len([m for m in ha.messages if m.topic.endswith("/config")])
    ha.publish("homeassistant/status", b"online", qos=0)
    ha.wait_for(lambda m: len([m for m in ha.messages if m.topic.endswith("/config")]) == before + len(expected),
                what="republished configs")
    ha.publish("homeassistant/status", b"offline", qos=0)
    time.sleep(0.3)
    assert len([m for m in ha.messages if m.topic.endswith("/config")]) == before + len(expected)

    # removal: empty retained configs, and a newcomer finds nothing
    d.stop()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
    env.update(EDGED_MQTT__HOST="127.0.0.1", EDGED_MQTT__PORT=str(broker.port), EDGED_DEVICE__ID="dev1")
    out = subprocess.run([sys.executable, "-m", "edged", "ha-remove"], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    ha.wait_for(lambda m: sum(1 for x in ha.messages if x.topic.endswith("/config") and x.payload == b"")
                == len(expected), what="empty configs")
    after = listen("homeassistant/#")
    time.sleep(0.5)
    assert after.messages == []


def test_ha_state_is_flattened_from_telemetry() -> None:
    from edged.discovery import Discovery
    from edged.subscriptions import Subscriptions

    disc = Discovery(Config.model_validate({"device": {"id": "dev.1"}}), None, Subscriptions())  # type: ignore[arg-type]
    telemetry = {
        "resources": {"cpu_pct": 12.5, "mem_total_bytes": 1000, "mem_available_bytes": 250, "rss_bytes": 3 << 20,
                      "temperatures_c": {"cpu/0": 51.0, "soc/1": 48.5}},
        "requests": {"requests_total": 10, "tiers": {"0": 2, "1": 6, "2": 2}, "latency_ms": {"p50": 120.0}},
        "queue": {"depth": 1},
        "remote": {"state": "open", "available": False},
    }
    first = disc.state(telemetry)
    assert first["cpu"] == 12.5 and first["memory"] == 75.0 and first["rss"] == 3.0 and first["temperature"] == 51.0
    assert (first["tier0_pct"], first["tier1_pct"], first["tier2_pct"], first["tier3_pct"]) == (20.0, 60.0, 20.0, 0.0)
    assert first["latency_p50"] == 120.0 and first["queue_depth"] == 1 and first["remote_reachable"] is False
    assert first["requests_per_s"] is None  # a rate needs two readings
    telemetry["requests"]["requests_total"] = 40  # type: ignore[index]
    telemetry["remote"] = {"state": "closed", "available": True}
    time.sleep(0.05)
    second = disc.state(telemetry)
    assert second["requests_per_s"] > 0 and second["remote_reachable"] is True
    assert all(topic.split("/")[2] == "dev_1" for topic in discovery_configs(disc.config))  # HA's node_id charset
