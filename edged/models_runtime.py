"""Which models the daemon has loaded, and how loading went: the pipeline's router and the status's 'models'.

A model that is missing or fails to load leaves the daemon serving direct tool calls and reporting `degraded`,
rather than crash-looping under systemd.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from edged.config import Config
from edged.router import Router

log = structlog.get_logger(__name__)


@dataclass
class LoadedModels:
    router: Router | None = None
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    closers: list[Callable[[], None]] = field(default_factory=list)
    stat_sources: dict[str, Callable[[], dict[str, Any]]] = field(default_factory=dict)

    @property
    def degraded(self) -> bool:
        return any(entry.get("state") in ("missing", "failed") for entry in self.info.values())

    def describe(self) -> dict[str, dict[str, Any]]:
        return {role: dict(entry) for role, entry in self.info.items()}

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {role: dict(entry) for role, entry in self.info.items()}
        for role, source in self.stat_sources.items():
            try:
                out.setdefault(role, {}).update(source())
            except Exception:
                log.exception("model_stats_failed", role=role)
        return out

    def close(self) -> None:
        for close in self.closers:
            try:
                close()
            except Exception:
                log.exception("model_close_failed")


def load_models(config: Config, on_progress: Callable[[str], None] | None = None) -> LoadedModels:
    """Load the configured router; every failure is recorded, none is raised."""
    loaded = LoadedModels()
    spec = config.models.router
    if not spec:
        loaded.info["router"] = {"state": "disabled"}
        return loaded
    try:
        from edged.llm.loader import build_router
    except ImportError as exc:  # llama-cpp-python missing from this install
        loaded.info["router"] = {"state": "failed", "model": spec, "error": f"llama.cpp unavailable: {exc}"}
        log.error("router_unavailable", error=str(exc))
        return loaded
    if on_progress:
        on_progress(f"loading router {spec}")
    try:
        router, info, close, stats = build_router(config, spec)
    except FileNotFoundError as exc:
        loaded.info["router"] = {"state": "missing", "model": spec, "error": str(exc)}
        log.warning("router_missing", model=spec, error=str(exc))
        return loaded
    except Exception as exc:
        loaded.info["router"] = {"state": "failed", "model": spec, "error": f"{type(exc).__name__}: {exc}"}
        log.error("router_load_failed", model=spec, error=str(exc))
        return loaded
    loaded.router = router
    loaded.info["router"] = {"state": "loaded", **info}
    loaded.closers.append(close)
    loaded.stat_sources["router"] = stats
    return loaded
