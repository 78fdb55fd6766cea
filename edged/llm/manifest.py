"""The model manifest: which GGUF files edged knows, by role, with their sizes, hashes and sources."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class HttpSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["http"]
    url: str


class PypiSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["pypi"]
    packages: list[str] = Field(min_length=1)
    python_version: str | None = None


Source = Annotated[HttpSource | PypiSource, Field(discriminator="kind")]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    role: Literal["router", "thinker"]
    family: Literal["functiongemma", "gemma3", "qwen", "generic"]
    description: str = ""
    file: str
    size: int | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    default: bool = False
    kv_cache_type: Literal["f16", "q8_0"] | None = Field(
        None, description="KV cache precision this model runs with where the config says 'auto' (measured per model)."
    )
    sources: list[Source] = Field(min_length=1)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: list[ModelEntry]

    def get(self, name: str) -> ModelEntry:
        for entry in self.model:
            if entry.name == name:
                return entry
        raise KeyError(f"no model named {name!r} in the manifest (known: {', '.join(self.names())})")

    def names(self) -> list[str]:
        return [m.name for m in self.model]

    def by_file(self, file_name: str) -> ModelEntry | None:
        return next((m for m in self.model if m.file == file_name), None)


def load_manifest(path: Path | None = None) -> Manifest:
    if path is None:
        text = resources.files("edged.data").joinpath("manifest.toml").read_text(encoding="utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    return Manifest.model_validate(tomllib.loads(text))
