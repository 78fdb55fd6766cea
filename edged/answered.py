"""A durable store of recently answered commands, so a redelivered command is answered, never re-executed.

QoS 1 means "at least once": after a crash the broker redelivers every command we had not acknowledged. The result
is stored before it is published and marked published once the broker has it, so a redelivery either republishes
the stored result (it never reached the broker) or is acknowledged silently (it did).

The store is an aid, not a gate: when it cannot be written (disk full, read-only or vanished state directory,
an I/O error), the command is still answered and acknowledged, and the failure is logged as an error (at most
every few seconds, with a count). What was already committed stays intact: SQLite's WAL rolls back a write that
could not complete. Only the redelivery guarantee weakens for the commands answered meanwhile.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

ERROR_LOG_EVERY_S = 10.0


class AnsweredStore:
    def __init__(self, path: Path | None, capacity: int) -> None:
        self.capacity = capacity
        self.failures = 0
        self._last_error_log = 0.0
        self._lock = threading.Lock()
        try:
            self._db = self._open(path)
        except (sqlite3.Error, OSError) as exc:
            # a state directory that cannot be written must not stop the device from serving
            log.error("answered_store_unavailable", path=str(path), error=str(exc),
                      note="answering without a durable store: a redelivery after a crash may run again")
            self._db = self._open(None)
        self._writes = 0
        self._known = self._load_keys()

    def _load_keys(self) -> set[str]:
        """Every stored key, in memory: a new command (the common case) is known new without a query."""
        cur = self._execute("keys", "SELECT key FROM answered")
        return {row[0] for row in cur.fetchall()} if cur is not None else set()

    @staticmethod
    def _open(path: Path | None) -> sqlite3.Connection:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # survives a killed process; see ARCHITECTURE.md
        db.execute(
            "CREATE TABLE IF NOT EXISTS answered (key TEXT PRIMARY KEY, result BLOB NOT NULL,"
            " published INTEGER NOT NULL DEFAULT 0, ts REAL NOT NULL)"
        )
        db.execute("CREATE INDEX IF NOT EXISTS answered_ts ON answered(ts)")
        return db

    def _failed(self, op: str, exc: Exception) -> None:
        self.failures += 1
        now = time.monotonic()
        if self.failures == 1 or now - self._last_error_log >= ERROR_LOG_EVERY_S:
            self._last_error_log = now
            log.error("answered_store_failed", op=op, error=str(exc), failures=self.failures,
                      note="the command is answered anyway; its redelivery after a crash may run again")

    def _execute(self, op: str, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor | None:
        try:
            return self._db.execute(sql, params)
        except sqlite3.Error as exc:
            self._failed(op, exc)
            return None

    @staticmethod
    def key(reply_topic: str, command_id: str) -> str:
        return f"{reply_topic}\x00{command_id}"

    def get(self, key: str) -> tuple[bytes, bool] | None:
        """The stored result and whether it was published, or None if this command is new (or unreadable)."""
        if self.capacity == 0:
            return None
        with self._lock:
            if key not in self._known:
                return None
            cur = self._execute("get", "SELECT result, published FROM answered WHERE key=?", (key,))
            row = cur.fetchone() if cur is not None else None
        return (bytes(row[0]), bool(row[1])) if row else None

    def put(self, key: str, result: bytes) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            cur = self._execute(
                "put", "INSERT OR REPLACE INTO answered(key, result, published, ts) VALUES (?, ?, 0, ?)",
                (key, result, time.time()),
            )
            if cur is None:
                return
            self._known.add(key)
            self._writes += 1
            if self._writes % 256 == 0:
                self._prune()
                self._known = self._load_keys()

    def mark_published(self, key: str) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._execute("mark_published", "UPDATE answered SET published=1 WHERE key=?", (key,))

    def _prune(self) -> None:
        self._execute(
            "prune",
            "DELETE FROM answered WHERE ts < (SELECT ts FROM answered ORDER BY ts DESC LIMIT 1 OFFSET ?)",
            (self.capacity,),
        )

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answered").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error as exc:
                log.error("answered_store_close_failed", error=str(exc))
