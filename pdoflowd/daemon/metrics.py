"""pdoflowd's Prometheus registry: what the pool did, counted exactly.

Owns the supervisor's private registry and what feeds it. A worker keeps a
:class:`~pdoflowd.daemon.tally.WorkerTally` and sends a metrics report
(:mod:`~pdoflowd.daemon.reports`) on its report pipe at most every
:data:`~pdoflowd.daemon.tally.REPORT_INTERVAL_S` while busy, at once when
it goes idle and as it exits, its durations already binned into the
histograms' buckets; the supervisor applies it (:meth:`PoolMetrics.apply`:
it adds counts, it observes no sample) and counts itself what only it
sees: jobs taken back from dead workers, restarts, database errors, the
pool, ended postings its database session pruned, and the queue gauges it
reads from PostgreSQL. So counters stay
exact across workers that die or are replaced. The pages that serve the
registry and readiness are :mod:`~pdoflowd.daemon.endpoint`'s. It must
not touch the database, block, or start threads: it runs inside the
supervisor's loop.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import prometheus_client.metrics
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
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from pdoflowd.daemon import reports

# The pages' names are re-exported: the supervisor takes them from here.
from pdoflowd.daemon.endpoint import (
    CONTENT_TYPE,
    MetricsEndpoint,
    Readiness,
    readiness,
)
from pdoflowd.daemon.reports import (
    CLAIM_BUCKETS,
    DURATION_BUCKETS,
    OUTCOMES,
    WAIT_BUCKETS,
    Bins,
    DbError,
    MetricsReport,
    bins_of,
)
from pdoflowd.daemon.scoreboard import WorkerState

__all__ = [
    "CONTENT_TYPE",
    "DB_OPERATIONS",
    "OTHER_FUNCTION",
    "OUTCOMES",
    "PRUNED_KINDS",
    "RESTART_REASONS",
    "WORKER_STATES",
    "MetricsEndpoint",
    "PoolMetrics",
    "Readiness",
    "metric_names",
    "operation_label",
    "readiness",
]

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
    "schedules",
    "pruning",
)
PRUNED_KINDS = ("postings", "jobs")
QUEUE_STATUSES = ("waiting", "executing")

# The histograms' bucket bounds are the report's (reports.py): workers bin
# into them, this registry exports them.

# A bound as its ``le`` value, as prometheus_client writes it (untyped there).
_le_value: Callable[[float], str] = floatToGoString

_OPERATION = re.compile(r"[^a-z0-9]+")


# ------------------------------------------------------------ the registry


def operation_label(operation: str) -> str:
    """A database operation's name as a label value: snake_case, short."""
    return _OPERATION.sub("_", operation.lower()).strip("_")[:40] or "unknown"


def _created_series() -> bool:
    """Whether counters and histograms export ``_created``: as
    prometheus_client decides for its own (PROMETHEUS_DISABLE_CREATED_SERIES
    in the environment, or disable_created_metrics())."""
    return bool(getattr(prometheus_client.metrics, "_use_created", True))


class _Series:
    """One histogram series: bucket counts (not cumulative), their sum, and
    when it started."""

    __slots__ = ("counts", "created", "sum_s")

    def __init__(self, buckets: int) -> None:
        self.counts = [0.0] * buckets
        self.sum_s = 0.0
        self.created = time.time()

    def add(self, bins: Bins) -> None:
        """Count durations a worker binned (into the same bounds)."""
        counts = self.counts
        for index, count in enumerate(bins.counts):
            counts[index] += count
        self.sum_s += bins.sum_s


class _BinnedHistogram(Collector):
    """A histogram fed bucket counts (:class:`reports.Bins`), not samples.

    prometheus_client's Histogram can only observe one sample at a time;
    this one adds what workers binned, one report at a time, and exports
    what that Histogram would: the same name, help, labels, ``le`` values
    and +Inf bucket, ``_count``, ``_sum`` and ``_created`` per series.
    Like it, a series without labels exists from the start, a labelled one
    from its first :meth:`labels`.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        bounds: tuple[float, ...],
        labelnames: tuple[str, ...] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self._le = [_le_value(bound) for bound in bounds] + ["+Inf"]
        self._series: dict[tuple[str, ...], _Series] = {}
        if not labelnames:
            self.labels()
        registry.register(self)

    def labels(self, *values: str) -> _Series:
        """The series of these label values, made (at zero) if new."""
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected {self.labelnames}")
            series = self._series[values] = _Series(len(self._le))
        return series

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(
            self.name, self.documentation, labels=self.labelnames
        )

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        created = _created_series()
        for values, series in self._series.items():
            cumulative = itertools.accumulate(series.counts)
            family.add_metric(
                values,
                list(zip(self._le, cumulative, strict=True)),
                series.sum_s,
            )
            if created:
                family.samples.append(
                    Sample(
                        f"{self.name}_created",
                        dict(zip(self.labelnames, values, strict=True)),
                        series.created,
                    )
                )
        yield family


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
    ``schedules``: the names of the config's schedules.
    """

    def __init__(
        self,
        *,
        version: str,
        function_labels: Iterable[str] = (),
        schedules: Iterable[str] = (),
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
        self.job_duration = _BinnedHistogram(
            "pdoflowd_job_duration_seconds",
            "How long the job's function ran, by outcome.",
            DURATION_BUCKETS,
            ("outcome", "function"),
            registry=registry,
        )
        self.queue_wait = _BinnedHistogram(
            "pdoflowd_job_queue_wait_seconds",
            "How long a job had been runnable when a worker started it.",
            WAIT_BUCKETS,
            registry=registry,
        )
        self.claim_duration = _BinnedHistogram(
            "pdoflowd_claim_duration_seconds",
            "How long one claim statement took, empty claims included.",
            CLAIM_BUCKETS,
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
        self.pruned = Counter(
            "pdoflowd_pruned",
            "Ended postings, and their jobs, this daemon deleted because"
            " they were older than the retention ages allow.",
            ["kind"],
            registry=registry,
        )
        self.limits_differ = Gauge(
            "pdoflowd_resource_limits_differ",
            "Live daemons whose jobs.limits differ from this daemon's (as"
            " of its last heartbeat).",
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
        self.schedule_runs = Counter(
            "pdoflowd_schedule_runs_total",
            "Fire times of a schedule this daemon claimed and posted.",
            ["schedule"],
            registry=registry,
        )
        self.schedule_last_run = Gauge(
            "pdoflowd_schedule_last_run_timestamp_seconds",
            "The newest fire time of a schedule posted by any daemon, as"
            " this daemon last read it.",
            ["schedule"],
            registry=registry,
        )
        self._schedules: frozenset[str] = frozenset()
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
        for name in PRUNED_KINDS:
            self.pruned.labels(name)
        self.set_function_labels(function_labels)
        self.set_schedules(schedules)
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

    def set_schedules(self, names: Iterable[str]) -> None:
        """Adopt the config's schedules (e.g. after a reload): a new one's
        runs count from 0, a removed one's series go."""
        names = frozenset(names)
        for name in self._schedules - names:
            for metric in (self.schedule_runs, self.schedule_last_run):
                with contextlib.suppress(KeyError):
                    metric.remove(name)
        for name in names:
            self.schedule_runs.labels(name)
        self._schedules = names

    def function_label(self, entry_point: str) -> str:
        """The ``function`` label value of an entry point."""
        return entry_point if entry_point in self._functions else OTHER_FUNCTION

    # ---------------------------------------------------------- feeding

    def apply(self, report: MetricsReport | DbError) -> None:
        """Count one report a worker sent: what it claimed and recorded,
        or a failed database operation."""
        if isinstance(report, DbError):
            self.count_db_error(report.operation)
            return
        if report.claimed:
            self.jobs_claimed.inc(report.claimed)
        self.claim_duration.labels().add(report.claim_s)
        self.queue_wait.labels().add(report.wait_s)
        for outcome, by_function in report.outcomes.items():
            for function, group in by_function.items():
                self._count_outcome(
                    outcome, function, group.count, group.durations_s
                )

    def apply_worker_report(self, message: Mapping[str, Any]) -> None:
        """Count one metrics or db_error report given as its JSON object:
        :func:`reports.from_message`, then :meth:`apply`.

        A malformed report raises ValueError and changes nothing.
        """
        report = reports.from_message(message)
        if not isinstance(report, (MetricsReport, DbError)):
            raise ValueError(
                f"not a metrics report: event {report.event.value!r}"
            )
        self.apply(report)

    def _count_outcome(
        self,
        outcome: str,
        function: str,
        count: int,
        durations: Bins,
    ) -> None:
        if not count:
            return
        label = self.function_label(function)
        self.jobs_processed.labels(outcome, label).inc(count)
        self._processed[outcome] += count
        self.job_duration.labels(outcome, label).add(durations)

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
        durations = Bins()
        if duration_s is not None and running:
            durations = bins_of(DURATION_BUCKETS, [duration_s])
        self._count_outcome(outcome, function, running, durations)
        self._count_outcome("released", "", released, Bins())

    def count_pruned(self, *, postings: int, jobs: int) -> None:
        """The database session pruned these ended postings and jobs."""
        if postings:
            self.pruned.labels("postings").inc(postings)
        if jobs:
            self.pruned.labels("jobs").inc(jobs)

    def set_limits_differ(self, daemons: int) -> None:
        """How many live daemons have other jobs.limits than this one."""
        self.limits_differ.set(daemons)

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

    def count_schedule_runs(
        self, runs: Mapping[str, int], last: Mapping[str, float]
    ) -> None:
        """Runs the scheduler posted, by schedule, and the newest fire
        times it read (Unix time); schedules no longer configured (the
        word of a session ended by a reload) are ignored."""
        for name, count in runs.items():
            if name in self._schedules and count > 0:
                self.schedule_runs.labels(name).inc(count)
        for name, stamp in last.items():
            if name in self._schedules:
                self.schedule_last_run.labels(name).set(stamp)

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
