"""The MQTT side: a paho-mqtt 2.x client behind a small interface.

Callbacks run on paho's network thread: they catch everything (an exception there kills the thread) and only
hand work over. Commands are acknowledged by hand (`manual_ack`) once their result is safely out.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers
from paho.mqtt.subscribeoptions import SubscribeOptions

from edged.config import Config, MqttConfig
from edged.subscriptions import Subscriptions

log = structlog.get_logger(__name__)


def no_delay(client: mqtt.Client) -> None:
    """Disable Nagle's algorithm: MQTT packets are small, and Nagle plus delayed ACKs adds ~40 ms per exchange."""
    sock = client.socket()
    if isinstance(sock, socket.socket):  # ssl.SSLSocket is one too
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not a TCP socket (e.g. a Unix socket): nothing to tune


def apply_credentials(client: mqtt.Client, cfg: MqttConfig) -> None:
    """Username/password (from the secret file) and TLS with optional client certificate, for any client of ours."""
    password = cfg.resolved_password()
    if cfg.username:
        client.username_pw_set(cfg.username, password.get_secret_value() if password else None)
    if cfg.tls:
        context = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
        if cfg.cert_file:
            context.load_cert_chain(str(cfg.cert_file), str(cfg.key_file) if cfg.key_file else None)
        client.tls_set_context(context)


_CONTENT_TYPE_JSON = b"\x03" + struct.pack("!H", 16) + b"application/json"  # property 3, a UTF-8 string


class PackedProperties:
    """A PUBLISH's v5 properties, packed by hand: Content Type JSON and the Correlation Data, if any.

    paho only ever calls `pack()` on a publish's properties (also when it sends the message again after a
    reconnect), and building and packing its own `Properties` cost ~40 us per result: a tenth of a direct call."""

    __slots__ = ("_packed",)

    def __init__(self, correlation_data: bytes | None) -> None:
        body = _CONTENT_TYPE_JSON
        if correlation_data is not None:  # property 9, binary data (at most 65535 bytes, like the command's own)
            body += b"\x09" + struct.pack("!H", len(correlation_data)) + correlation_data
        self._packed = VariableByteIntegers.encode(len(body)) + body

    def pack(self) -> bytes:
        return self._packed

    def __repr__(self) -> str:
        return f"PackedProperties({self._packed!r})"


@dataclass
class Inbound:
    """A message as received, with what is needed to answer and acknowledge it."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    response_topic: str | None
    correlation_data: bytes | None
    received: float
    dup: bool = False


class MqttBus:
    def __init__(self, config: Config, on_message: Callable[[Inbound], None]) -> None:
        self.config = config
        self._on_inbound = on_message
        self.connected = threading.Event()
        self._v5 = config.mqtt.protocol == "v5"
        self.status_topic = config.topic("status")
        self.cmd_topic = config.topic("cmd")
        self.result_topic = config.topic("result")
        self.telemetry_topic = config.topic("telemetry")
        self.shared_topic = (
            f"$share/{config.mqtt.shared_group}/{config.mqtt.prefix}/pool/cmd" if config.mqtt.shared_group else None
        )
        self.online_payload: Callable[[], dict[str, Any]] = lambda: {"state": "online"}
        self.connects = 0
        self.workers = 2  # the dispatcher's worker threads (it sets this); see receive_maximum()
        self._pending_sub: tuple[int | None, list[str]] = (-1, [])
        # our publish's mid -> (command mid, qos, connection) to acknowledge once the broker has the reply
        self._ack_after: dict[int, tuple[int, int, int, Callable[[], None] | None]] = {}
        self._ack_lock = threading.Lock()
        # extra filters (triggers, device confirmations, HA birth), delivered off the network thread
        self.subscriptions = Subscriptions()
        self._command_topics = {self.cmd_topic, f"{config.mqtt.prefix}/pool/cmd" if self.shared_topic else ""}
        self._client = self._make_client()

    def _make_client(self) -> mqtt.Client:
        cfg = self.config.mqtt
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            clean_session=None if self._v5 else False,
            manual_ack=True,
            reconnect_on_failure=True,
        )
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=max(1, round(cfg.reconnect_min_s)), max_delay=round(cfg.reconnect_max_s))
        apply_credentials(client, cfg)
        will_props = None
        if self._v5:
            will_props = Properties(PacketTypes.WILLMESSAGE)
            will_props.ContentType = "application/json"
        client.will_set(
            self.status_topic,
            json.dumps({"state": "offline", "device": self.config.device.id}),
            qos=1,
            retain=True,
            properties=will_props,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        return client

    # -- lifecycle -------------------------------------------------------------------------------------------

    def receive_maximum(self) -> int:
        """How many unacknowledged commands the broker may push to us at once (MQTT v5 Receive Maximum).

        Derived (`[mqtt] receive_maximum = 0`): the queue plus one per worker, i.e. exactly what the daemon can
        hold. A backlog (say, thousands of commands queued while the device was down) then waits at the broker,
        which feeds us as we acknowledge, instead of overflowing the queue into a flood of 'busy' results. With
        a shared subscription the broker also steers the excess to the devices that have room.

        The trade-off: 'busy' now only happens when the broker sends more than this (a larger configured
        value, or an MQTT 3.1.1 connection, where there is no Receive Maximum and mosquitto's own
        `max_inflight_messages`, 20 by default, applies). Past that, true overload shows up at the broker: its
        per-client queue (`max_queued_messages`) fills and it drops the excess, and commands carrying a Message
        Expiry go stale there. A client that needs an immediate 'busy' rather than waiting sets a larger
        receive_maximum on the device (the broker pushes everything, the daemon answers 'busy' past its queue).
        """
        return self.config.mqtt.receive_maximum or min(65535, self.config.limits.queue_size + self.workers)

    def start(self) -> None:
        cfg = self.config.mqtt
        props = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry_s
            props.ReceiveMaximum = self.receive_maximum()
        self._client.connect_async(
            cfg.host,
            cfg.port,
            keepalive=cfg.keepalive_s,
            clean_start=False if self._v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        self._client.loop_start()

    def stop(self, final_status: dict[str, Any], timeout: float = 5.0) -> None:
        """Publish the final retained status, then disconnect cleanly (no Last Will)."""
        if self.connected.is_set():
            info = self.publish_json(self.status_topic, final_status, retain=True)
            try:
                if not self.wait_published(info, timeout):
                    log.warning("final_status_not_sent")
            except ValueError:
                log.warning("final_status_not_sent")
        props = None
        if self._v5:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = self.config.mqtt.session_expiry_s
        self._client.disconnect(properties=props)
        self._client.loop_stop()

    # -- callbacks (paho network thread: never raise) ---------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        try:
            if reason.is_failure:
                log.warning("mqtt_connect_refused", reason=str(reason))
                return
            no_delay(client)
            self.connects += 1
            names = [self.cmd_topic] + ([self.shared_topic] if self.shared_topic else [])
            subs = [(name, 1) for name in names] + self.subscriptions.filters()
            names = [name for name, _ in subs]
            if self._v5:
                _, mid = client.subscribe([(name, SubscribeOptions(qos=qos)) for name, qos in subs])
            else:
                _, mid = client.subscribe(subs)
            self._pending_sub = (mid, names)
            self.subscriptions.connected()
            self.publish_json(self.status_topic, self.online_payload(), retain=True)
            log.info("mqtt_connected", host=self.config.mqtt.host, port=self.config.mqtt.port,
                     session_present=bool(getattr(flags, "session_present", False)), topics=names)
            # `connected` (and so READY=1) waits for the SUBACK: until then commands sent to us could be lost
        except Exception:
            log.exception("on_connect_failed")

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        try:
            expected, names = self._pending_sub
            if mid != expected:
                return
            refused = [name for name, rc in zip(names, reasons, strict=False) if rc.is_failure]
            if refused:
                log.error("mqtt_subscribe_refused", topics=refused,
                          reasons=[str(rc) for rc in reasons if rc.is_failure])
            self.connected.set()
        except Exception:
            log.exception("on_subscribe_failed")

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        try:
            if reason is not None and getattr(reason, "is_failure", False):
                log.error("mqtt_publish_refused", mid=mid, reason=str(reason),
                          note="the broker refused one of our messages (ACL?)")
            with self._ack_lock:
                pending = self._ack_after.pop(mid, None)
            if pending is not None:
                self._complete(*pending)
        except Exception:
            log.exception("on_publish_failed")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connected.clear()
        log.warning("mqtt_disconnected", reason=str(reason))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic not in self._command_topics and self.subscriptions.offer(
                msg.topic, bytes(msg.payload), bool(msg.retain)
            ):
                self.ack(msg.mid, msg.qos)  # not a command: at most once is the contract for these
                return
            response_topic = correlation = None
            if self._v5 and msg.properties is not None:
                response_topic = getattr(msg.properties, "ResponseTopic", None)
                correlation = getattr(msg.properties, "CorrelationData", None)
            inbound = Inbound(
                topic=msg.topic, payload=bytes(msg.payload), mid=msg.mid, qos=msg.qos,
                response_topic=response_topic or None, correlation_data=correlation,
                received=msg.timestamp, dup=bool(msg.dup),
            )
            self._on_inbound(inbound)
        except Exception:
            log.exception("on_message_failed", topic=getattr(msg, "topic", None))

    # -- publishing ---------------------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None) -> mqtt.MQTTMessageInfo:
        props = cast(Properties, PackedProperties(correlation_data)) if self._v5 else None
        return self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)

    def publish_json(self, topic: str, obj: dict[str, Any], *, retain: bool = False,
                     qos: int = 1) -> mqtt.MQTTMessageInfo:
        return self.publish(topic, json.dumps(obj, default=str).encode(), qos=qos, retain=retain)

    @staticmethod
    def wait_published(info: mqtt.MQTTMessageInfo, timeout: float) -> bool:
        """True once the broker has acknowledged `info` (QoS 1 PUBACK).

        paho's own wait_for_publish raises for a message published while disconnected, although paho keeps it
        and sends it after reconnecting; this waits for that instead. Raises ValueError if paho dropped it.
        """
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise ValueError("outgoing queue full: message dropped")
        with info._condition:
            if not info._published:
                info._condition.wait(timeout)
            return bool(info._published)

    def ack(self, mid: int, qos: int) -> None:
        if qos > 0:
            self._client.ack(mid, qos)

    def reply_then_ack(self, topic: str, payload: bytes, correlation_data: bytes | None, mid: int, qos: int,
                       generation: int, then: Callable[[], None] | None = None) -> None:
        """Publish a reply and acknowledge the command only once the broker has the reply (its PUBACK), without
        blocking: for the network thread. Acknowledging at once lost replies that paho still held (its own
        in-flight window of 20 was full) when the process died: the command was gone, its reply never sent."""
        info = self.publish(topic, payload, correlation_data=correlation_data)
        with self._ack_lock:
            if not info._published:  # is_published() raises for a message queued while disconnected
                self._ack_after[info.mid] = (mid, qos, generation, then)
                return
        self._complete(mid, qos, generation, then)

    def _complete(self, mid: int, qos: int, generation: int, then: Callable[[], None] | None) -> None:
        """The reply is with the broker: record it (`then`), then acknowledge the command it answers."""
        if then is not None:
            then()
        if generation == self.connects:
            self.ack(mid, qos)
        # else: the connection that carried the command is gone; its redelivery is answered from the store

    def pending_replies(self) -> int:
        """Replies published but not yet acknowledged by the broker (their commands still unacknowledged)."""
        with self._ack_lock:
            return len(self._ack_after)
