"""From a config's model spec (a manifest name or a .gguf path) to a verified, loaded, ready router."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from edged.config import Config
from edged.llm.engine import Engine
from edged.llm.files import verify_file
from edged.llm.formats import choose_format
from edged.llm.manifest import ModelEntry, load_manifest
from edged.llm.router import LocalRouter


def resolve(config: Config, spec: str) -> tuple[Path, ModelEntry | None]:
    """A path if the spec looks like one, else the manifest entry's file under the models directory."""
    manifest = load_manifest()
    if spec.endswith(".gguf") or "/" in spec:
        path = Path(spec).expanduser()
        return path, manifest.by_file(path.name)
    entry = manifest.get(spec)
    return config.models_dir / entry.file, entry


def build_router(config: Config, spec: str) -> tuple[LocalRouter, dict[str, Any], Callable[[], None],
                                                      Callable[[], dict[str, Any]]]:
    path, entry = resolve(config, spec)
    sha256 = verify_file(path, entry) if config.models.verify else None
    engine = Engine(path, n_ctx=config.models.n_ctx, n_threads=config.models.n_threads,
                    n_gpu_layers=config.models.n_gpu_layers)
    family = config.models.router_format or (entry.family if entry else None)
    fmt = choose_format(family, engine.metadata, path.name)
    router = LocalRouter(engine, fmt, name=entry.name if entry else path.name,
                         min_confidence=config.models.min_confidence)
    info = {"model": router.name, "file": str(path), "format": fmt.family, "sha256": sha256,
            "load_s": round(engine.load_s, 3)}
    return router, info, engine.close, engine.stats
