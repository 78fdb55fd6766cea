"""The JSON log survives a killed process: every line is whole, so the restarted daemon's lines stay readable."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from edged.logs import SafePrintLogger

LOG_IN_A_LOOP = """
import sys, threading
from edged.logs import configure_logging
import structlog
configure_logging("info", "json")
log = structlog.get_logger("t")
def spin(n):
    i = 0
    while True:
        i += 1
        log.info("line", worker=n, i=i, pad="x" * 100)
for n in range(3):
    threading.Thread(target=spin, args=(n,), daemon=True).start()
print("go", flush=True, file=sys.stdout)
threading.Event().wait()
"""


class Recorder:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_a_line_and_its_newline_go_out_in_one_write() -> None:
    out = Recorder()
    SafePrintLogger(file=out).info('{"event": "x"}')  # type: ignore[arg-type]
    assert out.writes == ['{"event": "x"}\n']


def test_lines_stay_whole_when_the_writer_is_killed(tmp_path: Path) -> None:
    """SIGKILL a process logging from 3 threads, thirty times over, into one file (as `stderr >> file`): every
    line must parse, including the first line of each process after a kill."""
    path = tmp_path / "daemon.log"
    for _ in range(30):
        with path.open("ab") as err:
            proc = subprocess.Popen([sys.executable, "-c", LOG_IN_A_LOOP], stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None and proc.stdout.readline() == b"go\n"
        time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    lines = path.read_text().splitlines()
    assert len(lines) > 1000
    broken = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            broken.append(line[:200])
    assert broken == []
