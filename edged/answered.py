"""A durable store of recently answered commands, so a redelivered command is answered, never re-executed.

QoS 1 means "at least once": after a crash the broker redelivers every command we had not acknowledged. The result
is stored before it is published and marked published once the broker has it, so a redelivery either republishes
the stored result (it never reached the broker) or is acknowledged silently (it did).

The store is an aid, not a gate: when it cannot be written (disk full, read-only or vanished state directory,
an I/O error), the command is still answered and acknowledged, and the failure is logged as an error (at most
every few seconds, with a count). What was already committed stays intact: SQLite's WAL rolls back a write that
could not complete. Only the redelivery guarantee weakens for the commands answered meanwhile.

At most one commit per command: the dispatcher defers "published" (`mark_published(key, defer=True)`) into the
next `put`'s transaction, or `flush` when it is idle, and stores the results of a run of quick commands taken
off a backlog with one `put_many`. Until then the mark lives in memory (`get` sees it), so only a
killed process loses it: the results sent twice after a crash are bounded by the replies a worker has with the
broker at once (one, or a run of quick commands: the dispatcher's `reply_window`).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import structlog

log = structlog.get_logger(__name__)

ERROR_LOG_EVERY_S = 10.0
PRUNE_EVERY = 256  # rows past capacity before the oldest are deleted: one DELETE per this many commands


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
        # every stored key -> its rowid, oldest first: a new command (the common case) is known new without a
        # query, and the oldest rows are pruned by rowid without an index or a rescan
        self._known: OrderedDict[str, int] = self._load_keys()
        self._pending: dict[str, int] = {}  # published, not yet committed as such (key -> rowid)

    def _load_keys(self) -> OrderedDict[str, int]:
        cur = self._execute("keys", "SELECT key, rowid FROM answered ORDER BY rowid")
        return OrderedDict(cur.fetchall() if cur is not None else ())

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
        db.execute("DROP INDEX IF EXISTS answered_ts")  # pruned by rowid now: one index less to write per command
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
            pending = key in self._pending
        return (bytes(row[0]), bool(row[1]) or pending) if row else None

    def put(self, key: str, result: bytes) -> None:
        """Store a result (not yet published), committing the deferred marks in the same transaction."""
        self.put_many([(key, result)])

    def put_many(self, rows: Sequence[tuple[str, bytes]]) -> None:
        """Store results (none published yet) and the deferred marks in one commit: a worker that took several
        commands off a backlog pays for one commit, not one each. With no rows it is `flush`."""
        if self.capacity == 0:
            return
        with self._lock:
            for key, _ in rows:
                self._pending.pop(key, None)  # a new result for this key is not published yet
            if not rows and not self._pending:
                return
            rowids = self._transaction("put", rows)
            for (key, _), rowid in zip(rows, rowids or (), strict=False):
                self._known.pop(key, None)
                self._known[key] = rowid

    def mark_published(self, key: str, *, defer: bool = False) -> None:
        """The broker has this result. `defer`: commit it with the next put or flush (see the module doc)."""
        if self.capacity == 0:
            return
        with self._lock:
            rowid = self._known.get(key)
            if rowid is None:
                return  # never stored (the store failed): nothing to mark
            self._pending[key] = rowid
            if not defer:
                self._transaction("mark_published")

    def flush(self) -> None:
        """Commit the deferred marks, if any: the dispatcher calls it when idle."""
        if self.capacity == 0:
            return
        with self._lock:
            if self._pending:
                self._transaction("flush")

    def _transaction(self, op: str, rows: Sequence[tuple[str, bytes]] = ()) -> list[int] | None:
        """One commit: the pending marks, the new rows if any, and pruning past capacity. The new rows' rowids,
        or None when it failed (rolled back, the failure logged; the marks are dropped, like a failed write)."""
        marks = list(self._pending.values())
        self._pending.clear()
        db = self._db
        rowids: list[int] = []
        try:
            db.execute("BEGIN")
            if marks:
                db.execute(f"UPDATE answered SET published=1 WHERE rowid IN ({','.join('?' * len(marks))})",
                           marks)
            now = time.time()
            for key, result in rows:
                cur = db.execute("INSERT OR REPLACE INTO answered(key, result, published, ts) VALUES (?, ?, 0, ?)",
                                 (key, result, now))
                rowids.append(cast(int, cur.lastrowid))
            if len(self._known) + len(rows) >= self.capacity + PRUNE_EVERY:
                self._prune()
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._failed(op, exc)
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            return None  # keys popped by a pruning that rolled back are the oldest: deleted by the next one
        return rowids

    def _prune(self) -> None:
        """Delete the oldest rows down to capacity (inside the caller's transaction)."""
        last = 0
        while len(self._known) > self.capacity:
            _, last = self._known.popitem(last=False)
        self._db.execute("DELETE FROM answered WHERE rowid <= ?", (last,))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answered").fetchone()[0])

    def close(self) -> None:
        self.flush()
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error as exc:
                log.error("answered_store_close_failed", error=str(exc))
