"""A small request/response client: what `edged ask`, the demo and the tests use to talk to a daemon."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.bus import no_delay


class EdgedClient:
    """Publishes commands with a private MQTT v5 Response Topic and Correlation Data; waits for the results."""

    def __init__(self, host: str = "localhost", port: int = 1883, *, prefix: str = "edged",
                 client_id: str | None = None) -> None:
        self.prefix = prefix
        self.reply_topic = f"{prefix}-client/{uuid.uuid4().hex}/reply"
        self._results: dict[bytes, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or "", protocol=mqtt.MQTTv5)
        self._client.on_message = self._on_message
        self._client.connect(host, port, keepalive=30)
        no_delay(self._client)
        self._client.loop_start()
        done = threading.Event()
        self._client.on_subscribe = lambda *args: done.set()
        self._client.subscribe(self.reply_topic, qos=1)
        if not done.wait(10):
            raise TimeoutError("broker did not confirm the reply subscription")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        try:
            body = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError):
            body = {"raw": msg.payload.decode("utf-8", "replace")}
        with self._cond:
            self._results[corr or b""] = body
            self._cond.notify_all()

    def send(self, device: str, command: dict[str, Any] | bytes) -> bytes:
        """Publish one command (a dict, or raw bytes for testing bad input); returns its correlation key."""
        corr = uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = corr
        payload = command if isinstance(command, bytes) else json.dumps(command).encode()
        self._client.publish(f"{self.prefix}/{device}/cmd", payload, qos=1, properties=props).wait_for_publish(10)
        return corr

    def wait(self, corr: bytes, timeout: float = 30.0) -> dict[str, Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: corr in self._results, timeout):
                raise TimeoutError(f"no result within {timeout} s")
            return self._results.pop(corr)

    def request(self, device: str, command: dict[str, Any] | bytes, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait(self.send(device, command), timeout)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> EdgedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
