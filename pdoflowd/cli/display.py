"""Text for people: tables, durations and the progress bar of ``pdoflow``.

Owns the shapes of the command's human output: aligned tables, a progress
bar with the rate and the time left, and the measuring of that rate. Pure
functions of the values given (the caller passes the clock's readings);
it must not print, read the database or decide exit statuses.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import deque
from collections.abc import Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell; the last column is not padded."""
    widths = [len(h) for h in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = []
    for row in (headers, *rows):
        cells = [
            cell if index == len(row) - 1 else cell.ljust(widths[index])
            for index, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def duration(seconds: float | None) -> str:
    """A duration as a person reads it: 45s, 3m05s, 2h07m, or ? unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def timestamp(value: dt.datetime | None) -> str:
    """A time to the second in its own offset, or - for none."""
    if value is None:
        return "-"
    return value.isoformat(sep=" ", timespec="seconds")


def one_line(text: str | None, width: int = 60) -> str:
    """The first line of a text, cut to ``width`` characters."""
    if not text:
        return ""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= width else first[: width - 1] + "…"


class RateMeter:
    """Jobs per second over the last ``window_s`` seconds of readings."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self._readings: deque[tuple[float, int]] = deque()

    def add(self, now: float, ended: int) -> None:
        self._readings.append((now, ended))
        while len(self._readings) > 2 and (
            now - self._readings[1][0] >= self.window_s
        ):
            self._readings.popleft()

    def rate(self) -> float | None:
        """Jobs per second, or None before two readings a moment apart."""
        if len(self._readings) < 2:
            return None
        (t0, n0), (t1, n1) = self._readings[0], self._readings[-1]
        if t1 - t0 <= 0:
            return None
        return max(0.0, (n1 - n0) / (t1 - t0))


def progress_bar(
    ended: int,
    total: int,
    rate: float | None,
    status: str,
    width: int = 30,
) -> str:
    """``[#####.....]  42/100  42%  3.1 jobs/s  ETA 19s  executing``."""
    fraction = ended / total if total else 0.0
    filled = min(width, int(fraction * width))
    bar = "#" * filled + "." * (width - filled)
    left = total - ended
    if rate:
        speed = f"{rate:.1f} jobs/s"
        eta = duration(left / rate)
    else:
        speed = "- jobs/s"
        eta = "0s" if left == 0 else "?"
    return (
        f"[{bar}]  {ended}/{total}  {fraction:4.0%}  {speed}  ETA {eta}  "
        f"{status}"
    )
