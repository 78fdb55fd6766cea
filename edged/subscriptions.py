"""Extra topic filters beyond the command topics: sensor triggers, device confirmations, Home Assistant's birth.

The bus subscribes these filters at every (re)connect and hands each matching message to `offer`, on paho's
network thread: `offer` only queues it. One thread of ours delivers queued messages to the handlers, so a slow or
failing handler can never stall or kill the network thread. Handlers should still be quick (hand heavy work on).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from paho.mqtt.client import topic_matches_sub

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    received: float  # time.monotonic()


Handler = Callable[[Message], None]
_CONNECTED = object()  # queued marker: the bus (re)connected and subscribed


class Subscriptions:
    def __init__(self, queue_size: int = 1000) -> None:
        self._handlers: list[tuple[str, int, Handler]] = []
        self._on_connect: list[Callable[[], None]] = []
        self._queue: queue.Queue[Message | object] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.dropped = 0
        self._last_drop_log = 0.0

    def add(self, topic_filter: str, handler: Handler, qos: int = 0) -> None:
        """Route messages matching `topic_filter` to `handler`; call before the bus connects."""
        self._handlers.append((topic_filter, qos, handler))

    def add_connect_hook(self, hook: Callable[[], None]) -> None:
        """Call `hook` (on our thread) after each connect, e.g. to republish retained discovery configs."""
        self._on_connect.append(hook)

    def filters(self) -> list[tuple[str, int]]:
        """Distinct filters with the highest QoS asked for each, in the order they were added."""
        out: dict[str, int] = {}
        for topic_filter, qos, _ in self._handlers:
            out[topic_filter] = max(qos, out.get(topic_filter, 0))
        return list(out.items())

    # -- network thread: never block, never raise --------------------------------------------------------------

    def matches(self, topic: str) -> bool:
        return any(topic_matches_sub(f, topic) for f, _, _ in self._handlers)

    def offer(self, topic: str, payload: bytes, retain: bool) -> bool:
        """Queue a message for our handlers; False if no filter of ours matches it."""
        if not self.matches(topic):
            return False
        self._put(Message(topic, payload, retain, time.monotonic()))
        return True

    def connected(self) -> None:
        if self._on_connect:
            self._put(_CONNECTED)

    def _put(self, item: Message | object) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log > 10:
                self._last_drop_log = now
                log.warning("subscription_queue_full", dropped=self.dropped)

    # -- our thread ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None and (self._handlers or self._on_connect):
            self._thread = threading.Thread(target=self._loop, name="subscriptions", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is _CONNECTED:
                for hook in self._on_connect:
                    try:
                        hook()
                    except Exception:
                        log.exception("connect_hook_failed")
                continue
            assert isinstance(item, Message)
            for topic_filter, _, handler in self._handlers:
                if topic_matches_sub(topic_filter, item.topic):
                    try:
                        handler(item)
                    except Exception:
                        log.exception("subscription_handler_failed", topic=item.topic, filter=topic_filter)
