"""Helpers for the local processes that the demo, the bench and the tests start: a free loopback port, waiting
until something listens on it, finding mosquitto and stopping a child for good."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from typing import Any

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")  # Debian puts it outside a user's PATH


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Until something accepts connections on the loopback port; fails early if `proc` exits first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def which(name: str, *extra: str) -> str | None:
    return shutil.which(name) or next((p for p in extra if os.path.exists(p)), None)


def mosquitto_binary() -> str | None:
    return which("mosquitto", *MOSQUITTO_PATHS)


def stop_process(proc: subprocess.Popen[Any] | None, grace: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL: never leaves the child behind."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
