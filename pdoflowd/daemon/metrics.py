"""pdoflowd's Prometheus metrics and its /metrics, /livez and /readyz pages.

Owns the supervisor's private registry and what feeds it. A worker keeps a
:class:`WorkerTally` and sends one line (:func:`batch_report`) on its report
pipe after each claim and after each flush of outcomes; the supervisor
applies it (:meth:`PoolMetrics.apply_worker_report`) and counts itself what
only it sees: jobs taken back from dead workers, restarts, database errors,
the pool, and the queue gauges it reads from PostgreSQL. So counters stay
exact across workers that die or are replaced. It must not touch the
database, block, or start threads: it runs inside the supervisor's loop.
"""

from __future__ import annotations

import http
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pdoflowd.daemon.httpserver import Response
from pdoflowd.daemon.scoreboard import WorkerState
from pdoflowd.status import OutcomeKind

__all__ = [
    "CONTENT_TYPE",
    "DB_OPERATIONS",
    "OTHER_FUNCTION",
    "OUTCOMES",
    "REPORT_EVENTS",
    "RESTART_REASONS",
    "WORKER_STATES",
    "JobRun",
    "MetricsEndpoint",
    "PoolMetrics",
    "Readiness",
    "WorkerTally",
    "batch_report",
    "merge_reports",
    "metric_names",
    "outcome_of",
    "readiness",
]

REPORT_VERSION = 1
METRICS_EVENT = "metrics"
DB_ERROR_EVENT = "db_error"
REPORT_EVENTS = frozenset({METRICS_EVENT, DB_ERROR_EVENT})

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

OTHER_FUNCTION = "other"
WORKER_STATES = tuple(s.name.lower() for s in WorkerState if s.value)
RESTART_REASONS = (
    "exited",
    "crashed",
    "boot_failed",
    "timeout",
    "reload",
    "max_jobs",
    "max_memory",
)
DB_OPERATIONS = (
    "claim",
    "record_outcomes",
    "settle_postings",
    "reconnecting",
    "listening",
    "heartbeat",
    "maintenance",
    "taking_back_jobs",
    "queue_stats",
)
QUEUE_STATUSES = ("waiting", "executing")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. Jobs run from milliseconds to hours; a claim should take
# milliseconds; a job may wait from milliseconds to days.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
    60, 120, 300, 600, 1800, 3600, 7200, 21600,
)  # fmt: skip
WAIT_BUCKETS = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
    600, 1800, 3600, 7200, 21600, 86400,
)  # fmt: skip
CLAIM_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1, 2.5, 5, 10,
)  # fmt: skip

_DURATION_DIGITS = 6  # microseconds: enough, and short on the pipe
_OPERATION = re.compile(r"[^a-z0-9]+")


# ------------------------------------------------------------ worker side


class JobRun(NamedTuple):
    """One job whose outcome the database accepted, as a worker reports it.

    ``duration_s`` is None when the function was never called (released or
    refused jobs).
    """

    outcome: str
    function: str
    duration_s: float | None


class RecordedLike(Protocol):
    """What :meth:`WorkerTally.take_report` needs of a recorded outcome."""

    @property
    def job_id(self) -> int: ...

    @property
    def kind(self) -> str: ...

    @property
    def status(self) -> str: ...


def outcome_of(kind: str, status: str, *, timed_out: bool = False) -> str:
    """The outcome label of an outcome ``kind`` the database recorded.

    ``status`` is the job's status after the write (it tells a failure that
    will be retried from one that used the last try).
    """
    status = str(getattr(status, "value", status))
    try:
        known = OutcomeKind(kind)
    except ValueError:
        raise ValueError(f"unknown outcome kind {kind!r}") from None
    if timed_out or known is OutcomeKind.TIMEOUT:
        return "timeout"
    if known in (OutcomeKind.DONE, OutcomeKind.RELEASED, OutcomeKind.REFUSED):
        return str(known.value)
    return "failed" if status == "waiting" else "errored_out"


def _seconds(value: float) -> float:
    return round(max(0.0, value), _DURATION_DIGITS)


def batch_report(
    *,
    claimed: int = 0,
    claim_s: Iterable[float] = (),
    wait_s: Iterable[float] = (),
    runs: Iterable[JobRun] = (),
) -> dict[str, Any]:
    """The message a worker sends after a claim or a flush commits.

    ``claimed``: jobs claimed; ``claim_s``: how long each claim statement
    took (empty claims included); ``wait_s``: for each job started, how long
    it had been runnable; ``runs``: the jobs whose outcome was recorded.
    Durations are grouped by outcome and function, so a batch of a few
    hundred jobs of one function costs one name and a list of numbers.
    """
    outcomes: dict[str, dict[str, list[Any]]] = {}
    for run in runs:
        if run.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {run.outcome!r}")
        group = outcomes.setdefault(run.outcome, {}).setdefault(
            run.function, [0, []]
        )
        group[0] += 1
        if run.duration_s is not None:
            group[1].append(_seconds(run.duration_s))
    return {
        "event": METRICS_EVENT,
        "v": REPORT_VERSION,
        "claimed": claimed,
        "claim_s": [_seconds(s) for s in claim_s],
        "wait_s": [_seconds(s) for s in wait_s],
        "outcomes": outcomes,
    }


class _Run(NamedTuple):
    function: str
    duration_s: float | None
    timed_out: bool


class WorkerTally:
    """What one worker saw since its last report (lives in the worker).

    Call :meth:`note_claim` after each claim commits and :meth:`note_run`
    for each job run, refused or released; after each claim that returned
    jobs send ``take_report()``, after each flush ``take_report(recorded)``,
    and while idle send ``take_report()`` whenever :meth:`due` says so.
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

    def take_report(
        self, recorded: Iterable[RecordedLike] | None = None
    ) -> dict[str, Any] | None:
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
            report = batch_report(
                claimed=self._claimed,
                claim_s=self._claim_s,
                wait_s=wait_s,
                runs=runs,
            )
        self._claimed = 0
        self._claim_s = []
        self._since = 0.0
        return report


def merge_reports(
    first: Mapping[str, Any],
    second: Mapping[str, Any],
    *,
    max_samples: int = 10000,
) -> dict[str, Any]:
    """One metrics report that counts what both reports count.

    For a report a worker could not send yet (its supervisor was not
    reading): the next one is merged into it rather than queued behind it.
    Counts add up exactly; each list of durations keeps at most
    ``max_samples`` (the earliest), so a report held for long stays
    bounded while every counter stays exact.
    """

    def samples(key: str) -> list[float]:
        return [*first.get(key, ()), *second.get(key, ())][:max_samples]

    outcomes: dict[str, dict[str, list[Any]]] = {}
    for report in (first, second):
        for outcome, by_function in report.get("outcomes", {}).items():
            into = outcomes.setdefault(outcome, {})
            for function, (count, durations) in by_function.items():
                count_so_far, kept = into.get(function, (0, []))
                into[function] = [
                    count_so_far + count,
                    [*kept, *durations][:max_samples],
                ]
    return {
        "event": METRICS_EVENT,
        "v": REPORT_VERSION,
        "claimed": first.get("claimed", 0) + second.get("claimed", 0),
        "claim_s": samples("claim_s"),
        "wait_s": samples("wait_s"),
        "outcomes": outcomes,
    }


# ------------------------------------------------------------ readiness


class Readiness(NamedTuple):
    """Whether the daemon should be sent work, and if not, why not."""

    ready: bool
    reasons: tuple[str, ...]


def readiness(
    *,
    started: bool,
    draining: bool,
    live_workers: int,
    database_reachable: bool,
) -> Readiness:
    """The readiness policy behind /readyz: every reason not to be ready."""
    reasons = []
    if draining:
        reasons.append("draining: the daemon is stopping")
    if not started:
        reasons.append("starting: not all workers have connected yet")
    if not database_reachable:
        reasons.append("database unreachable")
    if live_workers <= 0:
        reasons.append("no live worker")
    return Readiness(not reasons, tuple(reasons))


# ------------------------------------------------------------ supervisor side


class _Observations(NamedTuple):
    claimed: int
    claim_s: list[float]
    wait_s: list[float]
    outcomes: list[tuple[str, str, int, list[float]]]


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


def _numbers(value: object, what: str) -> list[float]:
    if not isinstance(value, list):
        raise ValueError(f"{what}: expected a list, got {value!r}")
    return [_number(v, what) for v in value]


def _parse_metrics_report(report: Mapping[str, Any]) -> _Observations:
    if report.get("v") != REPORT_VERSION:
        raise ValueError(f"unknown report version {report.get('v')!r}")
    outcomes = report.get("outcomes", {})
    if not isinstance(outcomes, dict):
        raise ValueError(f"outcomes: expected an object, got {outcomes!r}")
    groups = []
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
            groups.append((outcome, str(function), count, durations))
    return _Observations(
        _count(report.get("claimed", 0), "claimed"),
        _numbers(report.get("claim_s", []), "claim_s"),
        _numbers(report.get("wait_s", []), "wait_s"),
        groups,
    )


def operation_label(operation: str) -> str:
    """A database operation's name as a label value: snake_case, short."""
    return _OPERATION.sub("_", operation.lower()).strip("_")[:40] or "unknown"


class _WorkerProcesses(Collector):
    """CPU time, memory and start time of each live worker, from /proc."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self.pids: dict[int, int] = {}
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._boot_time: float | None = None

    def _families(
        self,
    ) -> tuple[CounterMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            CounterMetricFamily(
                "pdoflowd_worker_cpu_seconds",
                "CPU time (user and system) of the worker in each slot.",
                labels=["slot"],
            ),
            GaugeMetricFamily(
                "pdoflowd_worker_resident_memory_bytes",
                "Resident memory of the worker in each slot.",
                labels=["slot"],
            ),
            GaugeMetricFamily(
                "pdoflowd_worker_start_time_seconds",
                "When the worker in each slot started, in Unix time.",
                labels=["slot"],
            ),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        cpu, memory, start = self._families()
        boot_time = self._read_boot_time()
        for slot, pid in sorted(self.pids.items()):
            sample = self._read(pid)
            if sample is None:
                continue
            ticks, start_ticks, pages = sample
            cpu.add_metric([str(slot)], ticks / self._ticks)
            memory.add_metric([str(slot)], pages * self._page)
            if boot_time is not None:
                start.add_metric(
                    [str(slot)], boot_time + start_ticks / self._ticks
                )
        yield from (cpu, memory, start)

    def _read(self, pid: int) -> tuple[int, int, int] | None:
        try:
            with open(f"{self.proc}/{pid}/stat", "rb") as stat:
                # The command name may hold spaces and parentheses: the
                # fields that matter come after its last ")".
                fields = stat.read().rpartition(b")")[2].split()
            with open(f"{self.proc}/{pid}/statm", "rb") as statm:
                pages = int(statm.read().split()[1])
            # Fields 14 (utime), 15 (stime), 22 (starttime); 3 is first.
            return int(fields[11]) + int(fields[12]), int(fields[19]), pages
        except (OSError, ValueError, IndexError):
            return None

    def _read_boot_time(self) -> float | None:
        if self._boot_time is None:
            try:
                with open(f"{self.proc}/stat", "rb") as stat:
                    for line in stat:
                        if line.startswith(b"btime "):
                            self._boot_time = float(line.split()[1])
                            break
            except (OSError, ValueError, IndexError):
                return None
        return self._boot_time


class PoolMetrics:
    """The supervisor's metrics of its pool, in a private registry.

    ``function_labels``: the entry points that get their own ``function``
    label value; all others are counted as ``function="other"``.
    """

    def __init__(
        self,
        *,
        version: str,
        function_labels: Iterable[str] = (),
        process_metrics: bool = True,
        proc: str = "/proc",
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._functions: frozenset[str] = frozenset()
        self._processed: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        registry = self.registry
        self.jobs_claimed = Counter(
            "pdoflowd_jobs_claimed_total",
            "Jobs claimed by this daemon's workers.",
            registry=registry,
        )
        self.jobs_processed = Counter(
            "pdoflowd_jobs_processed_total",
            "Job attempts ended, by outcome: done, failed (will be retried),"
            " errored_out, timeout, worker_died, released (never started).",
            ["outcome", "function"],
            registry=registry,
        )
        self.job_duration = Histogram(
            "pdoflowd_job_duration_seconds",
            "How long the job's function ran, by outcome.",
            ["outcome", "function"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "pdoflowd_job_queue_wait_seconds",
            "How long a job had been runnable when a worker started it.",
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.claim_duration = Histogram(
            "pdoflowd_claim_duration_seconds",
            "How long one claim statement took, empty claims included.",
            buckets=CLAIM_BUCKETS,
            registry=registry,
        )
        self.loop_tick = Histogram(
            "pdoflowd_loop_tick_seconds",
            "How long one pass of the supervisor's loop took (its wait for "
            "something to happen not included).",
            buckets=CLAIM_BUCKETS,
            registry=registry,
        )
        self.workers = Gauge(
            "pdoflowd_workers",
            "Live worker processes, by what they are doing.",
            ["state"],
            registry=registry,
        )
        self.worker_restarts = Counter(
            "pdoflowd_worker_restarts_total",
            "Workers replaced, by why the previous one ended.",
            ["reason"],
            registry=registry,
        )
        self.db_errors = Counter(
            "pdoflowd_db_errors_total",
            "Failed database operations (each retry counts), by operation.",
            ["operation"],
            registry=registry,
        )
        self.queue_jobs = Gauge(
            "pdoflowd_queue_jobs",
            "Jobs in the queue's database, by status (read periodically).",
            ["status"],
            registry=registry,
        )
        self.queue_oldest_waiting = Gauge(
            "pdoflowd_queue_oldest_waiting_seconds",
            "Age of the oldest runnable waiting job (0 when none).",
            registry=registry,
        )
        self.queue_refreshed = Gauge(
            "pdoflowd_queue_last_refresh_timestamp_seconds",
            "When the queue gauges were last read from the database.",
            registry=registry,
        )
        self.config_reload_ok = Gauge(
            "pdoflowd_config_last_reload_successful",
            "1 when the last configuration reload was adopted, 0 if refused.",
            registry=registry,
        )
        self.config_reload_time = Gauge(
            "pdoflowd_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully.",
            registry=registry,
        )
        self.build_info = Gauge(
            "pdoflowd_build_info",
            "Always 1; the version of pdoflowd that is running.",
            ["version"],
            registry=registry,
        )
        self.build_info.labels(version).set(1)
        self.config_reload_ok.set(1)
        self.config_reload_time.set_to_current_time()
        for name in WORKER_STATES:
            self.workers.labels(name)
        for name in RESTART_REASONS:
            self.worker_restarts.labels(name)
        for name in DB_OPERATIONS:
            self.db_errors.labels(name)
        for name in QUEUE_STATUSES:
            self.queue_jobs.labels(name)
        self.set_function_labels(function_labels)
        self.worker_processes = _WorkerProcesses(proc)
        registry.register(self.worker_processes)
        if process_metrics:
            ProcessCollector(proc=proc, registry=registry)

    # ---------------------------------------------------------- labels

    def set_function_labels(self, names: Iterable[str]) -> None:
        """Adopt a new allow-list of entry points (e.g. after a reload)."""
        self._functions = frozenset(names)
        for function in (*self._functions, OTHER_FUNCTION):
            for outcome in OUTCOMES:
                self.jobs_processed.labels(outcome, function)
                self.job_duration.labels(outcome, function)

    def function_label(self, entry_point: str) -> str:
        """The ``function`` label value of an entry point."""
        return entry_point if entry_point in self._functions else OTHER_FUNCTION

    # ---------------------------------------------------------- feeding

    def apply_worker_report(self, report: Mapping[str, Any]) -> None:
        """Count one line a worker sent (an event in REPORT_EVENTS).

        A malformed report raises ValueError and changes nothing.
        """
        event = report.get("event")
        if event == DB_ERROR_EVENT:
            self.count_db_error(str(report.get("operation", "")))
            return
        if event != METRICS_EVENT:
            raise ValueError(f"not a metrics report: event {event!r}")
        seen = _parse_metrics_report(report)
        if seen.claimed:
            self.jobs_claimed.inc(seen.claimed)
        for seconds in seen.claim_s:
            self.claim_duration.observe(seconds)
        for seconds in seen.wait_s:
            self.queue_wait.observe(seconds)
        for outcome, function, count, durations in seen.outcomes:
            self._count_outcome(outcome, function, count, durations)

    def _count_outcome(
        self, outcome: str, function: str, count: int, durations: list[float]
    ) -> None:
        if not count:
            return
        label = self.function_label(function)
        self.jobs_processed.labels(outcome, label).inc(count)
        self._processed[outcome] += count
        histogram = self.job_duration.labels(outcome, label)
        for seconds in durations:
            histogram.observe(seconds)

    def count_taken_back(
        self,
        *,
        running: int,
        released: int,
        outcome: str = "worker_died",
        function: str = "",
        duration_s: float | None = None,
    ) -> None:
        """Jobs the supervisor took back from a worker or host that ended.

        ``running`` jobs were under way (outcome ``worker_died`` or
        ``timeout``); ``released`` jobs had been claimed and not started.
        ``function`` and ``duration_s`` describe the running job, if known.
        """
        if outcome not in ("worker_died", "timeout"):
            raise ValueError(f"not an outcome of a taken-back job: {outcome}")
        durations = [] if duration_s is None else [max(0.0, duration_s)]
        self._count_outcome(outcome, function, running, durations[:running])
        self._count_outcome("released", "", released, [])

    def count_worker_restart(self, reason: str) -> None:
        """A worker was replaced; ``reason`` is one of RESTART_REASONS."""
        self.worker_restarts.labels(reason).inc()

    def observe_loop_tick(self, seconds: float) -> None:
        """One pass of the supervisor's loop took ``seconds``."""
        self.loop_tick.observe(seconds)

    def count_db_error(self, operation: str) -> None:
        """A database operation failed (the worker's or the supervisor's)."""
        self.db_errors.labels(operation_label(operation)).inc()

    def set_workers(self, workers: Iterable[tuple[int, int, str]]) -> None:
        """The live workers as (slot, pid, state), state as in WORKER_STATES."""
        counts = dict.fromkeys(WORKER_STATES, 0)
        pids = {}
        for slot, pid, state in workers:
            counts[state] = counts.get(state, 0) + 1
            pids[slot] = pid
        for state, count in counts.items():
            self.workers.labels(state).set(count)
        self.worker_processes.pids = pids

    def set_queue(
        self, counts: Mapping[str, int], oldest_waiting_s: float | None
    ) -> None:
        """The queue as just read from the database: jobs per status, and
        the age of the oldest runnable waiting job (None: there is none)."""
        for status in (*QUEUE_STATUSES, *counts):
            self.queue_jobs.labels(status).set(counts.get(status, 0))
        self.queue_oldest_waiting.set(max(0.0, oldest_waiting_s or 0.0))
        self.queue_refreshed.set_to_current_time()

    def config_reloaded(self, ok: bool) -> None:
        """A reload was adopted (True) or refused (False)."""
        self.config_reload_ok.set(1 if ok else 0)
        if ok:
            self.config_reload_time.set_to_current_time()

    # ---------------------------------------------------------- reading

    def processed(self, *outcomes: str) -> int:
        """Job attempts counted so far with these outcomes (all if none)."""
        return sum(self._processed[o] for o in outcomes or OUTCOMES)

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

    def metric_names(self) -> frozenset[str]:
        """Every sample name this registry can export."""
        return metric_names(self.registry)


_SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


def metric_names(registry: CollectorRegistry) -> frozenset[str]:
    """The sample names a registry exports.

    A family without samples yet (no worker alive, say) contributes the
    names its type implies.
    """
    names: set[str] = set()
    for family in registry.collect():
        if family.samples:
            names.update(sample.name for sample in family.samples)
        else:
            suffixes = _SAMPLE_SUFFIXES.get(family.type, ("",))
            names.update(family.name + suffix for suffix in suffixes)
    return frozenset(names)


# ------------------------------------------------------------ the pages


class MetricsEndpoint:
    """The HTTP handler: /metrics, /livez and /readyz.

    ``readiness`` is asked at every /readyz; ``before_scrape`` (e.g. to
    refresh the worker gauges from the scoreboard) runs before every
    /metrics.
    """

    def __init__(
        self,
        metrics: PoolMetrics,
        readiness: Callable[[], Readiness],
        before_scrape: Callable[[], None] | None = None,
    ) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.before_scrape = before_scrape

    def __call__(self, method: str, path: str) -> Response:
        if path == "/metrics":
            if self.before_scrape is not None:
                self.before_scrape()
            return Response(200, self.metrics.render(), CONTENT_TYPE)
        if path == "/livez":
            return Response(200, b"ok: the supervisor loop is running\n")
        if path == "/readyz":
            ready, reasons = self.readiness()
            if ready:
                return Response(200, b"ready\n")
            body = "".join(f"not ready: {r}\n" for r in reasons)
            return Response(http.HTTPStatus.SERVICE_UNAVAILABLE, body.encode())
        return Response(
            http.HTTPStatus.NOT_FOUND,
            b"not found; try /metrics, /livez or /readyz\n",
        )
