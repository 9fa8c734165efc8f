"""Periodic chores of the supervisor's loop, as values.

Owns one thing: :class:`Every`, which says whether a chore repeated every
so many seconds is due at a given moment, and when it is next due. It is
pure: the caller passes the clock's reading, so a test needs no sleeping.
It must not read a clock, sleep, or run the chore itself.
"""

from __future__ import annotations


class Every:
    """A chore due every ``interval_s`` seconds, first at ``first_at``.

    Each time :meth:`due` answers True the next time is counted from that
    moment, not from when the chore was due: a loop that was late runs the
    chore once, never a burst of missed ones.
    """

    def __init__(self, interval_s: float, *, first_at: float = 0.0) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval must be positive: {interval_s!r}")
        self.interval_s = interval_s
        self.next_at = first_at

    def due(self, now: float) -> bool:
        """True if the chore is due at ``now``; it is then next due one
        interval later."""
        if now < self.next_at:
            return False
        self.next_at = now + self.interval_s
        return True
