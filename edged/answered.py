"""A durable store of recently answered commands, so a redelivered command is answered, never re-executed.

QoS 1 means "at least once": after a crash the broker redelivers every command we had not acknowledged. The result
is stored before it is published and marked published once the broker has it, so a redelivery either republishes
the stored result (it never reached the broker) or is acknowledged silently (it did).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path


class AnsweredStore:
    def __init__(self, path: Path | None, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # survives a killed process; see ARCHITECTURE.md
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answered (key TEXT PRIMARY KEY, result BLOB NOT NULL,"
            " published INTEGER NOT NULL DEFAULT 0, ts REAL NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS answered_ts ON answered(ts)")
        self._writes = 0

    @staticmethod
    def key(reply_topic: str, command_id: str) -> str:
        return f"{reply_topic}\x00{command_id}"

    def get(self, key: str) -> tuple[bytes, bool] | None:
        """The stored result and whether it was published, or None if this command is new."""
        if self.capacity == 0:
            return None
        with self._lock:
            row = self._db.execute("SELECT result, published FROM answered WHERE key=?", (key,)).fetchone()
        return (bytes(row[0]), bool(row[1])) if row else None

    def put(self, key: str, result: bytes) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO answered(key, result, published, ts) VALUES (?, ?, 0, ?)",
                (key, result, time.time()),
            )
            self._writes += 1
            if self._writes % 256 == 0:
                self._prune()

    def mark_published(self, key: str) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._db.execute("UPDATE answered SET published=1 WHERE key=?", (key,))

    def _prune(self) -> None:
        self._db.execute(
            "DELETE FROM answered WHERE ts < (SELECT ts FROM answered ORDER BY ts DESC LIMIT 1 OFFSET ?)",
            (self.capacity,),
        )

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answered").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
