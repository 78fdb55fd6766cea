"""The durable outbox: tier-3 commands that came in while the remote node was unreachable (`on_offline = queue`).

A command is stored (SQLite, WAL, synchronous=FULL: the commit is fsync'd, so it survives SIGKILL and power loss)
before its `queued` reply goes out. The OutboxWorker answers it later, oldest first:

    pending --(tier 3 ran, or the deadline passed: `expired`)--> answered (result stored)
            --(published to the stored reply address, broker PUBACK)--> published --> deleted

The result is stored before it is published, so a crash after the model ran republishes that result instead of
running the model (and its tools) again; a row is marked published only after the broker's PUBACK, and rows found
published at start are dropped. The one window left is a crash between the PUBACK and that mark (a few
milliseconds), which republishes the same result once more: at-least-once, like every MQTT QoS-1 delivery.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
import structlog

from edged.answered import AnsweredStore
from edged.protocol import ErrorCode, Result
from edged.tiers import RemoteTier, ReplyAddress

log = structlog.get_logger(__name__)

PENDING, ANSWERED, PUBLISHED = "pending", "answered", "published"
UNREACHABLE = "unreachable"  # edged.remote.client.UNREACHABLE: the escalation reason that means "try later"


@dataclass
class OutboxRow:
    seq: int
    key: str
    command: str
    command_id: str
    reply: ReplyAddress
    deadline: float  # wall clock
    created: float
    state: str
    attempts: int
    result: bytes | None


class SqliteOutbox:
    """The Outbox of edged.tiers, on SQLite. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path | None) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # every commit fsync'd: a stored command survives power loss
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE,"
            " command TEXT NOT NULL, command_id TEXT NOT NULL, reply_topic TEXT NOT NULL, correlation BLOB,"
            " deadline REAL NOT NULL, created REAL NOT NULL, state TEXT NOT NULL DEFAULT 'pending',"
            " attempts INTEGER NOT NULL DEFAULT 0, result BLOB, last_error TEXT)"
        )
        dropped = self._db.execute("DELETE FROM outbox WHERE state=?", (PUBLISHED,)).rowcount
        if dropped:
            log.info("outbox_dropped_published", rows=dropped)
        self._closed_depth: int | None = None  # depth when closed (status after shutdown)
        self.stored = 0  # counters since start, for telemetry
        self.answered = 0
        self.expired = 0

    @staticmethod
    def key(reply_topic: str, command_id: str) -> str:
        return f"{reply_topic}\x00{command_id}"

    def put(self, command_json: str, command_id: str, reply: ReplyAddress, deadline_wall: float) -> None:
        """Store durably before returning. The same command (reply topic + id) twice is stored once."""
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO outbox(key, command, command_id, reply_topic, correlation, deadline, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (self.key(reply.topic, command_id), command_json, command_id, reply.topic, reply.correlation_data,
                 deadline_wall, time.time()),
            )
            self.stored += cur.rowcount
        log.info("outbox_stored", request_id=command_id, new=bool(cur.rowcount),
                 deadline_in_s=round(deadline_wall - time.time(), 3))

    def depth(self) -> int:
        """Commands not yet answered to the broker's satisfaction."""
        with self._lock:
            if self._closed_depth is not None:
                return self._closed_depth
            return int(self._db.execute("SELECT COUNT(*) FROM outbox WHERE state != ?", (PUBLISHED,)).fetchone()[0])

    def rows(self, limit: int = 100) -> list[OutboxRow]:
        """Rows still to answer or to publish, oldest first."""
        with self._lock:
            found = self._db.execute(
                "SELECT seq, key, command, command_id, reply_topic, correlation, deadline, created, state, attempts,"
                " result FROM outbox WHERE state != ? ORDER BY seq LIMIT ?", (PUBLISHED, limit),
            ).fetchall()
        return [OutboxRow(r[0], r[1], r[2], r[3], ReplyAddress(r[4], bytes(r[5]) if r[5] is not None else None),
                          r[6], r[7], r[8], r[9], bytes(r[10]) if r[10] is not None else None) for r in found]

    def set_answered(self, seq: int, result: bytes) -> None:
        with self._lock:
            self._db.execute("UPDATE outbox SET state=?, result=? WHERE seq=? AND state=?",
                             (ANSWERED, result, seq, PENDING))

    def record_attempt(self, seq: int, error: str) -> None:
        with self._lock:
            self._db.execute("UPDATE outbox SET attempts=attempts+1, last_error=? WHERE seq=?", (error[:500], seq))

    def mark_published(self, seq: int) -> None:
        """After the broker's PUBACK: the row is done (and dropped at the next start if the delete is lost)."""
        with self._lock:
            self._db.execute("UPDATE outbox SET state=? WHERE seq=?", (PUBLISHED, seq))
            self._db.execute("DELETE FROM outbox WHERE seq=?", (seq,))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            by_state = dict(self._db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall())
            oldest = self._db.execute("SELECT MIN(created) FROM outbox WHERE state != ?", (PUBLISHED,)).fetchone()[0]
        return {
            "depth": sum(n for s, n in by_state.items() if s != PUBLISHED),
            "pending": by_state.get(PENDING, 0),
            "answered_unpublished": by_state.get(ANSWERED, 0),
            "oldest_age_s": round(time.time() - oldest, 3) if oldest is not None else None,
            "stored": self.stored,
            "answered": self.answered,
            "expired": self.expired,
        }

    def close(self) -> None:
        depth = self.depth()
        with self._lock:
            self._closed_depth = depth
            self._db.close()


class QueuedRunner(Protocol):
    def run_queued(self, command_json: str, deadline: float) -> Result: ...


class Publisher(Protocol):
    connected: threading.Event

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None) -> mqtt.MQTTMessageInfo: ...

    @staticmethod
    def wait_published(info: mqtt.MQTTMessageInfo, timeout: float) -> bool: ...


class OutboxWorker:
    """Answers the outbox while the remote node is up (expired commands at any time), publishing each final result
    to the stored reply address with its correlation data."""

    def __init__(self, outbox: SqliteOutbox, runner: QueuedRunner, remote: RemoteTier, bus: Publisher, *,
                 device_id: str, run_budget_s: float, store: AnsweredStore | None = None,
                 poll_s: float = 0.5) -> None:
        self.outbox = outbox
        self.runner = runner
        self.remote = remote
        self.bus = bus
        self.device_id = device_id
        self.run_budget_s = run_budget_s
        self.store = store
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop between rows; a model turn in progress is abandoned (its row stays pending and is run again)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            progressed = False
            if self.bus.connected.is_set():
                try:
                    progressed = self.run_once()
                except Exception:
                    log.exception("outbox_failed")
            if not progressed:
                self._wake.wait(self.poll_s)
                self._wake.clear()

    def run_once(self) -> bool:
        """One pass over the outbox, oldest first. True if some row moved on."""
        progressed = False
        for row in self.outbox.rows():
            if self._stop.is_set():
                break
            if row.state == PENDING and self._answered_elsewhere(row):
                self.outbox.mark_published(row.seq)
                continue
            if row.state == PENDING:
                payload = self._answer(row)
                if payload is None:
                    continue  # node down: expired rows further on are still answered
                self.outbox.set_answered(row.seq, payload)
                row.result = payload
            assert row.result is not None
            if not self._publish(row, row.result):
                break  # not out (disconnected or stopping): try again on the next pass
            progressed = True
        return progressed

    def _answered_elsewhere(self, row: OutboxRow) -> bool:
        """True when the answered store holds a final result for this command: a redelivery of it (we crashed
        between storing it here and acknowledging it) was answered live once the node was back."""
        if self.store is None:
            return False
        prior = self.store.get(self.store.key(row.reply.topic, row.command_id))
        try:
            status = json.loads(prior[0]).get("status") if prior is not None else None
        except ValueError:
            status = None
        if status in (None, "queued"):
            return False
        log.info("outbox_answered_elsewhere", request_id=row.command_id)
        return True

    def _answer(self, row: OutboxRow) -> bytes | None:
        """The final result of a pending row, or None to keep it (node unreachable)."""
        now = time.time()
        if now >= row.deadline:
            result = Result.failure(row.command_id, ErrorCode.EXPIRED,
                                    f"deadline passed after {now - row.created:.1f} s in the outbox")
            result.tier, result.device = 3, self.device_id
            self.outbox.expired += 1
            log.info("outbox_expired", request_id=row.command_id, waited_s=round(now - row.created, 3))
            return result.to_json()
        if not self.remote.available():
            return None
        deadline = time.monotonic() + max(row.deadline - now, self.run_budget_s)
        try:
            result = self.runner.run_queued(row.command, deadline)
        except Exception as exc:  # a bug costs this command an error result, not the worker
            log.exception("outbox_run_failed", request_id=row.command_id)
            result = Result.failure(row.command_id, ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")
            result.device = self.device_id
        last = result.escalations[-1] if result.escalations else {}
        if result.status == "error" and last.get("from") == 3 and last.get("reason") == UNREACHABLE:
            self.outbox.record_attempt(row.seq, result.error.message if result.error else UNREACHABLE)
            log.info("outbox_retry_later", request_id=row.command_id, attempts=row.attempts + 1)
            return None
        result.timings_ms["outbox_wait"] = round((now - row.created) * 1000, 3)
        self.outbox.answered += 1
        return result.to_json()

    def _publish(self, row: OutboxRow, payload: bytes) -> bool:
        info = self.bus.publish(row.reply.topic, payload, correlation_data=row.reply.correlation_data)
        while True:
            try:
                if self.bus.wait_published(info, 0.5):
                    break
            except ValueError:
                return False  # dropped locally: publish again next pass
            if self._stop.is_set():
                return False  # not known to be out: the row stays 'answered' and is republished after restart
        self.outbox.mark_published(row.seq)
        if self.store is not None:  # a retry of the same command now gets the final result, not 'queued'
            key = self.store.key(row.reply.topic, row.command_id)
            self.store.put(key, payload)
            self.store.mark_published(key)
        log.info("outbox_answered", request_id=row.command_id, waited_s=round(time.time() - row.created, 3))
        return True
