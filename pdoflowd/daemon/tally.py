"""What one worker counts for the pool's metrics, and the report it sends.

Owns the worker's side of the metrics: :class:`WorkerTally` notes claims
and runs, bins every duration into its histogram's buckets, and turns them
into a :class:`~pdoflowd.daemon.reports.MetricsReport` after each claim
and after each flush of outcomes, counting only the outcomes the database
accepted; :func:`outcome_of` says which outcome label a recorded outcome
gets. The supervisor applies the report
(:meth:`~pdoflowd.daemon.metrics.PoolMetrics.apply`). It must not write to
the pipe, touch the database or the registry: it lives in the worker.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, Protocol

from pdoflowd.daemon import reports
from pdoflowd.daemon.reports import (
    CLAIM_BUCKETS,
    DURATION_BUCKETS,
    OUTCOMES,
    WAIT_BUCKETS,
    Attempts,
    Bins,
    MetricsReport,
    bins_of,
)
from pdoflowd.status import OutcomeKind, outcome_kind

__all__ = [
    "JobRun",
    "RecordedLike",
    "WorkerTally",
    "batch_report",
    "merge_reports",
    "metrics_report",
    "outcome_of",
]


class JobRun(NamedTuple):
    """One job whose outcome the database accepted, as a worker reports it.

    ``duration_s`` is None when the function was never called (released or
    refused jobs).
    """

    outcome: str
    function: str
    duration_s: float | None


class RecordedLike(Protocol):
    """What :meth:`WorkerTally.note_recorded` needs of a recorded outcome."""

    @property
    def job_id(self) -> int: ...

    @property
    def kind(self) -> str: ...

    @property
    def status(self) -> str: ...


# The labels of the kinds whose label is their own (read per outcome: a
# dict lookup, not the enum's value property).
_OWN_LABELS = {
    kind: str(kind.value)
    for kind in (OutcomeKind.DONE, OutcomeKind.RELEASED, OutcomeKind.REFUSED)
}


def outcome_of(kind: str, status: str, *, timed_out: bool = False) -> str:
    """The outcome label of an outcome ``kind`` the database recorded.

    ``status`` is the job's status after the write (it tells a failure that
    will be retried from one that used the last try).
    """
    try:
        known = outcome_kind(kind)
    except ValueError:
        raise ValueError(f"unknown outcome kind {kind!r}") from None
    if timed_out or known is OutcomeKind.TIMEOUT:
        return "timeout"
    label = _OWN_LABELS.get(known)
    if label is not None:
        return label
    # A JobStatus is a str: it compares equal to its value.
    return "failed" if status == "waiting" else "errored_out"


def metrics_report(
    *,
    claimed: int = 0,
    claim_s: Iterable[float] = (),
    wait_s: Iterable[float] = (),
    runs: Iterable[JobRun] = (),
) -> MetricsReport:
    """The report of what a worker noted, its durations binned.

    ``claimed``: jobs claimed; ``claim_s``: how long each claim statement
    took (empty claims included); ``wait_s``: for each job started, how long
    it had been runnable; ``runs``: the jobs whose outcome was recorded.
    """
    groups: dict[str, dict[str, tuple[int, list[float]]]] = {}
    for run in runs:
        if run.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {run.outcome!r}")
        by_function = groups.setdefault(run.outcome, {})
        count, durations = by_function.get(run.function, (0, []))
        if run.duration_s is not None:
            durations.append(run.duration_s)
        by_function[run.function] = (count + 1, durations)
    return MetricsReport(
        claimed,
        bins_of(CLAIM_BUCKETS, claim_s),
        bins_of(WAIT_BUCKETS, wait_s),
        {
            outcome: {
                function: Attempts(count, bins_of(DURATION_BUCKETS, durations))
                for function, (count, durations) in by_function.items()
            }
            for outcome, by_function in groups.items()
        },
    )


def batch_report(
    *,
    claimed: int = 0,
    claim_s: Iterable[float] = (),
    wait_s: Iterable[float] = (),
    runs: Iterable[JobRun] = (),
) -> dict[str, Any]:
    """:func:`metrics_report` as its JSON object (what the pipe carries)."""
    return metrics_report(
        claimed=claimed, claim_s=claim_s, wait_s=wait_s, runs=runs
    ).message()


def merge_reports(
    first: Mapping[str, Any], second: Mapping[str, Any]
) -> dict[str, Any]:
    """:meth:`MetricsReport.merged` of two reports as JSON objects.

    Raises ValueError when either is not a metrics report.
    """
    both = []
    for message in (first, second):
        report = reports.from_message(message)
        if not isinstance(report, MetricsReport):
            raise ValueError(f"not a metrics report: {message!r}")
        both.append(report)
    return both[0].merged(both[1]).message()


class _Run(NamedTuple):
    function: str
    duration_s: float | None
    timed_out: bool


class _Histogram:
    """Durations binned as they are noted (the worker's own, mutable)."""

    __slots__ = ("bounds", "counts", "sum_s")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        # bisect_left: the first bound not below it, as Prometheus' le.
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum_s += seconds

    def bins(self) -> Bins:
        return Bins(tuple(self.counts), self.sum_s)


class _Attempts:
    """Attempts of one outcome and function, while they are counted."""

    __slots__ = ("count", "durations")

    def __init__(self) -> None:
        self.count = 0
        self.durations = _Histogram(DURATION_BUCKETS)


class WorkerTally:
    """What one worker saw since its last report (lives in the worker).

    Call :meth:`note_claim` after each claim commits and :meth:`note_run`
    for each job run, refused or released; after each claim that returned
    jobs send ``take()``, after each flush ``take(recorded)``, and while
    idle send ``take()`` whenever :meth:`due` says so.
    """

    def __init__(
        self,
        *,
        max_age_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age_s = max_age_s
        self.clock = clock
        # Counted, not reported yet, and since when (None: nothing).
        self._claimed = 0
        self._claim_s = _Histogram(CLAIM_BUCKETS)
        self._wait_s = _Histogram(WAIT_BUCKETS)
        self._outcomes: dict[str, dict[str, _Attempts]] = {}
        self._since: float | None = None
        # Noted, waiting for the flush that records their outcomes.
        self._runs: dict[int, _Run] = {}
        self._waits: list[float] = []

    def note_claim(self, seconds: float, claimed: int) -> None:
        """A claim statement took ``seconds`` and returned ``claimed`` jobs."""
        if self._since is None:
            self._since = self.clock()
        self._claimed += claimed
        self._claim_s.observe(seconds)

    def note_run(
        self,
        job_id: int,
        function: str,
        seconds: float | None = None,
        *,
        waited_s: float | None = None,
        timed_out: bool = False,
    ) -> None:
        """A job ended its attempt in this worker; outcome to be recorded.

        ``function`` is the job's entry point, ``seconds`` how long the
        function ran (None: not called), ``waited_s`` how long the job had
        been runnable when it started, ``timed_out`` whether it hit its
        timeout.
        """
        self._runs[job_id] = _Run(function, seconds, timed_out)
        if waited_s is not None:
            self._waits.append(waited_s)

    def note_recorded(self, recorded: Iterable[RecordedLike]) -> None:
        """The outcomes the flush that just committed wrote.

        Runs noted before that flush but absent from it were fenced off
        (their jobs had been taken back) and are dropped: whoever took them
        back counts them. The queue waits noted before it are counted with
        it, whatever became of their runs.
        """
        counted = False
        for outcome in recorded:
            noted = self._runs.get(outcome.job_id)
            label = outcome_of(
                outcome.kind,
                outcome.status,
                timed_out=bool(noted and noted.timed_out),
            )
            by_function = self._outcomes.setdefault(label, {})
            function = noted.function if noted else ""
            attempts = by_function.get(function)
            if attempts is None:
                attempts = by_function[function] = _Attempts()
            attempts.count += 1
            if noted and noted.duration_s is not None:
                attempts.durations.observe(noted.duration_s)
            counted = True
        self._runs.clear()
        if self._waits:
            for seconds in self._waits:
                self._wait_s.observe(seconds)
            self._waits.clear()
            counted = True
        if counted and self._since is None:
            self._since = self.clock()

    def due(self) -> bool:
        """Something unreported is older than ``max_age_s`` (for idle
        times: runs are reported by the flush that records them)."""
        return (
            self._since is not None
            and self.clock() - self._since >= self.max_age_s
        )

    def take(
        self, recorded: Iterable[RecordedLike] | None = None
    ) -> MetricsReport | None:
        """The report of everything counted, or None when nothing was.

        ``recorded``: the outcomes a flush that just committed wrote, given
        to :meth:`note_recorded` first. Runs whose flush has not come yet,
        and their queue waits, are kept for it.
        """
        if recorded is not None:
            self.note_recorded(recorded)
        if self._since is None:
            return None
        report = MetricsReport(
            self._claimed,
            self._claim_s.bins(),
            self._wait_s.bins(),
            {
                outcome: {
                    function: Attempts(
                        attempts.count, attempts.durations.bins()
                    )
                    for function, attempts in by_function.items()
                }
                for outcome, by_function in self._outcomes.items()
            },
        )
        self._claimed = 0
        self._claim_s = _Histogram(CLAIM_BUCKETS)
        self._wait_s = _Histogram(WAIT_BUCKETS)
        self._outcomes = {}
        self._since = None
        return report

    def take_report(
        self, recorded: Iterable[RecordedLike] | None = None
    ) -> dict[str, Any] | None:
        """:meth:`take` as its JSON object (what the pipe carries)."""
        report = self.take(recorded)
        return None if report is None else report.message()
