"""The report pipe's protocol: what a worker tells its supervisor.

Owns the lines a worker writes on its report pipe, one JSON object per
line with an ``"event"`` key, as small frozen dataclasses: the worker
makes one and sends :func:`encode`'s bytes; the supervisor reads a line
and gets it back from :func:`decode`, which raises ValueError for a line
that is not a report (and checks a metrics report whole, so a bad one
changes nothing). It owns the metrics report's content too: its version,
the outcome labels it counts (:data:`OUTCOMES`) and the bucket bounds of
its histograms (:data:`DURATION_BUCKETS`, :data:`WAIT_BUCKETS`,
:data:`CLAIM_BUCKETS`), which a worker bins its durations into
(:func:`bins_of`) and the supervisor exports. It must not count, keep
state or do I/O: the worker writes the bytes, the supervisor reads them,
and :mod:`~pdoflowd.daemon.metrics` counts what they say.
"""

from __future__ import annotations

import bisect
import enum
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

__all__ = [
    "CLAIM_BUCKETS",
    "DURATION_BUCKETS",
    "OUTCOMES",
    "REPORT_VERSION",
    "WAIT_BUCKETS",
    "Attempts",
    "Bins",
    "BootFailed",
    "DbError",
    "MetricsReport",
    "Ready",
    "Report",
    "ReportEvent",
    "Retiring",
    "bins_of",
    "decode",
    "encode",
    "encode_message",
    "from_message",
]

# A worker is always forked from its supervisor, so both run the same
# code: the version never has to bridge two shapes, it only makes a line of
# another shape a refused report rather than a misread one. Bump it with
# every change of the metrics report's JSON shape (2: histograms pre-binned
# by the worker, bucket counts and sums instead of samples; a sequence
# number).
REPORT_VERSION = 2

OUTCOMES = (
    "done",
    "failed",
    "errored_out",
    "timeout",
    "worker_died",
    "released",
    "refused",
)
"""What became of one claimed job's attempt; every attempt has exactly one.

done: the function returned. failed: it raised and the job will be retried.
errored_out: it raised and no try is left. timeout: it ran past its
timeout, retried or not. worker_died: its worker (or host) died under it.
released: it was given back without being started. refused: its entry point
names nothing a job may run (see entrypoints); it errored out unrun.
"""


# Seconds: the upper bounds of the histograms' buckets, as Prometheus'
# ``le``; above the last, +Inf. Jobs run from milliseconds to hours; a
# claim should take milliseconds; a job may wait from milliseconds to days.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
    60, 120, 300, 600, 1800, 3600, 7200, 21600,
)  # fmt: skip
WAIT_BUCKETS: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
    600, 1800, 3600, 7200, 21600, 86400,
)  # fmt: skip
CLAIM_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1, 2.5, 5, 10,
)  # fmt: skip


class ReportEvent(str, enum.Enum):
    """The ``"event"`` of a report line."""

    READY = "ready"
    BOOT_FAILED = "boot_failed"
    RETIRING = "retiring"
    DB_ERROR = "db_error"
    METRICS = "metrics"


@dataclass(frozen=True)
class Ready:
    """The worker is connected and about to claim its first jobs."""

    event: ClassVar[ReportEvent] = ReportEvent.READY

    def message(self) -> dict[str, Any]:
        return {"event": self.event.value}


@dataclass(frozen=True)
class BootFailed:
    """The worker could not start (it exits with EXIT_WORKER_BOOT_FAILED);
    ``reason`` is what went wrong, redacted."""

    reason: str
    event: ClassVar[ReportEvent] = ReportEvent.BOOT_FAILED

    def message(self) -> dict[str, Any]:
        return {"event": self.event.value, "reason": self.reason}


@dataclass(frozen=True)
class Retiring:
    """The worker exits to be replaced: ``reason`` is ``max_jobs`` or
    ``max_memory`` (a restart reason of the metrics)."""

    reason: str
    event: ClassVar[ReportEvent] = ReportEvent.RETIRING

    def message(self) -> dict[str, Any]:
        return {"event": self.event.value, "reason": self.reason}


@dataclass(frozen=True)
class DbError:
    """A database ``operation`` of the worker failed (each retry counts)."""

    operation: str
    event: ClassVar[ReportEvent] = ReportEvent.DB_ERROR

    def message(self) -> dict[str, Any]:
        return {"event": self.event.value, "operation": self.operation}


@dataclass(frozen=True)
class Bins:
    """Durations binned into a histogram's buckets, and their sum.

    ``counts[i]``: the durations in bucket ``i`` alone (not cumulative):
    those not above its bound and above the bound before it, as Prometheus'
    ``le``; the one past the last bound counts those above every bound
    (+Inf). Buckets past the last non-empty one are left out, so equal
    histograms are equal values and an empty one is ``Bins()``. Which
    bounds apply is the field's: see :class:`MetricsReport`.
    """

    counts: tuple[int, ...] = ()
    sum_s: float = 0.0

    def __post_init__(self) -> None:
        counts = self.counts
        end = len(counts)
        while end and not counts[end - 1]:
            end -= 1
        if end != len(counts) or type(counts) is not tuple:
            object.__setattr__(self, "counts", tuple(counts[:end]))

    @property
    def count(self) -> int:
        """How many durations were binned."""
        return sum(self.counts)

    def plus(self, other: Bins) -> Bins:
        """The histogram of both: bucket counts and sums added, exactly."""
        mine, theirs = self.counts, other.counts
        if len(mine) < len(theirs):
            mine, theirs = theirs, mine
        counts = list(mine)
        for index, count in enumerate(theirs):
            counts[index] += count
        return Bins(tuple(counts), self.sum_s + other.sum_s)

    def message(self) -> list[Any]:
        """As JSON: ``[sum, [count per bucket, ...]]``."""
        return [self.sum_s, list(self.counts)]


def bins_of(bounds: tuple[float, ...], durations: Iterable[float]) -> Bins:
    """``durations`` binned into the buckets of ``bounds`` (sorted).

    Negative durations count as 0. The sum adds the durations in their
    order, as a Prometheus histogram observing them one by one would.
    """
    counts = [0] * (len(bounds) + 1)
    total = 0.0
    for duration in durations:
        seconds = max(0.0, duration)
        counts[bisect.bisect_left(bounds, seconds)] += 1
        total += seconds
    return Bins(tuple(counts), total)


@dataclass(frozen=True)
class Attempts:
    """Attempts of one outcome and function: how many, and how long the
    function ran in those that called it (binned into DURATION_BUCKETS:
    at most ``count`` durations; released and refused jobs have none)."""

    count: int
    durations_s: Bins = Bins()


@dataclass(frozen=True)
class MetricsReport:
    """What a worker counted since its last metrics report.

    ``claimed``: jobs claimed; ``claim_s``: how long each claim statement
    took (empty claims included), binned into CLAIM_BUCKETS; ``wait_s``:
    for each job started, how long it had been runnable, binned into
    WAIT_BUCKETS; ``outcomes``: the attempts whose outcome was recorded,
    by outcome label (one of OUTCOMES), then by function (its entry
    point), in the order they were first seen; ``seq``: the number of the
    worker's report (from 1; of the last one, for reports merged), so the
    supervisor can tell what it has counted from what it has not.
    """

    claimed: int = 0
    claim_s: Bins = Bins()
    wait_s: Bins = Bins()
    outcomes: Mapping[str, Mapping[str, Attempts]] = field(default_factory=dict)
    seq: int = 0
    event: ClassVar[ReportEvent] = ReportEvent.METRICS

    def message(self) -> dict[str, Any]:
        """The report as its JSON object. Its size depends on the outcomes
        and functions seen and the buckets filled, not on how many jobs it
        counts."""
        return {
            "event": self.event.value,
            "v": REPORT_VERSION,
            "seq": self.seq,
            "claimed": self.claimed,
            "claim_s": self.claim_s.message(),
            "wait_s": self.wait_s.message(),
            "outcomes": {
                outcome: {
                    function: [group.count, group.durations_s.message()]
                    for function, group in by_function.items()
                }
                for outcome, by_function in self.outcomes.items()
            },
        }

    def merged(self, later: MetricsReport) -> MetricsReport:
        """One report that counts what this one and ``later`` count.

        For a report a worker could not send yet (its supervisor was not
        reading): the next one is merged into it rather than queued behind
        it. Counts and bucket counts add up exactly, and a report held for
        long stays as small as one report.
        """
        outcomes: dict[str, dict[str, Attempts]] = {}
        for report in (self, later):
            for outcome, by_function in report.outcomes.items():
                into = outcomes.setdefault(outcome, {})
                for function, group in by_function.items():
                    so_far = into.get(function, Attempts(0))
                    into[function] = Attempts(
                        so_far.count + group.count,
                        so_far.durations_s.plus(group.durations_s),
                    )
        return MetricsReport(
            self.claimed + later.claimed,
            self.claim_s.plus(later.claim_s),
            self.wait_s.plus(later.wait_s),
            outcomes,
            max(self.seq, later.seq),
        )


Report: TypeAlias = Ready | BootFailed | Retiring | DbError | MetricsReport


def encode_message(message: Mapping[str, Any]) -> bytes:
    """One JSON object as a line of the report pipe."""
    return (json.dumps(message) + "\n").encode()


def encode(report: Report) -> bytes:
    """The line a worker writes on its report pipe for ``report``."""
    return encode_message(report.message())


def decode(line: bytes | str) -> Report:
    """The report a line read from a worker's pipe holds.

    Raises ValueError when the line is not JSON, not an object, names no
    known event, or is a metrics report that does not add up.
    """
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError(f"a report is a JSON object, not {message!r}")
    return from_message(message)


def from_message(message: Mapping[str, Any]) -> Report:
    """The report a decoded JSON object holds (see :func:`decode`).

    The fields of a report other than a metrics one are taken as text,
    whatever they hold, as the supervisor always took them.
    """
    event = message.get("event")
    try:
        kind = ReportEvent(event)
    except ValueError:
        raise ValueError(f"unknown report event {event!r}") from None
    if kind is ReportEvent.READY:
        return Ready()
    if kind is ReportEvent.BOOT_FAILED:
        return BootFailed(str(message.get("reason")))
    if kind is ReportEvent.RETIRING:
        return Retiring(str(message.get("reason")))
    if kind is ReportEvent.DB_ERROR:
        return DbError(str(message.get("operation", "")))
    return _metrics_report(message)


# ------------------------------------------------------------ metrics


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{what}: expected a finite number >= 0, got {value}")
    return number


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what}: expected a count, got {value!r}")
    return value


def _bins(value: object, bounds: tuple[float, ...], what: str) -> Bins:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"{what}: expected [sum, [counts]], got {value!r}")
    total, counts = value
    if not isinstance(counts, list) or len(counts) > len(bounds) + 1:
        raise ValueError(
            f"{what}: expected at most {len(bounds) + 1} bucket counts,"
            f" got {counts!r}"
        )
    return Bins(tuple(_count(c, what) for c in counts), _number(total, what))


def _groups(
    outcomes: object,
) -> Iterable[tuple[str, str, Attempts]]:
    if not isinstance(outcomes, dict):
        raise ValueError(f"outcomes: expected an object, got {outcomes!r}")
    for outcome, by_function in outcomes.items():
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        if not isinstance(by_function, dict):
            raise ValueError(f"outcomes.{outcome}: expected an object")
        for function, group in by_function.items():
            where = f"outcomes.{outcome}.{function}"
            if not isinstance(group, list) or len(group) != 2:
                raise ValueError(f"{where}: expected [count, [sum, [counts]]]")
            count = _count(group[0], where)
            durations = _bins(group[1], DURATION_BUCKETS, where)
            if durations.count > count:
                raise ValueError(f"{where}: more durations than jobs")
            yield outcome, str(function), Attempts(count, durations)


def _metrics_report(message: Mapping[str, Any]) -> MetricsReport:
    if message.get("v") != REPORT_VERSION:
        raise ValueError(f"unknown report version {message.get('v')!r}")
    outcomes: dict[str, dict[str, Attempts]] = {}
    for outcome, function, group in _groups(message.get("outcomes", {})):
        outcomes.setdefault(outcome, {})[function] = group
    return MetricsReport(
        _count(message.get("claimed", 0), "claimed"),
        _bins(message.get("claim_s", [0, []]), CLAIM_BUCKETS, "claim_s"),
        _bins(message.get("wait_s", [0, []]), WAIT_BUCKETS, "wait_s"),
        outcomes,
        _count(message.get("seq", 0), "seq"),
    )
