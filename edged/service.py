"""The daemon's lifecycle: start in order, serve, report health to systemd, stop in order.

One place owns signals (as uvicorn does): the first SIGTERM/SIGINT starts a bounded graceful stop, a second SIGINT
forces exit. The watchdog ping is tied to real progress: a worker stuck past its request's deadline stops it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType
from typing import Any

import sdnotify
import structlog

from edged import __version__, heap
from edged.answered import AnsweredStore
from edged.bus import MqttBus
from edged.config import Config
from edged.discovery import Discovery
from edged.dispatch import Dispatcher
from edged.escalation import EscalationPolicy
from edged.models_runtime import LoadedModels, load_models
from edged.pipeline import Pipeline
from edged.remote.runtime import Tier3
from edged.telemetry import Metrics, ResourceSampler
from edged.tools.builtin import builtin_tools
from edged.tools.mqtt_tools import build_mqtt_tools
from edged.tools.registry import ToolRegistry
from edged.triggers import TriggerManager

log = structlog.get_logger(__name__)


def _watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit():
        return None
    if os.environ.get("WATCHDOG_PID") and os.environ["WATCHDOG_PID"] != str(os.getpid()):
        return None
    return int(usec) / 1e6 / 2


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.notifier = sdnotify.SystemdNotifier()
        self.metrics = Metrics()
        self.registry = ToolRegistry(allow=frozenset(config.tools.allow) if config.tools.allow is not None else None)
        self.registry.register_all(builtin_tools(config.tools.contacts_file, config.tools.timeout_s))
        if config.tools.enable_debug_tools:  # tests only: see edged/tools/debug.py
            from edged.tools.debug import debug_tools

            self.registry.register_all(debug_tools())
            log.warning("debug_tools_enabled", tools=[t.name for t in debug_tools()])
        self.models = LoadedModels()
        self.pipeline = Pipeline(
            self.registry, config.device.id, config.limits.deadline_ms, metrics=self.metrics,
            on_offline=config.remote.on_offline, queue_ttl_s=config.remote.queue_ttl_s,
            policy=EscalationPolicy(config.models.min_confidence, config.models.check_grounding),
        )
        self.store = AnsweredStore(config.state.dir / "answered.sqlite3", config.limits.answered_cache)
        self.bus = MqttBus(config, self._on_inbound)
        self.bus.online_payload = self.status_payload
        # home automation: config-declared MQTT tools, sensor triggers, Home Assistant discovery
        self.registry.register_all(build_mqtt_tools(config.mqtt_tools, self.bus, self.bus.subscriptions))
        self.triggers = TriggerManager(config, self.pipeline, self.bus, self.metrics, self.bus.subscriptions)
        self.discovery = Discovery(config, self.bus, self.bus.subscriptions) if config.homeassistant.enabled else None
        self.dispatcher = Dispatcher(
            self.bus, self.pipeline, self.store, self.metrics,
            queue_size=config.limits.queue_size, max_payload=config.mqtt.max_payload_bytes,
            retry_after_ms=config.limits.retry_after_ms, reply_window=config.limits.reply_window,
        )
        self.tier3 = Tier3.build(config, self.pipeline, self.bus, self.store) if config.remote.url else None
        self.sampler = ResourceSampler(lambda: self.config.models_dir)
        self.stopping = threading.Event()
        self._signals = 0

    def _on_inbound(self, inbound: Any) -> None:
        self.dispatcher.on_inbound(inbound)

    def notify(self, *lines: str) -> None:
        self.notifier.notify("\n".join(lines))

    # -- status and telemetry -------------------------------------------------------------------------------------

    def status_payload(self, state: str = "online") -> dict[str, Any]:
        degraded = state == "online" and self.models.degraded
        return {
            "state": "degraded" if degraded else state,
            "device": self.config.device.id,
            "version": __version__,
            "models": self.models.describe(),
            "tools": self.registry.names(),
            "topics": {"cmd": self.bus.cmd_topic, "shared": self.bus.shared_topic, "result": self.bus.result_topic},
            "remote": self.tier3.status() if self.tier3 is not None else None,
            "ts": time.time(),
        }

    def telemetry_payload(self) -> dict[str, Any]:
        return {
            "device": self.config.device.id,
            "ts": time.time(),
            "uptime_s": round(time.monotonic() - self.metrics.started, 3),
            "resources": self.sampler.sample(),
            "requests": self.metrics.snapshot(),
            "queue": {"depth": self.dispatcher.queue.qsize(), "capacity": self.dispatcher.queue.maxsize},
            "models": self.models.stats(),
            "mqtt": {"connected": self.bus.connected.is_set(), "connects": self.bus.connects},
            "triggers": self.triggers.stats(),
            **(self.tier3.telemetry() if self.tier3 is not None else {}),
        }

    # -- signals ----------------------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1 and signum == signal.SIGINT:
            log.warning("forced_exit")
            os._exit(130)
        self.stopping.set()

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    # -- run --------------------------------------------------------------------------------------------------------

    def run(self) -> int:
        self.install_signals()
        self.notify("STATUS=loading models")
        heap.fix_thresholds()
        self.models = load_models(self.config, on_progress=lambda msg: self.notify("EXTEND_TIMEOUT_USEC=60000000",
                                                                                     f"STATUS={msg}"))
        self.pipeline.router = self.models.router
        self.pipeline.thinker = self.models.thinker
        warm = getattr(self.models.router, "warm", None)
        if warm is not None:
            self.notify("STATUS=warming the router's prompt cache")
            warm(self.pipeline.tool_specs())
        heap.trim()  # what loading and warming freed
        self.dispatcher.start()
        if self.tier3 is not None:
            self.tier3.start()
        self.notify(f"STATUS=connecting to {self.config.mqtt.host}:{self.config.mqtt.port}")
        self.triggers.start()
        self.bus.subscriptions.start()
        self.bus.start()
        while not self.bus.connected.wait(0.2):
            if self.stopping.is_set():
                self.bus.stop(self.status_payload("stopped"))
                return 0
        self.notify("READY=1", f"STATUS={self._summary()}")
        log.info("ready", device=self.config.device.id, version=__version__, tools=self.registry.names(),
                 models=self.models.describe())
        self._warm_thinker()
        self._serve()
        return self._shutdown()

    def _warm_thinker(self) -> None:
        """The thinker's prompt is warmed after READY, in the background: tier 1 serves at once, and a tier-2
        request that comes first waits on the engine lock for what it would have evaluated anyway. Not when the
        thinker shares the router's engine: it would push the router's warmed prefix out of the context."""
        thinker, router = self.models.thinker, self.models.router
        warm = getattr(thinker, "warm", None)
        engine = getattr(thinker, "engine", None)
        router_engine = getattr(router, "engine", None)
        if warm is None or engine is None or engine is router_engine:
            return

        def give_way() -> None:
            """Before each warm-up step, let a tier-1 request in progress finish: it then waits for one step of
            the warm-up at most, not one per model step of its own (routes took ~850 ms, not ~190)."""
            if router_engine is not None:
                with router_engine.lock:
                    pass

        def run() -> None:
            t0 = time.monotonic()
            try:
                warm(self.pipeline.tool_specs(), give_way=give_way)
                log.info("thinker_warm", seconds=round(time.monotonic() - t0, 3))
            except Exception:
                log.exception("thinker_warm_failed")

        threading.Thread(target=run, name="warm-thinker", daemon=True).start()

    def _summary(self) -> str:
        snap = self.metrics.snapshot()
        return (f"{'connected' if self.bus.connected.is_set() else 'disconnected'}; "
                f"{snap['requests_total']} requests; queue {self.dispatcher.queue.qsize()}; "
                f"router {self.models.describe().get('router', {}).get('state', 'none')}")

    def _serve(self) -> None:
        ping_every = _watchdog_interval()
        next_ping = next_telemetry = time.monotonic()
        next_status = time.monotonic() + 5
        while not self.stopping.is_set():
            now = time.monotonic()
            if ping_every is not None and now >= next_ping:
                if self.dispatcher.hung(now):
                    log.error("worker_hung", note="watchdog pings withheld")
                else:
                    self.notify("WATCHDOG=1")
                next_ping = now + ping_every
            if now >= next_telemetry:
                next_telemetry = now + self.config.telemetry.interval_s
                if self.bus.connected.is_set():
                    try:
                        telemetry = self.telemetry_payload()
                        self.bus.publish_json(self.bus.telemetry_topic, telemetry, qos=0)
                        if self.discovery is not None:
                            self.discovery.publish_state(telemetry)
                    except Exception:
                        log.exception("telemetry_failed")
            if now >= next_status:
                next_status = now + 5
                self.notify(f"STATUS={self._summary()}")
            self.stopping.wait(min(0.5, ping_every or 0.5))

    def _shutdown(self) -> int:
        grace = self.config.limits.shutdown_grace_s
        log.info("stopping", grace_s=grace, in_flight=self.dispatcher.queue.unfinished_tasks)
        self.notify("STOPPING=1", "STATUS=stopping")
        finished = self.dispatcher.drain(grace)
        if not finished:
            log.warning("shutdown_left_commands", note="unacknowledged: the broker redelivers them after restart")
        if self.tier3 is not None:
            self.tier3.stop()
        self.triggers.stop()
        self.bus.subscriptions.stop()
        self.bus.stop(self.status_payload("stopped"))
        self.registry.shutdown()
        self.models.close()
        self.store.close()
        log.info("stopped")
        return 0
