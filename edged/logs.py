"""structlog set-up: JSON lines for journald and log shippers, readable colours on a terminal."""

from __future__ import annotations

import logging
import sys

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


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
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
