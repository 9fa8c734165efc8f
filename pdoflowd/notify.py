"""What the daemon tells systemd, through the sd_notify protocol.

Owns the messages (READY, STATUS, RELOADING, STOPPING, WATCHDOG,
EXTEND_TIMEOUT_USEC) and when the watchdog is meant for this process. Only
the supervisor holds a :class:`Notifier`; workers drop ``NOTIFY_SOCKET`` and
``WATCHDOG_*`` at fork. Without ``NOTIFY_SOCKET`` every call does nothing.
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


class Notifier:
    """The supervisor's line to systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self.watchdog_s = watchdog_interval(env, os.getpid())
        self._sd = sdnotify.SystemdNotifier() if self.enabled else None

    def send(self, *fields: str) -> None:
        if self._sd is not None:
            self._sd.notify("\n".join(fields))

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")
