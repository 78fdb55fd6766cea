"""Home Assistant MQTT discovery: each edged device appears in Home Assistant with its health sensors.

Configs are retained at `<discovery prefix>/<component>/<node id>/<object id>/config` (Home Assistant's documented
layout), published at every connect and again whenever Home Assistant announces itself on `<prefix>/status` with
`online` (its birth message, after a restart). Every entity's availability is edged's retained status topic (its
Last Will says `offline`, a clean stop `stopped`), read through a value_template because that topic holds JSON.
Readings go, flattened for simple templates, to `<edged prefix>/<device>/ha/state` at each telemetry interval.

`edged ha-remove` publishes empty retained configs to the same topics, which removes the device.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from edged import __version__
from edged.bus import apply_credentials
from edged.subscriptions import Message, Subscriptions

if TYPE_CHECKING:
    from edged.bus import MqttBus
    from edged.config import Config

log = structlog.get_logger(__name__)

AVAILABLE = "{{ 'online' if value_json.state in ('online', 'degraded') else 'offline' }}"


@dataclass(frozen=True)
class Entity:
    object_id: str
    name: str
    component: str = "sensor"
    unit: str | None = None
    device_class: str | None = None
    state_class: str | None = "measurement"
    icon: str | None = None
    precision: int | None = None


ENTITIES: tuple[Entity, ...] = (
    Entity("cpu", "CPU", unit="%", icon="mdi:cpu-64-bit", precision=0),
    Entity("memory", "Memory used", unit="%", icon="mdi:memory", precision=0),
    Entity("rss", "Process memory (RSS)", unit="MiB", device_class="data_size", precision=0),
    Entity("temperature", "Temperature", unit="°C", device_class="temperature", precision=1),
    Entity("requests_per_s", "Requests per second", unit="req/s", icon="mdi:speedometer", precision=2),
    Entity("latency_p50", "Latency p50", unit="ms", device_class="duration", precision=0),
    Entity("tier0_pct", "Direct calls share", unit="%", icon="mdi:call-split", precision=0),
    Entity("tier1_pct", "Tier 1 share", unit="%", icon="mdi:call-split", precision=0),
    Entity("tier2_pct", "Tier 2 share", unit="%", icon="mdi:call-split", precision=0),
    Entity("tier3_pct", "Tier 3 share", unit="%", icon="mdi:call-split", precision=0),
    Entity("queue_depth", "Queue depth", icon="mdi:tray-full"),
    Entity("remote_reachable", "Remote node reachable", component="binary_sensor", device_class="connectivity",
           state_class=None),
    Entity("state", "State", state_class=None, icon="mdi:robot"),
)


def node_id(config: Config) -> str:
    return config.homeassistant.node_id or re.sub(r"[^A-Za-z0-9_-]", "_", config.device.id)


def config_topic(config: Config, entity: Entity) -> str:
    return f"{config.homeassistant.discovery_prefix}/{entity.component}/{node_id(config)}/{entity.object_id}/config"


def config_topics(config: Config) -> list[str]:
    return [config_topic(config, e) for e in ENTITIES]


def discovery_configs(config: Config) -> dict[str, dict[str, Any]]:
    """Discovery topic -> config payload, for every entity of this device."""
    node = node_id(config)
    status_topic = config.topic("status")
    state_topic = config.topic("ha/state")
    device = {
        "identifiers": [f"edged_{node}"],
        "name": f"edged {config.device.id}",
        "manufacturer": "edged",
        "model": "edged daemon",
        "sw_version": __version__,
    }
    expire = max(60, round(config.telemetry.interval_s * 3))
    out: dict[str, dict[str, Any]] = {}
    for entity in ENTITIES:
        body: dict[str, Any] = {
            "name": entity.name,
            "unique_id": f"edged_{node}_{entity.object_id}",
            "device": device,
            "origin": {"name": "edged", "sw_version": __version__},
            "availability": [{"topic": status_topic, "value_template": AVAILABLE,
                              "payload_available": "online", "payload_not_available": "offline"}],
            "entity_category": "diagnostic",
            "qos": 0,
        }
        if entity.object_id == "state":  # straight from the retained status topic, available or not
            body.update(state_topic=status_topic, value_template="{{ value_json.state }}")
            body.pop("availability")
        elif entity.component == "binary_sensor":
            body.update(state_topic=state_topic, payload_on="ON", payload_off="OFF", expire_after=expire,
                        value_template=f"{{{{ 'ON' if value_json.{entity.object_id} else 'OFF' }}}}")
        else:
            body.update(state_topic=state_topic, expire_after=expire,
                        value_template=f"{{{{ value_json.{entity.object_id} }}}}")
        for key, value in (("unit_of_measurement", entity.unit), ("device_class", entity.device_class),
                           ("state_class", entity.state_class), ("icon", entity.icon),
                           ("suggested_display_precision", entity.precision)):
            if value is not None:
                body[key] = value
        out[config_topic(config, entity)] = body
    return out


def _pct(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 1) if whole else 0.0


class Discovery:
    def __init__(self, config: Config, bus: MqttBus, subscriptions: Subscriptions) -> None:
        self.config = config
        self.bus = bus
        self.state_topic = config.topic("ha/state")
        self.birth_topic = f"{config.homeassistant.discovery_prefix}/status"
        self.published = 0  # times the full set of configs went out
        self._prev: tuple[float, int] | None = None
        self._lock = threading.Lock()
        subscriptions.add(self.birth_topic, self._on_birth)
        subscriptions.add_connect_hook(self.publish_configs)

    def publish_configs(self) -> None:
        with self._lock:
            for topic, body in discovery_configs(self.config).items():
                self.bus.publish_json(topic, body, retain=True)
            self.published += 1
        log.info("ha_discovery_published", node=node_id(self.config), entities=len(ENTITIES))

    def _on_birth(self, msg: Message) -> None:
        if msg.payload.strip() == b"online":
            self.publish_configs()

    def state(self, telemetry: dict[str, Any]) -> dict[str, Any]:
        """Telemetry flattened to the entities' fields."""
        res = telemetry.get("resources") or {}
        req = telemetry.get("requests") or {}
        total = int(req.get("requests_total") or 0)
        now = time.monotonic()
        rate = None
        if self._prev is not None and now > self._prev[0]:
            rate = round(max(0, total - self._prev[1]) / (now - self._prev[0]), 3)
        self._prev = (now, total)
        tiers = {str(k): float(v) for k, v in (req.get("tiers") or {}).items()}
        tier_total = sum(tiers.values())
        temps = [float(v) for v in (res.get("temperatures_c") or {}).values() if isinstance(v, int | float)]
        mem_total = res.get("mem_total_bytes") or 0
        remote = telemetry.get("remote")
        reachable = False
        if isinstance(remote, dict):
            if "available" in remote:  # the tier-3 connectivity monitor / circuit breaker
                reachable = bool(remote["available"])
            elif "reachable" in remote:
                reachable = bool(remote["reachable"])
            else:
                reachable = str(remote.get("state", "")).lower() in ("up", "online", "reachable", "connected")
        return {
            "cpu": res.get("cpu_pct"),
            "memory": _pct(mem_total - (res.get("mem_available_bytes") or 0), mem_total) if mem_total else None,
            "rss": round(res["rss_bytes"] / 1048576, 1) if res.get("rss_bytes") else None,
            "temperature": max(temps) if temps else None,
            "requests_per_s": rate,
            "latency_p50": (req.get("latency_ms") or {}).get("p50"),
            **{f"tier{t}_pct": _pct(tiers.get(str(t), 0.0), tier_total) for t in range(4)},
            "queue_depth": (telemetry.get("queue") or {}).get("depth"),
            "remote_reachable": reachable,
        }

    def publish_state(self, telemetry: dict[str, Any]) -> None:
        self.bus.publish_json(self.state_topic, self.state(telemetry), qos=0)


def remove(config: Config, timeout: float = 10.0) -> int:
    """Publish empty retained configs for this device (Home Assistant then deletes its entities); the count sent.

    Uses its own short-lived client id, so a running daemon on this device is not disconnected.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    cfg = config.mqtt
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{config.client_id}-ha-remove",
                         protocol=mqtt.MQTTv5 if cfg.protocol == "v5" else mqtt.MQTTv311)
    apply_credentials(client, cfg)
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive_s)
    client.loop_start()
    try:
        if not connected.wait(timeout):
            raise TimeoutError(f"no answer from the broker {cfg.host}:{cfg.port}")
        infos = [client.publish(topic, b"", qos=1, retain=True) for topic in config_topics(config)]
        end = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.01, end - time.monotonic()))
        sent = sum(1 for info in infos if info.is_published())
    finally:
        client.disconnect()
        client.loop_stop()
    log.info("ha_discovery_removed", node=node_id(config), configs=sent)
    return sent


__all__ = ["ENTITIES", "Discovery", "config_topics", "discovery_configs", "remove"]
