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
from edged.tiers import Tier

log = structlog.get_logger(__name__)


@dataclass
class LoadedModels:
    router: Router | None = None
    thinker: Tier | None = None
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


def _load_role(loaded: LoadedModels, role: str, spec: str | None, build: Callable[[str], Any],
               on_progress: Callable[[str], None] | None) -> Any:
    """Load one model role; every failure is recorded in `loaded.info[role]`, none is raised."""
    if not spec:
        loaded.info[role] = {"state": "disabled"}
        return None
    if on_progress:
        on_progress(f"loading {role} {spec}")
    try:
        model, info, close, stats = build(spec)
    except FileNotFoundError as exc:
        loaded.info[role] = {"state": "missing", "model": spec, "error": str(exc)}
        log.warning("model_missing", role=role, model=spec, error=str(exc))
        return None
    except Exception as exc:
        loaded.info[role] = {"state": "failed", "model": spec, "error": f"{type(exc).__name__}: {exc}"}
        log.error("model_load_failed", role=role, model=spec, error=str(exc))
        return None
    loaded.info[role] = {"state": "loaded", **info}
    loaded.closers.append(close)
    loaded.stat_sources[role] = stats
    return model


def load_models(config: Config, on_progress: Callable[[str], None] | None = None) -> LoadedModels:
    """Load the router (tier 1) and the thinker (tier 2); one GGUF named for both is loaded once."""
    loaded = LoadedModels()
    try:
        from edged.llm.loader import build_router, build_thinker
    except ImportError as exc:  # llama-cpp-python missing from this install
        for role, spec in (("router", config.models.router), ("thinker", config.models.thinker)):
            loaded.info[role] = ({"state": "failed", "model": spec, "error": f"llama.cpp unavailable: {exc}"}
                                 if spec else {"state": "disabled"})
        log.error("llama_cpp_unavailable", error=str(exc))
        return loaded
    from edged.llm.engine import build_warning

    warning = build_warning()
    if warning:
        log.warning("llama_cpp_build_unsafe", reason=warning)
    loaded.router = _load_role(loaded, "router", config.models.router, lambda s: build_router(config, s),
                               on_progress)
    shared = config.models.thinker == config.models.router and loaded.router is not None
    engine = getattr(loaded.router, "engine", None) if shared else None
    loaded.thinker = _load_role(loaded, "thinker", config.models.thinker,
                                lambda s: build_thinker(config, s, engine), on_progress)
    if shared and loaded.thinker is not None:
        loaded.closers.pop()  # the shared engine is closed once, by the router's closer
        loaded.stat_sources.pop("thinker", None)
    return loaded
