"""Tier 3 as the daemon runs it: the reasoner, its monitor thread, the outbox and its worker, started and stopped in
order, plus what status and telemetry report about them."""

from __future__ import annotations

from typing import Any

from edged.answered import AnsweredStore
from edged.config import Config
from edged.outbox import OutboxWorker, Publisher, SqliteOutbox
from edged.pipeline import Pipeline
from edged.remote import build_remote
from edged.remote.client import RemoteReasoner


class Tier3:
    def __init__(self, reasoner: RemoteReasoner, outbox: SqliteOutbox, worker: OutboxWorker) -> None:
        self.reasoner = reasoner
        self.outbox = outbox
        self.worker = worker

    @classmethod
    def build(cls, config: Config, pipeline: Pipeline, bus: Publisher, store: AnsweredStore | None) -> Tier3:
        """Wire tier 3 into `pipeline` (remote, outbox) for `[remote] url`."""
        reasoner = build_remote(config.remote)
        outbox = SqliteOutbox(config.state.dir / "outbox.sqlite3")
        worker = OutboxWorker(outbox, pipeline, reasoner, bus, device_id=config.device.id,
                              run_budget_s=config.remote.timeout_s, store=store)
        pipeline.remote, pipeline.outbox = reasoner, outbox
        return cls(reasoner, outbox, worker)

    def start(self) -> None:
        if self.reasoner.monitor is not None:
            self.reasoner.monitor.start()
        self.worker.start()

    def stop(self) -> None:
        """After the dispatcher drained, before the bus and the answered store close."""
        self.worker.stop()
        if self.reasoner.monitor is not None:
            self.reasoner.monitor.stop()
        if not self.worker.running():  # else a model turn is still out: its row stays pending (run again later)
            self.outbox.close()

    def status(self) -> dict[str, Any]:
        state = self.reasoner.state()
        return {"state": state["state"], "available": state["available"], "url": state["url"],
                "outbox_depth": self.outbox.depth()}

    def telemetry(self) -> dict[str, Any]:
        return {"remote": self.reasoner.state(), "outbox": self.outbox.stats()}
