"""From a config's model spec (a manifest name or a .gguf path) to a verified, loaded router or thinker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from edged.config import Config
from edged.llm.engine import Engine
from edged.llm.files import verify_file
from edged.llm.formats import choose_format
from edged.llm.manifest import ModelEntry, load_manifest
from edged.llm.router import LocalRouter
from edged.llm.thinker import Thinker

Built = tuple[Any, dict[str, Any], Callable[[], None], Callable[[], dict[str, Any]]]


def resolve(config: Config, spec: str) -> tuple[Path, ModelEntry | None]:
    """A path if the spec looks like one, else the manifest entry's file under the models directory."""
    manifest = load_manifest()
    if spec.endswith(".gguf") or "/" in spec:
        path = Path(spec).expanduser()
        return path, manifest.by_file(path.name)
    entry = manifest.get(spec)
    return config.models_dir / entry.file, entry


def load_engine(config: Config, spec: str, *,
                role: Literal["router", "thinker"] = "router") -> tuple[Engine, ModelEntry | None, dict[str, Any]]:
    """Verify the file (sha256, cached by size and mtime) before llama.cpp ever sees it, then load it."""
    path, entry = resolve(config, spec)
    sha256 = verify_file(path, entry) if config.models.verify else None
    m = config.models
    kv_cache_type: str = m.kv_cache_type
    if role == "router":
        kv_cache_type = m.router_kv_cache_type
        if kv_cache_type == "auto":  # measured per model in the manifest (found by file name for a path spec too)
            kv_cache_type = (entry.kv_cache_type if entry is not None else None) or "q8_0"
    engine = Engine(path, n_ctx=m.n_ctx, n_threads=m.n_threads, n_gpu_layers=m.n_gpu_layers, n_batch=m.n_batch,
                    kv_cache_type=kv_cache_type, use_mmap=m.use_mmap)
    info = {"model": entry.name if entry else path.name, "file": str(path), "sha256": sha256,
            "load_s": round(engine.load_s, 3)}
    return engine, entry, info


def build_router(config: Config, spec: str, engine: Engine | None = None) -> Built:
    loaded, entry, info = load_engine(config, spec) if engine is None else (engine, None, {"model": spec})
    family = config.models.router_format or (entry.family if entry else None)
    fmt = choose_format(family, loaded.metadata, loaded.path.name)
    router = LocalRouter(loaded, fmt, name=str(info["model"]), min_confidence=config.models.min_confidence)
    return router, {**info, "format": fmt.family}, loaded.close, loaded.stats


def build_thinker(config: Config, spec: str, engine: Engine | None = None) -> Built:
    loaded, _entry, info = (load_engine(config, spec, role="thinker") if engine is None
                            else (engine, None, {"model": spec}))
    t = config.thinker
    thinker = Thinker(loaded, name=str(info["model"]), max_steps=t.max_steps, max_tokens=t.max_tokens,
                      enable_thinking=t.enable_thinking, temperature=t.temperature, seed=t.seed)
    return thinker, {**info, "thinking": thinker.can_think}, loaded.close, loaded.stats
