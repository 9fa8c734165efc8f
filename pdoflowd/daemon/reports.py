"""The report pipe's protocol: what a worker tells its supervisor.

Owns the lines a worker writes on its report pipe, one JSON object per
line with an ``"event"`` key, as small frozen dataclasses: the worker
makes one and sends :func:`encode`'s bytes; the supervisor reads a line
and gets it back from :func:`decode`, which raises ValueError for a line
that is not a report (and checks a metrics report whole, so a bad one
changes nothing). It owns the metrics report's content too: its version
and the outcome labels it counts (:data:`OUTCOMES`). It must not count,
keep state or do I/O: the worker writes the bytes, the supervisor reads
them, and :mod:`~pdoflowd.daemon.metrics` counts what they say.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

__all__ = [
    "OUTCOMES",
    "REPORT_VERSION",
    "Attempts",
    "BootFailed",
    "DbError",
    "MetricsReport",
    "Ready",
    "Report",
    "ReportEvent",
    "Retiring",
    "decode",
    "encode",
    "encode_message",
    "from_message",
]

REPORT_VERSION = 1

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
class Attempts:
    """Attempts of one outcome and function: how many, and how long the
    function ran in those that called it (at most ``count`` durations)."""

    count: int
    durations_s: tuple[float, ...] = ()


@dataclass(frozen=True)
class MetricsReport:
    """What a worker counted since its last metrics report.

    ``claimed``: jobs claimed; ``claim_s``: how long each claim statement
    took (empty claims included); ``wait_s``: for each job started, how
    long it had been runnable; ``outcomes``: the attempts whose outcome was
    recorded, by outcome label (one of OUTCOMES), then by function (its
    entry point), in the order they were first seen.
    """

    claimed: int = 0
    claim_s: tuple[float, ...] = ()
    wait_s: tuple[float, ...] = ()
    outcomes: Mapping[str, Mapping[str, Attempts]] = field(default_factory=dict)
    event: ClassVar[ReportEvent] = ReportEvent.METRICS

    def message(self) -> dict[str, Any]:
        """The report as its JSON object. Durations are grouped by outcome
        and function, so a batch of a few hundred jobs of one function costs
        one name and a list of numbers."""
        return {
            "event": self.event.value,
            "v": REPORT_VERSION,
            "claimed": self.claimed,
            "claim_s": list(self.claim_s),
            "wait_s": list(self.wait_s),
            "outcomes": {
                outcome: {
                    function: [group.count, list(group.durations_s)]
                    for function, group in by_function.items()
                }
                for outcome, by_function in self.outcomes.items()
            },
        }

    def merged(
        self, later: MetricsReport, *, max_samples: int = 10000
    ) -> MetricsReport:
        """One report that counts what this one and ``later`` count.

        For a report a worker could not send yet (its supervisor was not
        reading): the next one is merged into it rather than queued behind
        it. Counts add up exactly; each list of durations keeps at most
        ``max_samples`` (the earliest), so a report held for long stays
        bounded while every counter stays exact.
        """
        outcomes: dict[str, dict[str, Attempts]] = {}
        for report in (self, later):
            for outcome, by_function in report.outcomes.items():
                into = outcomes.setdefault(outcome, {})
                for function, group in by_function.items():
                    so_far = into.get(function, Attempts(0))
                    into[function] = Attempts(
                        so_far.count + group.count,
                        (*so_far.durations_s, *group.durations_s)[:max_samples],
                    )
        return MetricsReport(
            self.claimed + later.claimed,
            (*self.claim_s, *later.claim_s)[:max_samples],
            (*self.wait_s, *later.wait_s)[:max_samples],
            outcomes,
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


def _numbers(value: object, what: str) -> tuple[float, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{what}: expected a list, got {value!r}")
    return tuple(_number(v, what) for v in value)


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
                raise ValueError(f"{where}: expected [count, [durations]]")
            count = _count(group[0], where)
            durations = _numbers(group[1], where)
            if len(durations) > count:
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
        _numbers(message.get("claim_s", []), "claim_s"),
        _numbers(message.get("wait_s", []), "wait_s"),
        outcomes,
    )
