"""The answered store on its own: one commit per command (deferred "published" marks), pruning by rowid, and
failures that cost protection, never an answer."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edged import answered
from edged.answered import AnsweredStore


def _published_on_disk(path: Path, key: str) -> bool | None:
    """What a restarted daemon would read: a second connection, like the next process after a SIGKILL."""
    row = sqlite3.connect(path).execute("SELECT published FROM answered WHERE key=?", (key,)).fetchone()
    return None if row is None else bool(row[0])


def test_deferred_mark_is_seen_at_once_and_committed_with_the_next_put(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite3"
    store = AnsweredStore(path, 100)
    store.put("k1", b"r1")
    store.mark_published("k1", defer=True)
    assert store.get("k1") == (b"r1", True)  # a redelivery in this process is acknowledged silently
    assert _published_on_disk(path, "k1") is False  # not yet durable: a SIGKILL now loses only this mark
    store.put("k2", b"r2")
    assert _published_on_disk(path, "k1") is True and _published_on_disk(path, "k2") is False
    store.mark_published("k2", defer=True)
    store.flush()  # what an idle worker does
    assert _published_on_disk(path, "k2") is True
    store.close()


def test_immediate_mark_and_close_commit(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite3"
    store = AnsweredStore(path, 100)
    store.put("k1", b"r1")
    store.mark_published("k1")
    assert _published_on_disk(path, "k1") is True
    store.put("k2", b"r2")
    store.mark_published("k2", defer=True)
    store.close()
    assert _published_on_disk(path, "k2") is True


def test_a_new_result_for_a_key_is_unpublished_again(tmp_path: Path) -> None:
    store = AnsweredStore(tmp_path / "a.sqlite3", 100)
    store.put("k", b"queued")
    store.mark_published("k", defer=True)
    store.put("k", b"final")  # the outbox replaces a 'queued' result with the final one
    assert store.get("k") == (b"final", False)
    store.flush()
    assert store.get("k") == (b"final", False)


def test_prunes_the_oldest_and_reopens_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(answered, "PRUNE_EVERY", 5)
    path = tmp_path / "a.sqlite3"
    store = AnsweredStore(path, 10)
    for i in range(40):
        store.put(f"k{i}", b"r")
    assert 10 <= len(store) < 10 + 5 + 1
    assert store.get("k39") is not None and store.get("k0") is None
    store.put("k30", b"again")  # replaced: now the newest
    store.close()
    reopened = AnsweredStore(path, 10)
    assert list(reopened._known)[-1] == "k30"
    for i in range(40, 60):
        reopened.put(f"k{i}", b"r")
    assert reopened.get("k30") is None and reopened.get("k59") == (b"r", False)
    assert len(reopened) == len(reopened._known)


def test_a_failed_write_is_rolled_back_and_the_store_keeps_working(tmp_path: Path) -> None:
    store = AnsweredStore(tmp_path / "a.sqlite3", 100)
    store.put("ok1", b"r")
    store.mark_published("ok1", defer=True)
    store.put("bad", object())  # type: ignore[arg-type]  # fails inside the transaction, after the marks
    assert store.failures == 1 and store.get("bad") is None
    assert not store._db.in_transaction
    store.put("ok2", b"r")
    assert store.get("ok2") == (b"r", False) and store.get("ok1") == (b"r", False)  # the dropped mark


def test_disabled_store_remembers_nothing(tmp_path: Path) -> None:
    store = AnsweredStore(tmp_path / "a.sqlite3", 0)
    store.put("k", b"r")
    store.mark_published("k", defer=True)
    store.flush()
    assert store.get("k") is None


def test_a_run_is_one_commit_with_the_marks_before_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's run of quick commands: the earlier marks and every new row go to disk together, in order."""
    monkeypatch.setattr(answered, "PRUNE_EVERY", 4)
    path = tmp_path / "a.sqlite3"
    store = AnsweredStore(path, 6)
    store.put("k0", b"r0")
    store.mark_published("k0", defer=True)
    commits: list[str] = []
    store._db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    store.put_many([(f"k{i}", f"r{i}".encode()) for i in range(1, 9)])
    assert commits == ["COMMIT"]
    assert _published_on_disk(path, "k0") is True
    assert all(_published_on_disk(path, f"k{i}") is False for i in range(1, 9))
    assert store.get("k8") == (b"r8", False)
    store.put_many([(f"k{i}", b"r") for i in range(9, 12)])  # past capacity + PRUNE_EVERY: pruned in the same commit
    assert len(store) == 6 + 3 and store.get("k2") is None and store.get("k3") is not None
    assert list(store._known) == [f"k{i}" for i in range(3, 12)]
    for i in range(9, 12):
        store.mark_published(f"k{i}", defer=True)
    store.put_many([])  # no rows: it commits the marks, like flush
    assert _published_on_disk(path, "k11") is True
    store.close()
