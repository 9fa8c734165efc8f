"""Log lines of the daemon, for the journal or for a terminal.

Owns the format only: when stderr is the journal (``JOURNAL_STREAM`` names
it) every line starts with a syslog priority such as ``<3>`` and carries no
timestamp; elsewhere lines carry a timestamp. Every line names its process
(supervisor, or worker slot and pid), and a traceback stays inside its
record instead of becoming lines of its own.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

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


class _Formatter(logging.Formatter):
    def __init__(self, journal: bool) -> None:
        super().__init__()
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        head = f"[{_process_label}:{record.process}] "
        if self._journal:
            # One journal entry per line: keep continuation lines at the
            # same priority, indented, so nothing arrives unprefixed.
            priority = _PRIORITY.get(record.levelno, 6)
            lines = message.splitlines() or [""]
            first = f"<{priority}>{head}{lines[0]}"
            rest = [f"<{priority}>    {line}" for line in lines[1:]]
            return "\n".join([first, *rest])
        stamp = self.formatTime(record, "%Y-%m-%d %H:%M:%S")
        return f"{stamp} {record.levelname:<7} {head}{message}"


def configure(level: str, environ: Mapping[str, str] | None = None) -> None:
    """Send the ``pdoflowd`` loggers to stderr in the fitting format."""
    env = os.environ if environ is None else environ
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(stderr_is_journal(env, 2)))
    root = logging.getLogger("pdoflowd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
