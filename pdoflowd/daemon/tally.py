"""What one worker counts for the pool's metrics, and the report it sends.

Owns the worker's side of the metrics: :class:`WorkerTally` notes claims,
runs and the outcomes each flush recorded, counting only the outcomes the
database accepted, bins every duration into its histogram's buckets, and
says when a :class:`~pdoflowd.daemon.reports.MetricsReport` of it all is
due (:data:`REPORT_INTERVAL_S`); :func:`outcome_of` says which outcome
label a recorded outcome gets. The supervisor applies the report
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
    "IDLE_REPORT_S",
    "REPORT_INTERVAL_S",
    "JobRun",
    "RecordedLike",
    "WorkerTally",
    "batch_report",
    "merge_reports",
    "metrics_report",
    "outcome_of",
]

# A busy worker reports at most this often. Every report wakes the
# supervisor (some 50 us of its CPU on a 2-core VM, before it decodes the
# line): a report per claim and per flush cost it about 37 us per no-op job
# at batch size 10. Four a second per worker keep that cost flat however
# fast the jobs go, and a scrape (every 15 s or so) sees counters at most
# a quarter of a second behind.
REPORT_INTERVAL_S = 0.25
# An idle worker polls (workers.poll_interval_s) with claims that find
# nothing: their durations alone wait this long to be reported.
IDLE_REPORT_S = 5.0


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

    Call :meth:`note_claim` after each claim commits, :meth:`note_run` for
    each job run, refused or released, and :meth:`note_recorded` with the
    outcomes each flush wrote; send ``take()`` when :meth:`due` says so,
    and when the worker exits. Between reports, :meth:`snapshot` is what a
    dead worker's supervisor should still count (while :attr:`changed`
    says it is not what the last snapshot was).

    A report is due at most every ``interval_s`` while the worker is busy,
    at once when it goes idle (a claim found nothing), and after
    ``max_age_s`` when all it holds is the durations of claims that found
    nothing (an idle worker's polls).
    """

    def __init__(
        self,
        *,
        interval_s: float = REPORT_INTERVAL_S,
        max_age_s: float = IDLE_REPORT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.max_age_s = max_age_s
        self.clock = clock
        # Counted, not reported yet.
        self._claimed = 0
        self._claim_s = _Histogram(CLAIM_BUCKETS)
        self._wait_s = _Histogram(WAIT_BUCKETS)
        self._outcomes: dict[str, dict[str, _Attempts]] = {}
        # When the oldest of it was noted (None: nothing), and whether it
        # holds anything but empty claims.
        self._since: float | None = None
        self._busy = False
        # Noted, waiting for the flush that records their outcomes.
        self._runs: dict[int, _Run] = {}
        self._waits: list[float] = []
        # Whether the last claim found nothing, when the last report was
        # taken, and how many were.
        self._idle = False
        self._reported_at = float("-inf")
        self._taken = 0
        # Counted since the last snapshot or report.
        self.changed = False

    def note_claim(self, seconds: float, claimed: int) -> None:
        """A claim statement took ``seconds`` and returned ``claimed`` jobs."""
        if self._since is None:
            self._since = self.clock()
        self._claimed += claimed
        self._claim_s.observe(seconds)
        self._idle = not claimed
        self.changed = True
        if claimed:
            self._busy = True

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
        if counted:
            self._busy = True
            self.changed = True
            if self._since is None:
                self._since = self.clock()

    def due(self) -> bool:
        """Whether a report should go now (see the class's docstring)."""
        if self._since is None:
            return False
        if self._busy:
            return (
                self._idle
                or self.clock() - self._reported_at >= self.interval_s
            )
        return self.clock() - self._since >= self.max_age_s

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
        report = self.snapshot()
        if report is None:
            return None
        self._taken = report.seq
        self._claimed = 0
        self._claim_s = _Histogram(CLAIM_BUCKETS)
        self._wait_s = _Histogram(WAIT_BUCKETS)
        self._outcomes = {}
        self._since = None
        self._busy = False
        self._reported_at = self.clock()
        return report

    def snapshot(self) -> MetricsReport | None:
        """The report :meth:`take` would return now, left in the tally.

        Its ``seq`` is the one that report will have: once the supervisor
        has counted a report of that number or later, it holds nothing
        the supervisor has not counted.
        """
        self.changed = False
        if self._since is None:
            return None
        return MetricsReport(
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
            self._taken + 1,
        )

    def take_report(
        self, recorded: Iterable[RecordedLike] | None = None
    ) -> dict[str, Any] | None:
        """:meth:`take` as its JSON object (what the pipe carries)."""
        report = self.take(recorded)
        return None if report is None else report.message()
