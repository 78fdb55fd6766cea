"""The JSON log survives a killed process: every line is whole, so the restarted daemon's lines stay readable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edged.logs import SafePrintLogger, start_on_a_fresh_line

LOG_IN_A_LOOP = """
import sys, threading
from edged.logs import configure_logging
import structlog
configure_logging("info", "json")
log = structlog.get_logger("t")
log.info("started", run=int(sys.argv[1]))
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


def test_a_killed_writers_half_line_never_takes_the_next_process_with_it(tmp_path: Path) -> None:
    """SIGKILL a process logging from 3 threads, thirty times over, into one file (as `stderr >> file`).

    A line goes out in one write, but the kernel may cut a write to a file short when SIGKILL lands in it (CI saw
    it once in 30 kills): the killed process's last line may be a fragment. Every other line must parse, and every
    restarted process's first line must be whole, on a line of its own."""
    path = tmp_path / "daemon.log"
    for run in range(30):
        with path.open("ab") as err:
            proc = subprocess.Popen([sys.executable, "-c", LOG_IN_A_LOOP, str(run)], stdout=subprocess.PIPE,
                                    stderr=err)
        assert proc.stdout is not None and proc.stdout.readline() == b"go\n"
        time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    lines = path.read_text().splitlines()
    assert len(lines) > 1000
    records: list[dict[str, object] | None] = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append(None)
    assert [r["run"] for r in records if r is not None and r["event"] == "started"] == list(range(30))
    for i, record in enumerate(records):
        if record is None:  # only a killed process's last line, cut short: the next line is a new process's first
            following = records[i + 1] if i + 1 < len(records) else None
            assert following is not None and following["event"] == "started", lines[i][:200]
            assert lines[i].count('{"') == 1, lines[i][:200]


def test_a_log_file_left_mid_line_gets_a_newline_before_the_first_line(tmp_path: Path) -> None:
    path = tmp_path / "daemon.log"
    path.write_text('{"event": "whole"}\n{"event": "cut sho')
    with path.open("a") as log:
        assert start_on_a_fresh_line(log) is True
        SafePrintLogger(file=log).info('{"event": "restarted"}')
    assert path.read_text().splitlines()[1:] == ['{"event": "cut sho', '{"event": "restarted"}']
    with path.open("a") as log:  # now ending in a newline: nothing more is written
        assert start_on_a_fresh_line(log) is False
    assert path.read_text().endswith('"restarted"}\n')


def test_only_a_regular_file_is_mended(tmp_path: Path) -> None:
    empty = tmp_path / "empty.log"
    with empty.open("a") as log:
        assert start_on_a_fresh_line(log) is False
    assert empty.read_text() == ""
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as pipe:
        assert start_on_a_fresh_line(pipe) is False
    os.close(read_end)
    assert start_on_a_fresh_line(Recorder()) is False  # type: ignore[arg-type]
