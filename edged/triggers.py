"""Triggers: sensor messages that start requests.

A trigger subscribes to a topic filter; each message (past an optional condition on its JSON payload, a debounce
window and a token-bucket rate limit) becomes a request: a `query` template run through the model tiers, or a
direct `call` with argument templates. Templates know {topic}, {payload}, {topic.N} (level N, from 0) and the
fields of a JSON payload ({temperature}, {battery.level}).

Messages arrive on the bus's subscription thread, where only the cheap checks run; requests are queued (bounded)
to one worker thread of our own, so a chatty sensor can neither block the MQTT network thread nor flood the models.
Results go to the trigger's result topic and into the request counters of the telemetry.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import ValidationError

from edged.protocol import Command, ToolCall
from edged.subscriptions import Message, Subscriptions
from edged.tools.mqtt_tools import _MISSING, fill_structure, fill_text, get_path, placeholders

if TYPE_CHECKING:
    from edged.bus import MqttBus
    from edged.config import Config, TriggerCondition, TriggerConfig
    from edged.pipeline import Pipeline
    from edged.telemetry import Metrics

log = structlog.get_logger(__name__)

MAX_PAYLOAD_TEXT = 2000  # characters of a payload put into a query


def check_trigger_config(cfg: TriggerConfig) -> None:
    """Config-time checks (raise ValueError): a valid filter and exactly one of query or call."""
    if (cfg.query is None) == (cfg.call is None):
        raise ValueError("a trigger has exactly one of 'query' or 'call'")
    levels = cfg.topic.split("/")
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and (level != "#" or i != len(levels) - 1)):
            raise ValueError(f"topic {cfg.topic!r}: '+' must be a whole level, '#' the whole last level")
    if "\x00" in cfg.topic:
        raise ValueError("topic: NUL is not allowed")
    if cfg.query is not None and "{" in fill_text(cfg.query, lambda name: ""):
        raise ValueError("query: a placeholder is {name} with letters, digits, '_' and '.'")


class TokenBucket:
    def __init__(self, rate_per_s: float, capacity: int) -> None:
        self.rate = rate_per_s
        self.capacity = float(capacity)
        self.tokens = float(capacity)
        self.stamp = time.monotonic()

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def condition_holds(cond: TriggerCondition, body: Any) -> bool:
    value = get_path(body, cond.field)
    if value is _MISSING:
        return False
    if cond.op == "==":
        return bool(value == cond.value)
    if cond.op == "!=":
        return bool(value != cond.value)
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (value, cond.value))
    texts = isinstance(value, str) and isinstance(cond.value, str)
    if not (numbers or texts):
        return False
    if cond.op == ">":
        return bool(value > cond.value)
    if cond.op == ">=":
        return bool(value >= cond.value)
    if cond.op == "<":
        return bool(value < cond.value)
    return bool(value <= cond.value)


@dataclass
class TriggerStats:
    messages: int = 0
    skipped: int = 0  # condition false, retained, or a template field missing
    debounced: int = 0
    rate_limited: int = 0
    dropped: int = 0  # worker queue full
    runs: int = 0
    ok: int = 0
    errors: int = 0


class _Skip(Exception):
    pass


@dataclass
class Trigger:
    cfg: TriggerConfig
    result_topic: str
    bucket: TokenBucket
    stats: TriggerStats = field(default_factory=TriggerStats)
    last_run: float | None = None
    seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def command(self, msg: Message) -> Command:
        """The request for one message; raises _Skip when a field the templates need is missing."""
        text = msg.payload.decode("utf-8", errors="replace")
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = None
        levels = msg.topic.split("/")

        def lookup(name: str) -> Any:
            if name == "topic":
                return msg.topic
            if name == "payload":
                return text[:MAX_PAYLOAD_TEXT]
            if name.startswith("topic.") and name[6:].isdigit():
                index = int(name[6:])
                if index < len(levels):
                    return levels[index]
                raise _Skip(name)
            value = get_path(body, name)
            if value is _MISSING:
                raise _Skip(name)
            return value

        cid = f"trigger-{self.cfg.name}-{next(self.seq)}"
        if self.cfg.query is not None:
            return Command(id=cid, query=fill_text(self.cfg.query, lookup)[:8000], deadline_ms=self.cfg.deadline_ms)
        assert self.cfg.call is not None
        arguments = fill_structure(self.cfg.call.arguments, lookup)
        return Command(id=cid, call=ToolCall(name=self.cfg.call.name, arguments=arguments),
                       deadline_ms=self.cfg.deadline_ms)


class TriggerManager:
    def __init__(self, config: Config, pipeline: Pipeline, bus: MqttBus, metrics: Metrics,
                 subscriptions: Subscriptions, queue_size: int = 16) -> None:
        self.pipeline = pipeline
        self.bus = bus
        self.metrics = metrics
        self.triggers: list[Trigger] = []
        self._queue: queue.Queue[tuple[Trigger, Message, Command]] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._own_prefix = config.topic("")  # our own results never trigger us (no loops through a wide filter)
        for cfg in config.triggers:
            trigger = Trigger(cfg, cfg.result_topic or config.topic(f"triggers/{cfg.name}"),
                              TokenBucket(cfg.rate_per_min / 60.0, cfg.burst))
            self.triggers.append(trigger)
            subscriptions.add(cfg.topic, self._handler(trigger), qos=cfg.qos)

    def _handler(self, trigger: Trigger) -> Callable[[Message], None]:
        return lambda msg: self.on_message(trigger, msg)

    # -- subscription thread: cheap checks only --------------------------------------------------------------

    def on_message(self, trigger: Trigger, msg: Message) -> None:
        cfg, stats = trigger.cfg, trigger.stats
        with self._lock:
            stats.messages += 1
            if (msg.retain and cfg.ignore_retained) or msg.topic.startswith(self._own_prefix):
                stats.skipped += 1
                return
            if cfg.when is not None:
                try:
                    body = json.loads(msg.payload)
                except ValueError:
                    body = None
                if not condition_holds(cfg.when, body):
                    stats.skipped += 1
                    return
            now = time.monotonic()
            if trigger.last_run is not None and now - trigger.last_run < cfg.debounce_s:
                stats.debounced += 1
                return
            if not trigger.bucket.take(now):
                stats.rate_limited += 1
                log.info("trigger_rate_limited", trigger=cfg.name, topic=msg.topic)
                return
            try:
                command = trigger.command(msg)
            except _Skip as missing:
                stats.skipped += 1
                log.info("trigger_field_missing", trigger=cfg.name, field=str(missing), topic=msg.topic)
                return
            except ValidationError as exc:
                stats.errors += 1
                log.warning("trigger_bad_request", trigger=cfg.name, error=str(exc)[:500])
                return
            try:
                self._queue.put_nowait((trigger, msg, command))
            except queue.Full:
                stats.dropped += 1
                log.warning("trigger_dropped", trigger=cfg.name, note="trigger queue full")
                return
            trigger.last_run = now

    # -- our worker ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.triggers and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="triggers", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                trigger, msg, command = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._run(trigger, msg, command)
            except Exception:
                log.exception("trigger_failed", trigger=trigger.cfg.name)
                with self._lock:
                    trigger.stats.errors += 1

    def _run(self, trigger: Trigger, msg: Message, command: Command) -> None:
        result = self.pipeline.handle(command, msg.received)
        code = result.error.code.value if result.error else None
        with self._lock:
            trigger.stats.runs += 1
            if result.status == "ok":
                trigger.stats.ok += 1
            else:
                trigger.stats.errors += 1
        total = result.timings_ms.get("total", 0.0)
        self.metrics.record(result.status, result.tier, total, code)
        out = {
            "trigger": trigger.cfg.name,
            "topic": msg.topic,
            "payload": msg.payload.decode("utf-8", errors="replace")[:MAX_PAYLOAD_TEXT],
            "request": command.query if command.query is not None else command.model_dump(mode="json")["call"],
            "result": result.model_dump(mode="json"),
        }
        self.bus.publish_json(trigger.result_topic, out)
        log.info("trigger_ran", trigger=trigger.cfg.name, topic=msg.topic, status=result.status, error=code,
                 ms=total)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {t.cfg.name: asdict(t.stats) for t in self.triggers}


__all__ = ["TokenBucket", "TriggerManager", "check_trigger_config", "condition_holds", "placeholders"]
