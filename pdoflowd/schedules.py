"""Schedules' fire times and which of them to post: pure, no I/O.

Owns reading a schedule's timing (a five-field cron expression or one of
its ``@`` aliases, in an IANA time zone; or ``every_s``, seconds counted
from the Unix epoch), the set of instants it fires at, the rule that says
which fire times a scheduler posts now (:func:`due_runs`: the ones on
time, and at most ``backfill`` of those missed while no daemon watched),
and the posting key a fire time gets. Every daemon computes the same
instants from the same schedule, which is what lets the database's unique
key on (schedule, fire time) make each run happen once.

Cron expressions are parsed by croniter, on naive wall-clock times only
(its handling of time zones differs between the releases Debian ships
and PyPI's), and each wall-clock match is turned into an instant here:

- a wall-clock time that a change to summer time skips is taken with the
  offset from before the change, so it fires as the clocks jump or a
  little after (02:30 fires at 03:30 new time), once even if several
  matches land on the same instant;
- a wall-clock time that happens twice (the change back) fires once, at
  its first occurrence.

It must not read the clock, the configuration or the database: callers
pass every fact in, so that each rule can be tested on its own.
"""

from __future__ import annotations

import datetime as dt
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

__all__ = [
    "ALIASES",
    "DEFAULT_KEY",
    "KEY_FIELDS",
    "MISSED_AFTER_S",
    "FireTimes",
    "RunAt",
    "cron_expression",
    "due_runs",
    "grace",
    "key_problems",
    "posting_key",
    "time_zone",
]

UTC = dt.timezone.utc
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = dt.timedelta(microseconds=1)

# The aliases of cron(8), spelt out in the five fields.
ALIASES: Mapping[str, str] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

# A fire time counts as missed once this long has passed after it, or once
# the next one has come if that is sooner (see grace()).
MISSED_AFTER_S = 300

# The posting key of a schedule that names none.
DEFAULT_KEY = "schedule:{schedule}:{run_at}"
KEY_FIELDS = ("schedule", "run_at")
# postings.idempotency_key's bounds.
KEY_MAX_CHARS = 200


# ---------------------------------------------------------------- reading


def cron_expression(text: str) -> str:
    """The five fields of a cron expression or alias; ValueError says what
    is wrong (the message never repeats the key)."""
    if not isinstance(text, str):
        raise ValueError("expected a cron expression")
    stripped = " ".join(text.split())
    if stripped.startswith("@"):
        expanded = ALIASES.get(stripped.lower())
        if expanded is None:
            names = ", ".join(sorted(set(ALIASES)))
            raise ValueError(f"unknown alias {stripped!r}; use one of {names}")
        return expanded
    fields = stripped.split(" ") if stripped else []
    if len(fields) != 5:
        raise ValueError(
            "expected five fields (minute hour day-of-month month "
            f"day-of-week) or an alias such as @daily, got {len(fields)}"
            f" field{'s' if len(fields) != 1 else ''}"
        )
    start = dt.datetime(2000, 1, 1)
    try:
        croniter(stripped, start).get_next(dt.datetime)
    except Exception as exc:  # croniter's errors vary between releases
        raise ValueError(f"not a valid cron expression: {exc}") from None
    return stripped


def time_zone(name: str) -> dt.tzinfo:
    """The IANA time zone ``name``; ValueError says why not."""
    if name == "UTC":
        # Needs no time zone database (tzdata) at all.
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f"{name!r} is not an IANA time zone name (e.g. Europe/Paris,"
            " UTC) known to this host's time zone database"
        ) from None


# ---------------------------------------------------------------- instants


def _as_utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        raise ValueError("a naive datetime is no instant")
    return value.astimezone(UTC)


@dataclass(frozen=True)
class FireTimes:
    """The instants a schedule fires at, as timezone-aware UTC datetimes.

    Either ``cron`` (five fields, see :func:`cron_expression`) in ``zone``,
    or ``every_s``: every multiple of that many seconds since the epoch.
    """

    cron: str | None = None
    every_s: int | None = None
    zone: dt.tzinfo = UTC

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every_s is None):
            raise ValueError("give either cron or every_s")
        if self.every_s is not None and self.every_s < 1:
            raise ValueError("every_s must be at least 1")

    def _instant(self, wall: dt.datetime) -> dt.datetime:
        """The instant of a naive wall-clock time in the zone (fold 0:
        the first of a repeated time, the offset before a skipped one)."""
        return wall.replace(tzinfo=self.zone, fold=0).astimezone(UTC)

    def after(self, moment: dt.datetime) -> Iterator[dt.datetime]:
        """The fire times strictly after ``moment``, ascending, forever."""
        moment = _as_utc(moment)
        if self.every_s is not None:
            step = self.every_s * 1_000_000
            count = (moment - EPOCH) // _MICROSECOND // step + 1
            while True:
                yield EPOCH + dt.timedelta(microseconds=count * step)
                count += 1
        assert self.cron is not None
        wall = moment.astimezone(self.zone).replace(tzinfo=None)
        matches = croniter(self.cron, wall)
        last = moment
        while True:
            instant = self._instant(matches.get_next(dt.datetime))
            if instant > last:
                last = instant
                yield instant

    def at_or_before(self, moment: dt.datetime) -> Iterator[dt.datetime]:
        """The fire times at or before ``moment``, newest first, until
        croniter finds no earlier one."""
        moment = _as_utc(moment)
        if self.every_s is not None:
            step = self.every_s * 1_000_000
            count = (moment - EPOCH) // _MICROSECOND // step
            while True:
                yield EPOCH + dt.timedelta(microseconds=count * step)
                count -= 1
        assert self.cron is not None
        local = moment.astimezone(self.zone)
        wall = local.replace(tzinfo=None)
        # In the second pass of a repeated hour, wall-clock times up to the
        # end of that hour still map (fold 0) to instants before moment.
        first_offset = wall.replace(tzinfo=self.zone, fold=0).utcoffset()
        own_offset = local.utcoffset()
        if first_offset is not None and own_offset is not None:
            wall += max(dt.timedelta(0), first_offset - own_offset)
        matches = croniter(self.cron, wall + _MICROSECOND)
        previous: dt.datetime | None = None
        while True:
            try:
                match = matches.get_prev(dt.datetime)
            except ValueError:  # no earlier match croniter can find
                return
            instant = self._instant(match)
            if instant <= moment and (previous is None or instant < previous):
                previous = instant
                yield instant

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        """The first fire time strictly after ``moment``."""
        return next(self.after(moment))

    def upcoming(self, moment: dt.datetime, count: int) -> list[dt.datetime]:
        """The next ``count`` fire times after ``moment``."""
        times = self.after(moment)
        return [next(times) for _ in range(count)]


def grace(times: FireTimes, fire_time: dt.datetime) -> dt.timedelta:
    """How long after ``fire_time`` posting it is still on time: until the
    next fire time, or :data:`MISSED_AFTER_S`, whichever is sooner."""
    period = times.next_after(fire_time) - fire_time
    return min(period, dt.timedelta(seconds=MISSED_AFTER_S))


# ---------------------------------------------------------------- the policy


def due_runs(
    times: FireTimes,
    *,
    last: dt.datetime | None,
    now: dt.datetime,
    watching_since: dt.datetime,
    backfill: int,
    limit: int = 100,
) -> list[dt.datetime]:
    """The fire times a scheduler posts now, oldest first.

    ``last`` is the newest fire time posted so far by any daemon (None:
    never), ``now`` the database's time, ``watching_since`` when this
    scheduler began to watch (connected and read the runs). A fire time
    after ``last`` and at or before ``now`` is due. It is *missed* when its
    grace (:func:`grace`) had ended before anyone watched, i.e. before
    ``watching_since``: of those, only the newest ``backfill`` are posted,
    and none for a schedule that never ran. Every other due fire time is
    on time and posted, however late this scheduler is (it was watching).
    At most ``limit``, the oldest: the rest come at the next pass.
    """
    on_time: list[dt.datetime] = []
    missed: list[dt.datetime] = []
    for fire_time in times.at_or_before(now):
        if last is not None and fire_time <= last:
            break
        if fire_time + grace(times, fire_time) <= watching_since:
            # Missed, and so is every older one.
            if last is None or len(missed) >= backfill:
                break
            missed.append(fire_time)
        else:
            on_time.append(fire_time)
        if len(on_time) + len(missed) >= _SCAN_LIMIT:
            break
    due = sorted(missed + on_time)
    return due[:limit]


# How many due fire times due_runs looks at, at most, in one call: a
# scheduler far behind catches up over several passes.
_SCAN_LIMIT = 10_000


# ---------------------------------------------------------------- keys


class RunAt(dt.datetime):
    """A fire time as a key template sees it: plain ``{run_at}`` is ISO
    8601 in UTC; ``{run_at:%Y-%m-%d}`` and the like are strftime's."""

    def __format__(self, spec: str) -> str:
        if not spec:
            return self.isoformat()
        return super().__format__(spec)

    @classmethod
    def of(cls, moment: dt.datetime) -> RunAt:
        utc = _as_utc(moment)
        return cls(
            utc.year,
            utc.month,
            utc.day,
            utc.hour,
            utc.minute,
            utc.second,
            utc.microsecond,
            tzinfo=UTC,
        )


def posting_key(template: str, schedule: str, fire_time: dt.datetime) -> str:
    """The posting key of ``schedule``'s run at ``fire_time``."""
    return template.format(schedule=schedule, run_at=RunAt.of(fire_time))


def key_problems(template: str, schedule: str = "example") -> Iterator[str]:
    """What is wrong with a key template (short messages, never the key)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        yield f"not a valid template: {exc}"
        return
    for _, field, _, _ in parsed:
        if field is None:
            continue
        root = field.split(".", 1)[0].split("[", 1)[0]
        if root not in KEY_FIELDS:
            shown = "{" + field + "}" if field else "{}"
            yield (
                f"unknown field {shown}; a key may use {{schedule}} and"
                " {run_at}"
            )
            return
    sample = dt.datetime(2030, 12, 31, 23, 59, 59, tzinfo=UTC)
    try:
        key = posting_key(template, schedule, sample)
    except (ValueError, AttributeError, IndexError, KeyError, TypeError) as e:
        yield f"cannot be filled in: {e}"
        return
    if not 1 <= len(key) <= KEY_MAX_CHARS:
        yield (
            f"makes a key of {len(key)} characters; a key has 1 to"
            f" {KEY_MAX_CHARS}"
        )
