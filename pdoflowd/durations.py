"""Durations as a person writes them on a command line: ``30d``, ``12h``.

Owns the one spelling of a duration, ``<number><s|m|h|d>`` (``0s``
included, a decimal number such as ``1.5h`` too), reading it as seconds,
and writing seconds back in it. Pure: no clock, no I/O. Whether a bare
number (seconds, the older spelling) is accepted is the caller's choice.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "DURATION_UNITS",
    "MAX_DURATION_S",
    "DurationError",
    "duration_text",
    "parse_duration",
]

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# A hundred years: far inside what a timedelta and PostgreSQL's interval
# arithmetic on now() can carry.
MAX_DURATION_S = 36500 * 86400

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)([smhd])")


class DurationError(ValueError):
    """Text that is not a duration; says what is expected."""


def parse_duration(text: str, *, bare_seconds: bool = False) -> float:
    """``text`` (e.g. ``30d``, ``1.5h``, ``0s``) as seconds.

    With ``bare_seconds`` a number without a unit is seconds too, as
    ``float`` reads it (the older spelling of such options). Negative
    numbers, ``inf`` and ``nan``, and durations above
    :data:`MAX_DURATION_S` are refused with :class:`DurationError`.
    """
    match = _DURATION.fullmatch(text)
    bare = _bare_seconds(text) if bare_seconds else None
    if match is not None:
        seconds = float(match[1]) * DURATION_UNITS[match[2]]
    elif bare is not None:
        seconds = bare
    else:
        plain = " or a number of seconds" if bare_seconds else ""
        raise DurationError(
            "expected a duration such as 30d, 12h, 90m or 45s"
            f"{plain}, got {text!r}"
        )
    if not math.isfinite(seconds) or seconds > MAX_DURATION_S:
        raise DurationError(
            f"expected a duration of at most {MAX_DURATION_S // 86400}d,"
            f" got {text!r}"
        )
    return seconds


def _bare_seconds(text: str) -> float | None:
    """A number of seconds as the older options took it (what ``float``
    reads, e.g. ``1e3``), if it is one and at least 0."""
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def duration_text(seconds: float) -> str:
    """``seconds`` in the largest unit that writes it as a whole number
    (``86400`` is ``1d``, ``90`` is ``90s``); a fraction of a second is
    written to the microsecond (``1.5`` is ``1.5s``)."""
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"not a duration: {seconds!r}")
    for unit, size in sorted(DURATION_UNITS.items(), key=lambda item: -item[1]):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:.6f}".rstrip("0").rstrip(".") + "s"
