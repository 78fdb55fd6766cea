"""Model files: download with resume and fall-through from a real local HTTP server (standing in for Hugging
Face), sha256 verification, rename into place, and the verification cache."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

from edged.llm.files import ModelFileError, fetch, verify_file
from edged.llm.manifest import HttpSource, ModelEntry, load_manifest

BLOB = os.urandom(300_000)
SHA = hashlib.sha256(BLOB).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    served: list[int] = []  # bytes sent per request

    def do_GET(self) -> None:
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}")
        else:
            self.send_response(200)
        body = BLOB[start:]
        self.send_header("Content-Length", str(len(body)))
        _Handler.served.append(len(body))  # before sending: the client may be done before this thread resumes
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Handler.served = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}/model.gguf"
    httpd.shutdown()


def _entry(*urls: str, sha: str = SHA) -> ModelEntry:
    return ModelEntry(name="t", role="router", family="generic", file="t.gguf", size=len(BLOB), sha256=sha,
                      sources=[HttpSource(kind="http", url=u) for u in urls])


def test_download_resumes_a_torn_partial_file(server: str, tmp_path: Path) -> None:
    (tmp_path / "t.gguf.partial").write_bytes(BLOB[:120_000])
    path = fetch(_entry(server), tmp_path)
    assert path.read_bytes() == BLOB
    assert _Handler.served == [len(BLOB) - 120_000]  # only the missing part crossed the network
    assert not (tmp_path / "t.gguf.partial").exists()


def test_an_unreachable_source_falls_through_to_the_next(server: str, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/model.gguf"
    logs: list[str] = []
    path = fetch(_entry(dead, server), tmp_path, timeout=5, log=logs.append)
    assert path.read_bytes() == BLOB and any(dead in line for line in logs)


def test_a_wrong_file_is_never_put_in_place(server: str, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="sha256"):
        fetch(_entry(server, sha="0" * 64), tmp_path)
    assert not (tmp_path / "t.gguf").exists() and not (tmp_path / "t.gguf.partial").exists()


def test_verification_is_cached_until_the_file_changes(server: str, tmp_path: Path) -> None:
    entry = _entry(server)
    path = fetch(entry, tmp_path)
    assert verify_file(path, entry) == SHA and (tmp_path / "t.gguf.verified").exists()
    data = bytearray(BLOB)
    data[1000] ^= 0xFF  # same size, different content: the cached check must not vouch for it
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="sha256"):
        verify_file(path, entry)
    path.write_bytes(BLOB[:1000])
    with pytest.raises(ModelFileError, match="truncated"):
        verify_file(path, entry)


def test_models_cli_lists_and_verifies(tmp_path: Path) -> None:
    manifest = load_manifest()
    assert {"gemma3-270m-q4km", "qwen2.5-coder-0.5b"} <= set(manifest.names())
    assert all(m.sha256 and m.size for m in manifest.model if m.default)
    entry = manifest.get("gemma3-270m-q4km")
    (tmp_path / entry.file).write_bytes(b"GGUF not really")
    run = [sys.executable, "-m", "edged", "models"]
    listing = subprocess.run([*run, "list", "--dir", str(tmp_path)], capture_output=True, text=True, check=True)
    assert "gemma3-270m-q4km" in listing.stdout and "present" in listing.stdout
    verify = subprocess.run([*run, "verify", "--dir", str(tmp_path)], capture_output=True, text=True)
    assert verify.returncode == 1 and "BAD" in verify.stdout
