"""What one worker counts for the pool's metrics, and the report it sends.

Owns the worker's side of the metrics: :class:`WorkerTally` notes claims
and runs, and turns them into a :class:`~pdoflowd.daemon.reports.
MetricsReport` after each claim and after each flush of outcomes, counting
only the outcomes the database accepted; :func:`outcome_of` says which
outcome label a recorded outcome gets. The supervisor applies the report
(:meth:`~pdoflowd.daemon.metrics.PoolMetrics.apply`). It must not write to
the pipe, touch the database or the registry: it lives in the worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, Protocol

from pdoflowd.daemon import reports
from pdoflowd.daemon.reports import OUTCOMES, Attempts, MetricsReport
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

_DURATION_DIGITS = 6  # microseconds: enough, and short on the pipe


class JobRun(NamedTuple):
    """One job whose outcome the database accepted, as a worker reports it.

    ``duration_s`` is None when the function was never called (released or
    refused jobs).
    """

    outcome: str
    function: str
    duration_s: float | None


class RecordedLike(Protocol):
    """What :meth:`WorkerTally.take` needs of a recorded outcome."""

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


def _seconds(value: float) -> float:
    return round(max(0.0, value), _DURATION_DIGITS)


def metrics_report(
    *,
    claimed: int = 0,
    claim_s: Iterable[float] = (),
    wait_s: Iterable[float] = (),
    runs: Iterable[JobRun] = (),
) -> MetricsReport:
    """The report a worker sends after a claim or a flush commits.

    ``claimed``: jobs claimed; ``claim_s``: how long each claim statement
    took (empty claims included); ``wait_s``: for each job started, how long
    it had been runnable; ``runs``: the jobs whose outcome was recorded.
    Durations are rounded to microseconds, short on the pipe.
    """
    counts: dict[str, dict[str, tuple[int, list[float]]]] = {}
    for run in runs:
        if run.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {run.outcome!r}")
        by_function = counts.setdefault(run.outcome, {})
        count, durations = by_function.get(run.function, (0, []))
        if run.duration_s is not None:
            durations.append(_seconds(run.duration_s))
        by_function[run.function] = (count + 1, durations)
    return MetricsReport(
        claimed,
        tuple(_seconds(s) for s in claim_s),
        tuple(_seconds(s) for s in wait_s),
        {
            outcome: {
                function: Attempts(count, tuple(durations))
                for function, (count, durations) in by_function.items()
            }
            for outcome, by_function in counts.items()
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
    first: Mapping[str, Any],
    second: Mapping[str, Any],
    *,
    max_samples: int = 10000,
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
    return both[0].merged(both[1], max_samples=max_samples).message()


class _Run(NamedTuple):
    function: str
    duration_s: float | None
    timed_out: bool


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
        self._claimed = 0
        self._claim_s: list[float] = []
        self._wait_s: list[float] = []
        self._runs: dict[int, _Run] = {}
        self._since = 0.0

    def note_claim(self, seconds: float, claimed: int) -> None:
        """A claim statement took ``seconds`` and returned ``claimed`` jobs."""
        if not self._since:
            self._since = self.clock()
        self._claimed += claimed
        self._claim_s.append(seconds)

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
            self._wait_s.append(waited_s)

    def due(self) -> bool:
        """An unreported claim is older than ``max_age_s`` (for idle times:
        runs are reported by the flush that records them)."""
        return bool(self._since) and (
            self.clock() - self._since >= self.max_age_s
        )

    def take(
        self, recorded: Iterable[RecordedLike] | None = None
    ) -> MetricsReport | None:
        """The report of everything noted, or None when nothing was.

        ``recorded``: the outcomes the flush that just committed wrote. Runs
        noted before that flush but absent from it were fenced off (their
        jobs had been taken back) and are dropped: whoever took them back
        counts them. Without ``recorded`` (a claim, or idle), runs and their
        queue waits are kept for the next flush.
        """
        runs: list[JobRun] = []
        wait_s: list[float] = []
        if recorded is not None:
            for outcome in recorded:
                noted = self._runs.get(outcome.job_id)
                function = noted.function if noted else ""
                label = outcome_of(
                    outcome.kind,
                    outcome.status,
                    timed_out=bool(noted and noted.timed_out),
                )
                duration = noted.duration_s if noted else None
                runs.append(JobRun(label, function, duration))
            self._runs.clear()
            wait_s, self._wait_s = self._wait_s, []
        report = None
        if runs or wait_s or self._claimed or self._claim_s:
            report = metrics_report(
                claimed=self._claimed,
                claim_s=self._claim_s,
                wait_s=wait_s,
                runs=runs,
            )
        self._claimed = 0
        self._claim_s = []
        self._since = 0.0
        return report

    def take_report(
        self, recorded: Iterable[RecordedLike] | None = None
    ) -> dict[str, Any] | None:
        """:meth:`take` as its JSON object (what the pipe carries)."""
        report = self.take(recorded)
        return None if report is None else report.message()
