"""The console's inputs, checked, and the figures its pages compute.

Owns turning query strings and path parts into values (each bad one a
:class:`BadInput` that the page answers with 400 and its message) and the
pure arithmetic of the pages: ETA, percentages, the per-minute chart's
bars, ages as text. It must not touch HTTP objects or the database.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from pdoflowd.arguments import decode
from pdoflowd.status import JobStatus, PostingStatus

__all__ = [
    "PAGE_SIZE",
    "BadInput",
    "Bar",
    "age_text",
    "bars",
    "eta_s",
    "job_actions",
    "max_age_s",
    "one_of",
    "page_number",
    "page_query",
    "percent",
    "posting_actions",
    "text_filter",
    "uuid_of",
    "value_text",
    "when_text",
]

PAGE_SIZE = 50
_MAX_PAGE = 100_000
_MAX_FILTER_CHARS = 200
_AGE = re.compile(r"([0-9]{1,7})([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class BadInput(ValueError):
    """A value a page cannot use; its message is shown with status 400."""


def uuid_of(text: str, what: str = "id") -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise BadInput(f"{what} {text[:80]!r} is not a UUID") from None


def page_number(text: str | None) -> int:
    """A 1-based page number; "" or None is page 1."""
    if not text:
        return 1
    if not text.isdigit() or not 1 <= int(text) <= _MAX_PAGE:
        raise BadInput(
            f"page must be a whole number from 1 to {_MAX_PAGE},"
            f" got {text[:20]!r}"
        )
    return int(text)


def one_of(
    text: str | None, kind: type[PostingStatus] | type[JobStatus], what: str
) -> PostingStatus | JobStatus | None:
    """A status of ``kind`` by its value; "" or None is no filter."""
    if not text:
        return None
    for member in kind:
        if member.value == text:
            return member
    names = ", ".join(m.value for m in kind)
    raise BadInput(f"{what} must be one of {names}, got {text[:40]!r}")


def text_filter(text: str | None, what: str) -> str:
    text = (text or "").strip()
    if len(text) > _MAX_FILTER_CHARS:
        raise BadInput(f"{what} is longer than {_MAX_FILTER_CHARS} characters")
    if any(ord(c) < 32 for c in text):
        raise BadInput(f"{what} holds control characters")
    return text


def max_age_s(text: str | None) -> float | None:
    """An age such as 90, 90s, 15m, 2h or 7d, in seconds; "" is none."""
    text = (text or "").strip()
    if not text:
        return None
    match = _AGE.fullmatch(text)
    if match is None or int(match[1]) == 0:
        raise BadInput(
            f"age must be a positive number with s, m, h or d (e.g. 2h),"
            f" got {text[:20]!r}"
        )
    return float(int(match[1]) * _UNIT_S[match[2]])


def percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def eta_s(ended: int, total: int, elapsed_s: float) -> float | None:
    """Seconds until the rest ends at the rate so far; None when nothing
    has ended yet (no rate) or nothing is left."""
    left = total - ended
    if ended <= 0 or left <= 0 or elapsed_s <= 0:
        return None
    return left * elapsed_s / ended


def age_text(seconds: float | None) -> str:
    """A duration as a person reads it: 4 s, 3 min 20 s, 2 h 5 min, 3 d 4 h."""
    if seconds is None or math.isnan(seconds):
        return "\u2013"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


@dataclass(frozen=True)
class Bar:
    """One bar of a per-minute chart, in the SVG's units."""

    x: float
    height: float
    label: str
    value: int


def bars(
    values: Sequence[tuple[str, int]], *, width: float, height: float
) -> list[Bar]:
    """Bars filling ``width`` x ``height`` for (label, value) pairs, the
    highest value reaching the top."""
    if not values:
        return []
    top = max(v for _, v in values) or 1
    step = width / len(values)
    return [
        Bar(i * step, height * value / top, label, value)
        for i, (label, value) in enumerate(values)
    ]


def counts_json(jobs: Mapping[JobStatus, int]) -> dict[str, int]:
    return {status.value: count for status, count in jobs.items()}


def page_query(params: Mapping[str, str], page: int) -> str:
    return "?" + urllib.parse.urlencode({**params, "page": str(page)})


def posting_actions(status: PostingStatus, errored: int) -> list[str]:
    can = []
    if status is PostingStatus.EXECUTING:
        can.append("pause")
    if status in (PostingStatus.PAUSED, PostingStatus.ERRORED_OUT):
        can.append("resume")
    if status in (
        PostingStatus.PAUSED,
        PostingStatus.EXECUTING,
        PostingStatus.ERRORED_OUT,
    ):
        can.append("cancel")
    if errored:
        can.append("retry")
    return can


def job_actions(job: JobStatus, posting: PostingStatus) -> list[str]:
    if job in (JobStatus.HELD, JobStatus.WAITING, JobStatus.EXECUTING):
        return ["cancel"]
    if job is JobStatus.ERRORED_OUT and posting is not PostingStatus.CANCELLED:
        return ["retry"]
    return []


def when_text(moment: dt.datetime | None) -> str:
    """A moment in UTC, to the second; a dash for none."""
    if moment is None:
        return "\u2013"
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def value_text(value: Any) -> str:
    """A stored JSON value (arguments, a result, a shared variable) as the
    poster gave it, indented; as stored when it is not a tagged value."""
    with contextlib.suppress(ValueError):
        value = decode(value)
    return json.dumps(value, indent=2, default=repr, ensure_ascii=False)
