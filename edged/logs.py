"""structlog set-up: JSON lines for journald and log shippers, readable colours on a terminal."""

from __future__ import annotations

import logging
import os
import stat
import sys
from typing import TextIO

import structlog


class SafePrintLogger(structlog.WriteLogger):
    """A logger that writes each line with its newline in one write, and whose failed writes are counted and
    dropped, never raised.

    One write: sys.stderr writes through, and print() (structlog's PrintLogger) writes the line and its newline
    separately; a process killed between the two (SIGKILL, the watchdog's SIGABRT) left a line without its
    newline, and the restarted daemon's first line was glued to it: both lost to a JSON log reader.

    With the log on a full disk (or a file over RLIMIT_FSIZE, or a closed pipe), print() raises OSError inside
    whatever called log.info(): a worker answering a command, or the `except` block handling an earlier error,
    and the exception escaping from there killed the worker thread. Losing log lines is better than losing the
    daemon; `dropped` says how many went.
    """

    dropped = 0

    def msg(self, message: str) -> None:
        try:
            super().msg(message)
        except (OSError, ValueError):  # ValueError: write to a closed file
            SafePrintLogger.dropped += 1

    log = debug = info = warn = warning = fatal = failure = err = error = critical = exception = msg


def start_on_a_fresh_line(stream: TextIO) -> bool:
    """Begin with a newline when the log file we append to ends in the middle of a line; True if one was written.

    A line goes out in one write, but the kernel may still cut a write to a regular file short at a page boundary
    when the process is SIGKILLed in it. The killed daemon's half line is lost either way; without this the restarted
    daemon's first line (its start-up, its `mqtt_connected`) was glued to it and lost to a JSON reader as well.
    Sockets (journald) and pipes start each process on its own stream, so only regular files are looked at.
    """
    try:
        fd = stream.fileno()
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            return False
        # stderr is opened write-only (`>> file`); its own path, opened again, can be read
        reader = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        try:
            if os.pread(reader, 1, info.st_size - 1) == b"\n":
                return False
        finally:
            os.close(reader)
        stream.write("\n")
        stream.flush()
        return True
    except (OSError, ValueError, AttributeError):  # no fd, no /proc, a closed stream: nothing to mend
        return False


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    start_on_a_fresh_line(sys.stderr)
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=lambda *args: SafePrintLogger(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
