"""Admission and workers: a bounded queue between the MQTT network thread and the threads that do the work.

The order for every command is: execute, store the result, publish it, wait for the broker's PUBACK, mark it
published, and only then acknowledge the command. A worker facing a backlog of quick commands (direct calls of
tools that answer in microseconds) executes a run of them (at most `reply_window`), stores their results in one
commit, publishes them together and acknowledges each command as the broker takes its reply: one disk write and
one wake-up per run, not per command. The price is bounded by `reply_window` per worker, and is one command per
worker when there is no backlog: a crash while a run is with the broker sends its replies again, and a crash
before its commit runs its commands again (their replies were never sent).

A crash anywhere before the ack means the broker redelivers it, and the answered store turns the redelivery
into a republish (or nothing), never a second execution. A copy that arrives while the first is still being
answered (redelivered after a reconnect while the first waited in the queue or in a run, or a client's retry)
is held until the first copy's result is stored and with the broker, then answered the same way.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from enum import Enum

import paho.mqtt.client as mqtt
import structlog

from edged import heap
from edged.answered import AnsweredStore
from edged.bus import Inbound, MqttBus
from edged.pipeline import Pipeline
from edged.protocol import Command, DecodeError, ErrorCode, Result, decode_command
from edged.telemetry import Metrics
from edged.tiers import ReplyAddress

log = structlog.get_logger(__name__)


IDLE_TRIM_S = 1.0  # idle this long, freed memory goes back to the OS: a steady stream keeps reusing it
QUICK_S = 0.002  # a command that ran for less than this may wait in a run for the ones after it


@dataclass
class Work:
    inbound: Inbound
    command: Command | None
    error: DecodeError | None
    generation: int
    key: str | None = None  # the answered store's key, once a worker has claimed the command


class Parked(Enum):
    """`_prepare`'s answer when another copy of the command is being answered: this one waits for it."""

    PARKED = "parked"


PARKED = Parked.PARKED


@dataclass
class Outgoing:
    """A reply ready to go: a new result (`result` set), a stored one sent again, or an error reply."""

    work: Work
    topic: str
    corr: bytes | None
    payload: bytes
    key: str | None
    result: Result | None = None


def _new_results(run: list[Outgoing]) -> list[tuple[str, bytes]]:
    """The rows a run adds to the answered store: its new results (not stored replies sent again, nor errors)."""
    return [(o.key, o.payload) for o in run if o.result is not None and o.key is not None]


class Dispatcher:
    def __init__(self, bus: MqttBus, pipeline: Pipeline, store: AnsweredStore, metrics: Metrics, *,
                 queue_size: int, max_payload: int, retry_after_ms: int, workers: int = 2,
                 reply_window: int = 32) -> None:
        self.bus = bus
        self.pipeline = pipeline
        self.store = store
        self.metrics = metrics
        self.max_payload = max_payload
        self.retry_after_ms = retry_after_ms
        self.reply_window = reply_window
        self.queue: queue.Queue[Work] = queue.Queue(maxsize=queue_size)
        self.accepting = threading.Event()
        self.accepting.set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, name=f"worker-{i}", daemon=True) for i in range(workers)]
        # per worker: monotonic time its current request must be done by (None when idle); the watchdog reads it
        self.busy_until: dict[str, float | None] = {t.name: None for t in self._threads}
        self._last_work = 0.0  # monotonic time a worker last finished a command
        self._trimmed_at = 0.0  # ... and the heap was last trimmed: trim again only after more work
        self._tool_s: dict[str, float] = {}  # tool name -> how long its last direct call took
        # store key -> copies of that command that arrived while it was being answered (see the module doc)
        self._in_flight: dict[str, list[Work]] = {}
        self._in_flight_lock = threading.Lock()
        bus.workers = workers  # with the queue, this sets the Receive Maximum the bus asks of the broker

    # -- network thread -----------------------------------------------------------------------------------------

    def on_inbound(self, inbound: Inbound) -> None:
        """Decode and enqueue; never blocks. Past the queue's bound, answer 'busy' at once."""
        if not self.accepting.is_set():
            return  # shutting down: left unacknowledged, the broker redelivers it after the restart
        inbound.received = time.monotonic()
        try:
            work = Work(inbound, decode_command(inbound.payload, self.max_payload), None, self.bus.connects)
        except DecodeError as exc:
            work = Work(inbound, None, exc, self.bus.connects)
        try:
            self.queue.put_nowait(work)
        except queue.Full:
            cid = work.command.id if work.command else (work.error.command_id if work.error else None)
            result = Result(id=cid, status="busy", retry_after_ms=self.retry_after_ms,
                            device=self.pipeline.device_id)
            topic, corr = self._address(work)
            if topic is not None:  # the command is acknowledged once the broker has the 'busy' reply
                self.bus.reply_then_ack(topic, result.to_json(), corr, inbound.mid, inbound.qos, work.generation)
            else:
                self.bus.ack(inbound.mid, inbound.qos)
            self.metrics.record("busy", None, 0.0)
            log.warning("busy", request_id=cid, queue_depth=self.queue.qsize())

    # -- workers ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _address(self, work: Work) -> tuple[str | None, bytes | None]:
        """Response Topic (v5) with its Correlation Data, else `reply_to`, else the device's result topic."""
        if work.inbound.response_topic:
            return work.inbound.response_topic, work.inbound.correlation_data
        reply_to = work.command.reply_to if work.command else (work.error.reply_to if work.error else None)
        if reply_to:
            return reply_to, None
        if work.error is not None and work.error.command_id is None:
            return None, None  # nothing identifies the sender: log it, answer nobody
        return self.bus.result_topic, None

    def _loop(self) -> None:
        """Take commands one at a time; a run of quick ones taken off a backlog is stored with one commit."""
        name = threading.current_thread().name
        run: list[Outgoing] = []
        while not self._stop.is_set():
            try:
                work = self.queue.get_nowait() if run else self.queue.get(timeout=0.2)
            except queue.Empty:
                if run:
                    self._send(run)  # the backlog is gone: send what the run holds
                else:
                    self.store.flush()  # idle: make the deferred "published" marks durable
                    now = time.monotonic()
                    if self._last_work > self._trimmed_at and now - self._last_work >= IDLE_TRIM_S:
                        self._trimmed_at = now
                        heap.trim()  # and give back what the work freed
                continue
            if run and not self._quick(work):
                self._send(run)  # quick results never wait for a model or a slow tool
            started = time.monotonic()
            try:
                out = self._prepare_or_fail(work, name)
            finally:
                self.busy_until[name] = None
                self._last_work = time.monotonic()
                structlog.contextvars.clear_contextvars()
            if out is PARKED:
                continue  # answered (and counted done) once the copy being answered is settled
            if out is None:
                self.queue.task_done()
                continue
            run.append(out)
            if len(run) >= self.reply_window or time.monotonic() - started >= QUICK_S:
                self._send(run)
        if run:  # hard stop: store what ran, unpublished; the broker redelivers the commands, the store answers
            self.store.put_many(_new_results(run))

    def _quick(self, work: Work) -> bool:
        """Expected to take well under QUICK_S: an error reply, or a direct call of a tool that last ran quickly."""
        if work.command is None:
            return True
        call = work.command.call
        return call is not None and self._tool_s.get(call.name, QUICK_S) < QUICK_S

    def _prepare(self, work: Work, worker: str) -> Outgoing | Parked | None:
        """Execute a command (or find its stored result); None when nothing is left to publish, PARKED when
        another copy of it is being answered (this one is answered after it, by `_release`)."""
        inbound = work.inbound
        topic, corr = self._address(work)
        if work.error is not None:
            err = work.error
            log.warning("bad_command", code=err.code.value, message=err.message, topic=inbound.topic,
                        request_id=err.command_id, replied=topic is not None)
            self.metrics.record("error", None, 0.0, err.code.value)
            if topic is None:
                self.bus.ack(inbound.mid, inbound.qos)
                return None
            result = err.to_result()
            result.device = self.pipeline.device_id
            return Outgoing(work, topic, corr, result.to_json(), None)
        command = work.command
        assert command is not None and topic is not None
        structlog.contextvars.bind_contextvars(request_id=command.id)
        key = self.store.key(topic, command.id)
        if not self._claim(work, key):
            log.info("duplicate_in_flight", dup=inbound.dup)
            return PARKED
        prior = self.store.get(key)
        if prior is not None:
            # answered before: send the stored result again (to this message's Correlation Data), never re-run.
            # Even when it was published, the sender may have missed it (it retried after a timeout): results are
            # at least once, like the commands.
            payload, published = prior
            log.info("redelivered", already_published=published, dup=inbound.dup)
            if published and inbound.dup:
                # the broker's own redelivery (DUP) of a command whose result it already holds: we died or lost
                # the connection between its PUBACK and our ack. Sending it again would answer it twice.
                if work.generation == self.bus.connects:
                    self.bus.ack(inbound.mid, inbound.qos)
                self._release(work)
                return None
            return Outgoing(work, topic, corr, payload, key)
        self.busy_until[worker] = self.pipeline.deadline_for(command, inbound.received) + 5.0
        started = time.monotonic()
        result = self.pipeline.handle(command, inbound.received, ReplyAddress(topic, corr))
        if command.call is not None:
            self._tool_s[command.call.name] = time.monotonic() - started
        return Outgoing(work, topic, corr, result.to_json(), key, result)

    def _claim(self, work: Work, key: str) -> bool:
        """Take on answering this command; False (and `work` waits) when another copy of it is being answered."""
        with self._in_flight_lock:
            waiting = self._in_flight.get(key)
            if waiting is not None:
                waiting.append(work)
                return False
            self._in_flight[key] = []
        work.key = key
        return True

    def _prepare_or_fail(self, work: Work, name: str) -> Outgoing | Parked | None:
        """`_prepare`, with a failure answered (`_fail`) rather than raised: one bad command never stops a worker."""
        try:
            return self._prepare(work, name)
        except Exception:
            log.exception("worker_failed")
            self._fail(work)
            return None

    def _release(self, work: Work) -> None:
        """This copy is settled (or failed): answer the copies that waited for it, now from the store."""
        if work.key is None:
            return
        with self._in_flight_lock:
            waiting = self._in_flight.pop(work.key, [])
        work.key = None
        if not waiting:
            return
        name = threading.current_thread().name
        for copy in waiting:
            out = self._prepare_or_fail(copy, name)
            if isinstance(out, Outgoing):
                self._send([out])
            elif out is not PARKED:
                self.queue.task_done()

    def _send(self, run: list[Outgoing]) -> None:
        """Store the run's new results in one commit, publish them all, then acknowledge each command once the
        broker has its reply. Each published reply whose command is not yet acknowledged is one a crash would
        send again (never run again): at most `reply_window` per worker, 1 when there is no backlog."""
        try:
            self.store.put_many(_new_results(run))
            sent: list[tuple[Outgoing, mqtt.MQTTMessageInfo]] = []
            for out in run:
                try:
                    sent.append((out, self.bus.publish(out.topic, out.payload, correlation_data=out.corr)))
                except Exception:
                    log.exception("worker_failed")
                    self._fail(out.work)
                    self.queue.task_done()
            for out, info in sent:
                try:
                    self._settle(out, info)
                except Exception:
                    log.exception("worker_failed")
                    self._fail(out.work)
                finally:
                    self.queue.task_done()
            if len(run) > 1:
                self.store.flush()  # the run's marks: no more of them wait for the next put than one command's
        finally:
            run.clear()

    def _settle(self, out: Outgoing, info: mqtt.MQTTMessageInfo) -> None:
        """Wait for the broker to hold the reply, then acknowledge the command (and count it)."""
        while not self._stop.is_set():
            try:
                if self.bus.wait_published(info, 0.5):
                    break
            except ValueError:
                break  # dropped locally: nothing will ever go out
        else:
            return  # hard stop: not acknowledged, the broker redelivers
        if out.key is not None:
            # committed with this worker's next put (or when idle): until then, a crash could send it again
            self.store.mark_published(out.key, defer=True)
        work = out.work
        if work.generation == self.bus.connects:
            self.bus.ack(work.inbound.mid, work.inbound.qos)
        # else: the connection that carried the command is gone; its redelivery is answered from the store
        if out.result is not None:
            result = out.result
            code = result.error.code.value if result.error else None
            self.metrics.record(result.status, result.tier, result.timings_ms.get("total", 0.0), code)
            log.info("answered", request_id=result.id, status=result.status, tier=result.tier, error=code,
                     ms=result.timings_ms.get("total"))
        self._release(work)

    def _fail(self, work: Work) -> None:
        """After a bug: answer 'internal' if possible and acknowledge anyway. Left unacknowledged, the message would
        hold a slot of the broker's in-flight window until the next reconnect, and a few such would stall us."""
        try:
            topic, corr = self._address(work)
            if topic is not None:
                cid = work.command.id if work.command else (work.error.command_id if work.error else None)
                result = Result.failure(cid, ErrorCode.INTERNAL, "internal error")
                result.device = self.pipeline.device_id
                self.bus.publish(topic, result.to_json(), correlation_data=corr)
            self.metrics.record("error", None, 0.0, ErrorCode.INTERNAL.value)
        except Exception:
            log.exception("internal_error_reply_failed")
        finally:
            self.bus.ack(work.inbound.mid, work.inbound.qos)
            self._release(work)

    # -- shutdown -----------------------------------------------------------------------------------------------

    def drain(self, grace_s: float) -> bool:
        """Stop taking commands and finish those already taken, for at most `grace_s`. True if all finished."""
        self.accepting.clear()
        end = time.monotonic() + grace_s
        while time.monotonic() < end:
            if self.queue.unfinished_tasks == 0 and self.bus.pending_replies() == 0:
                break
            time.sleep(0.02)
        finished = self.queue.unfinished_tasks == 0 and self.bus.pending_replies() == 0
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=1.0)
        return finished

    def hung(self, now: float) -> bool:
        """True when a worker is past its request's deadline: the watchdog must stop pinging."""
        return any(limit is not None and now > limit for limit in self.busy_until.values())


__all__ = ["Dispatcher", "ErrorCode"]
