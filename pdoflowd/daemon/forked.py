"""What a process the supervisor forks does first: leave the supervisor's.

Owns undoing what a fork inherits that belongs to the supervisor, for a
worker and for the database session alike: the signal wake-up fd, the
descriptors the supervisor listed (its own pipes, other children's, the
HTTP sockets), the systemd variables (only the supervisor speaks to
systemd), and asking the kernel for a signal when the parent dies. Each
child sets its own signal dispositions (through the callback it passes,
run after the wake-up fd is gone and before the parent-death signal is
asked for); this module must not choose them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Callable, Iterable

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def leave_supervisor(
    inherited_fds: Iterable[int],
    *,
    set_signals: Callable[[], None],
    on_parent_death: signal.Signals,
    name: bytes | None = None,
) -> None:
    """Drop the supervisor's descriptors and systemd variables, run
    ``set_signals``, then have the kernel send ``on_parent_death`` when the
    parent dies; ``name``, when given, becomes the process name (ps, top,
    /proc/PID/comm)."""
    signal.set_wakeup_fd(-1)
    for fd in inherited_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    for variable in _SYSTEMD_VARIABLES:
        os.environ.pop(variable, None)
    set_signals()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, on_parent_death, 0, 0, 0)
        if name is not None:
            libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
