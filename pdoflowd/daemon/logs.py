"""Log lines of the daemon, for the journal or for a terminal.

Owns the format only: when stderr is the journal (``JOURNAL_STREAM`` names
it) every line starts with a syslog priority such as ``<3>`` and carries no
timestamp; elsewhere lines carry a timestamp. Every line names its process
(supervisor, or worker slot and pid), a traceback stays inside its record
instead of becoming lines of its own, and every record, traceback included,
passes through :func:`pdoflowd.redaction.redact` (a psycopg error may quote
a host name, a connection string or a piece of a password). It must not
decide what is logged, nor send anything anywhere but stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from types import TracebackType
from typing import TextIO

from pdoflowd.redaction import redact

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

_process_label = "supervisor"


def set_process_label(label: str) -> None:
    """Name this process in every later line (a worker calls this)."""
    global _process_label
    _process_label = label


def stderr_is_journal(environ: Mapping[str, str], stderr_fd: int) -> bool:
    """True when stderr is the stream systemd connected to the journal."""
    stream = environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(stderr_fd)
    except OSError:
        return False
    return st.st_dev == int(device) and st.st_ino == int(inode)


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level.

    A level between two named ones takes the priority of the one below it;
    anything below DEBUG is debug.
    """
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class LineFormatter(logging.Formatter):
    """One record as one or more lines, every one of them attributable."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            message += "\n" + self.formatStack(record.stack_info)
        message = redact(message)
        head = f"[{_process_label}:{record.process}]"
        lines = message.splitlines() or [""]
        if self.journal:
            # The journal makes one entry per line and reads its priority
            # from each line's own prefix: continuation lines carry it too,
            # indented, so no part of a traceback arrives unprefixed.
            prefix = f"<{syslog_priority(record.levelno)}>"
            first = f"{prefix}{head} {lines[0]}"
            rest = [f"{prefix}{head}   {line}" for line in lines[1:]]
            return "\n".join([first, *rest])
        stamp = self.formatTime(record, "%Y-%m-%d %H:%M:%S")
        msecs = int(record.msecs)
        first = f"{stamp}.{msecs:03d} {record.levelname:<7} {head} {lines[0]}"
        return "\n".join([first, *(f"    {line}" for line in lines[1:])])


def _log_uncaught(
    kind: type[BaseException],
    value: BaseException,
    traceback: TracebackType | None,
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)
        return
    logging.getLogger("pdoflowd").critical(
        "uncaught exception", exc_info=(kind, value, traceback)
    )


def configure(level: str, environ: Mapping[str, str] | None = None) -> None:
    """Send log records to stderr in the fitting format.

    The ``pdoflowd`` loggers log at ``level``; other libraries and job code
    reach the same handler from warning up, so their lines are formatted
    (and prefixed for the journal) like the daemon's own. Python warnings
    and uncaught exceptions go through it as well.
    """
    env = os.environ if environ is None else environ
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter(stderr_is_journal(env, 2)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    own = logging.getLogger("pdoflowd")
    own.handlers.clear()
    own.setLevel(level.upper())
    own.propagate = True
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught


def use_stream(stream: TextIO) -> None:
    """Send the log records :func:`configure` formats to ``stream`` from
    now on (a worker whose stderr captures its jobs' output logs past it)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(stream)
