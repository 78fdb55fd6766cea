"""Tier 3: the remote reasoner (OpenAI-compatible node), its connectivity monitor and circuit breaker."""

from __future__ import annotations

from typing import Any

import structlog

from edged.config import RemoteConfig
from edged.remote.client import UNREACHABLE, ChatClient, RemoteReasoner, load_api_key
from edged.remote.monitor import Breaker, Monitor

log = structlog.get_logger(__name__)

__all__ = ["UNREACHABLE", "Breaker", "ChatClient", "Monitor", "RemoteReasoner", "build_remote"]


def _log_change(old: str, new: str, snapshot: dict[str, Any]) -> None:
    log.info("remote_state", old=old, state=new, failures=snapshot["failures"], last_error=snapshot["last_error"])


def build_remote(cfg: RemoteConfig) -> RemoteReasoner:
    """The tier-3 reasoner for `[remote]` (url must be set); its `.monitor` is started by the daemon."""
    assert cfg.url, "build_remote needs [remote] url"
    client = ChatClient(cfg.url, cfg.model, api_key=load_api_key(cfg.api_key_file), timeout_s=cfg.timeout_s,
                        ca_file=cfg.ca_file)
    breaker = Breaker(cfg.failure_threshold, on_change=_log_change)
    # connecting is bounded by 5 s (a node that is gone); the answer may wait up to timeout_s, since llama.cpp's
    # server answers /models only between generations (a node busy with another client is not a node down)
    probe_timeout = cfg.timeout_s
    monitor = Monitor(breaker, lambda: client.probe(probe_timeout), interval_s=cfg.probe_interval_s,
                      backoff_max_s=cfg.backoff_max_s)
    return RemoteReasoner(client, breaker, monitor, max_steps=cfg.max_steps, max_tokens=cfg.max_tokens,
                          temperature=cfg.temperature)
