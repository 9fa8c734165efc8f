"""What the daemon tells systemd, through the sd_notify protocol.

Owns the messages (READY, STATUS, RELOADING, STOPPING, WATCHDOG,
EXTEND_TIMEOUT_USEC) and when the watchdog is meant for this process. Only
the supervisor holds a :class:`Notifier`; workers drop ``NOTIFY_SOCKET`` and
``WATCHDOG_*`` at fork. Without ``NOTIFY_SOCKET`` every call does nothing.
It must not decide when to send: the supervisor's loop does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import sdnotify


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half the timeout), or None.

    None when systemd set no watchdog, or set it for another process.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    target = environ.get("WATCHDOG_PID", "")
    if target and (not target.isdigit() or int(target) != pid):
        return None
    return int(usec) / 2_000_000


def status_value(text: str) -> str:
    """A STATUS= value that stays one field of one datagram.

    A newline would start a field of its own, so line breaks become "; ".
    """
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _wire(message: str) -> str:
    # sdnotify sends a message encoded as Latin-1, which fails on anything
    # else and silently drops the whole message. The protocol is UTF-8: hand
    # it the UTF-8 bytes spelt as Latin-1 characters, which it sends as-is.
    return message.encode("utf-8").decode("latin-1")


class Notifier:
    """The supervisor's line to systemd.

    Each message goes through a socket of its own, opened and closed around
    the send, so no socket to systemd is ever inherited by a forked worker.
    """

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self.watchdog_s = watchdog_interval(os.environ, os.getpid())

    def send(self, *fields: str) -> None:
        if not self.enabled:
            return
        notifier = sdnotify.SystemdNotifier()
        if notifier.socket is not None:
            # Never wait on a reader that is not reading: a full queue
            # drops the message instead of stalling the main loop.
            notifier.socket.setblocking(False)
        try:
            notifier.notify(_wire("\n".join(fields)))
        finally:
            if notifier.socket is not None:
                notifier.socket.close()

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status_value(status)}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status_value(status)}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status_value(status)}")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")
