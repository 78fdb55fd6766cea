"""The systemd unit: `systemd-analyze verify` clean, exposure score at most 2.0, the directives the daemon relies on,
the example config accepted by `edged check-config`, and llama.cpp running under MemoryDenyWriteExecute's rule."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GEMMA, REPO

SYSTEMD = REPO / "systemd"
UNIT = SYSTEMD / "edged.service"
DROP_IN = SYSTEMD / "edged.service.d" / "small-board.conf.example"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd; PID 1 need not be systemd)"
)


def directives(path: Path) -> dict[str, list[str]]:
    """'Section.Key' -> every value assigned, in order (systemd keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def fake_root(tmp_path: Path) -> Path:
    """A root with the distribution's units, our unit and drop-in, and an executable where ExecStart points."""
    root = tmp_path / "root"
    for units in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if units.is_dir():
            shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
            break
    unit_dir = root / "etc/systemd/system"
    (unit_dir / "edged.service.d").mkdir(parents=True)
    shutil.copy(UNIT, unit_dir / "edged.service")
    shutil.copy(DROP_IN, unit_dir / "edged.service.d" / "small-board.conf")
    exec_start = directives(UNIT)["Service.ExecStart"][0].split()[0]
    exe = root / exec_start.lstrip("/")
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return root


@needs_analyze
def test_unit_and_drop_in_verify_clean(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    if not (root / "usr/lib/systemd/system/sysinit.target").exists():
        pytest.skip("this machine has no systemd units to verify against")
    proc = subprocess.run([ANALYZE, "verify", f"--root={root}", "edged.service"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    # verify exits 0 on unknown keys or bad values too, and only says so: any output is a finding
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


@needs_analyze
def test_security_exposure_at_most_2(tmp_path: Path) -> None:
    proc = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", str(UNIT)], capture_output=True,
                          text=True, timeout=60)
    output = proc.stdout + proc.stderr
    if "Unknown option" in output or "unrecognized option" in output:
        pytest.skip(f"this systemd-analyze has no --offline: {output.strip()[:200]}")
    match = re.search(r"Overall exposure level for edged\.service: (\d+(?:\.\d+)?)", output)
    assert match, output
    score = float(match.group(1))
    print(f"exposure score {score}")
    assert score <= 2.0, output


def test_unit_has_what_the_daemon_relies_on() -> None:
    d = directives(UNIT)

    def one(key: str) -> str:
        assert key in d, f"{key} missing from {UNIT.name}"
        return d[key][-1]

    assert one("Service.Type") == "notify"
    assert one("Service.NotifyAccess") == "main"  # sd_notify from the daemon itself, not from children
    assert one("Service.Restart") == "on-failure"
    assert int(one("Unit.StartLimitBurst")) >= 1 and one("Unit.StartLimitIntervalSec")
    assert one("Service.WatchdogSec").rstrip("s").isdigit()
    assert one("Service.ExecStart").endswith("edged run --config /etc/edged/edged.toml")
    assert one("Service.User") == "edged" or one("Service.DynamicUser") == "yes"
    assert one("Service.StateDirectory") == "edged"
    assert one("Service.CacheDirectory") == "edged"
    assert one("Service.ConfigurationDirectory") == "edged"
    assert one("Service.LoadCredential") == "mqtt_password:/etc/edged/mqtt_password"
    assert one("Service.MemoryDenyWriteExecute") == "yes"
    assert one("Service.NoNewPrivileges") == "yes"
    assert one("Service.ProtectSystem") == "strict"
    assert one("Service.CapabilityBoundingSet") == ""
    # the stop timeout covers the daemon's default graceful-shutdown window
    from edged.config import LimitsConfig

    assert float(one("Service.TimeoutStopSec").rstrip("s")) > LimitsConfig().shutdown_grace_s
    # the Ansible role installs this very file
    role_copy = REPO / "ansible/roles/edged/files/edged.service"
    assert role_copy.resolve() == UNIT.resolve() or role_copy.read_text() == UNIT.read_text()


def test_small_board_drop_in_sets_limits() -> None:
    d = directives(DROP_IN)
    for key in ("Service.MemoryMax", "Service.CPUQuota", "Service.Nice"):
        assert key in d, key


def test_example_config_passes_check_config() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
    proc = subprocess.run([sys.executable, "-m", "edged", "check-config", str(SYSTEMD / "edged.toml.example")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert ": ok" in proc.stdout
    text = (SYSTEMD / "edged.toml.example").read_text()
    from edged.config import Config

    for section in Config.model_fields:  # every section is shown, as a table or an array of tables, maybe commented
        assert re.search(rf"^(# )?\[\[?{section}\]\]?$", text, re.M), f"[{section}] missing from the example"


MDWE_PROBE = r"""
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if sys.argv[1] == "set":
    # PR_SET_MDWE(PR_MDWE_REFUSE_EXEC_GAIN): the kernel's form of systemd's MemoryDenyWriteExecute=, kept across exec
    if libc.prctl(65, 1, 0, 0, 0) != 0:
        print("no-mdwe", ctypes.get_errno())
        sys.exit(0)
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[2], "run", sys.argv[2], sys.argv[3]])
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("wx-allowed")
except OSError:
    print("wx-refused")
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[3], n_ctx=256, n_threads=2, verbose=False)
out = llm.create_completion("The capital of France is", max_tokens=4, temperature=0)
print("generated", len(out["choices"][0]["text"]))
"""


@pytest.mark.slow
@pytest.mark.model
def test_llama_cpp_runs_under_memory_deny_write_execute() -> None:
    """The unit keeps MemoryDenyWriteExecute=yes: llama.cpp (CPU) and llama-cpp-python's ctypes callbacks need no
    writable+executable memory. Checked with the kernel's equivalent, since systemd is not PID 1 here."""
    if not GEMMA.exists():
        pytest.skip(f"{GEMMA} missing (edged models fetch)")
    pytest.importorskip("llama_cpp")
    proc = subprocess.run([sys.executable, "-c", MDWE_PROBE, "set", MDWE_PROBE, str(GEMMA)], capture_output=True,
                          text=True, timeout=120)
    if proc.stdout.startswith("no-mdwe"):
        pytest.skip(f"this kernel has no PR_SET_MDWE (Linux 6.3+): {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split()
    assert "wx-refused" in lines, proc.stdout  # the rule is really on
    assert "generated" in lines, proc.stdout + proc.stderr[-2000:]
