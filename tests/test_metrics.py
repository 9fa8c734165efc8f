"""The metrics: what workers report, what the supervisor counts, how it is
served (/metrics, /livez, /readyz over HTTP and TLS from a selectors loop)
and the queue gauges' SQL against a real PostgreSQL.

Prometheus' format is checked by the real ``promtool``, never by a mock.
:func:`parse_scrape` and :func:`scrape_value` are for other tests too (the
end-to-end count against the daemon).
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import math
import os
import selectors
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import prometheus_client.metrics
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from pdoflowd.daemon.httpserver import (
    EndpointError,
    HttpServer,
    Limits,
    Response,
    tls_context,
)
from pdoflowd.daemon.metrics import (
    OUTCOMES,
    MetricsEndpoint,
    PoolMetrics,
    Readiness,
    readiness,
)
from pdoflowd.daemon.reports import (
    CLAIM_BUCKETS,
    DURATION_BUCKETS,
    WAIT_BUCKETS,
)
from pdoflowd.daemon.tally import (
    JobRun,
    WorkerTally,
    batch_report,
    outcome_of,
)
from pdoflowd.db import upkeep
from pdoflowd.status import OutcomeKind
from scrape import (
    Scrape,
    parse_scrape,
    promtool_check_metrics,
    scrape_sum,
    scrape_value,
)


@dataclass
class Recorded:
    """A recorded outcome as the worker gets it back from the database."""

    job_id: int
    kind: str
    status: str


def report_line(report: dict[str, Any] | None) -> dict[str, Any]:
    """What the supervisor reads: the report through its JSON line."""
    assert report is not None
    line = json.dumps(report) + "\n"
    return dict(json.loads(line))


# ------------------------------------------------------------ outcome labels


@pytest.mark.parametrize(
    ("kind", "status", "timed_out", "expected"),
    [
        ("done", "done", False, "done"),
        ("failed", "waiting", False, "failed"),
        ("failed", "errored_out", False, "errored_out"),
        ("refused", "errored_out", False, "refused"),
        ("released", "waiting", False, "released"),
        ("failed", "waiting", True, "timeout"),
        ("failed", "errored_out", True, "timeout"),
    ],
)
def test_outcome_label_follows_kind_and_resulting_status(
    kind: str, status: str, timed_out: bool, expected: str
) -> None:
    assert outcome_of(kind, status, timed_out=timed_out) == expected


def test_outcome_label_of_an_unknown_kind_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown outcome kind"):
        outcome_of("vanished", "done")


def test_every_outcome_kind_has_an_outcome_label() -> None:
    for kind in OutcomeKind:
        for status in ("waiting", "errored_out", "done"):
            assert outcome_of(kind, status) in OUTCOMES
            assert type(outcome_of(kind, status)) is str


# ------------------------------------------------------------ worker reports


def test_worker_tally_reports_claims_at_once_and_runs_after_the_flush() -> None:
    tally = WorkerTally()
    tally.note_claim(0.002, 2)
    claim = report_line(tally.take_report())
    assert claim["claimed"] == 2
    assert claim["claim_s"] == [0.002, [0, 0, 1]], "<= 0.0025"
    assert claim["outcomes"] == {}
    tally.note_run(1, "pkg.mod.f", 0.25, waited_s=1.5)
    tally.note_run(2, "pkg.mod.f", 0.75, waited_s=1.75)
    assert tally.take_report() is None, "runs wait for their flush"
    flush = report_line(
        tally.take_report(
            [Recorded(1, "done", "done"), Recorded(2, "done", "done")]
        )
    )
    assert flush["claimed"] == 0
    assert flush["wait_s"] == [3.25, [0, 0, 0, 0, 0, 0, 2]], "<= 2.5"
    assert flush["outcomes"] == {
        "done": {"pkg.mod.f": [2, [1.0, [0, 0, 0, 0, 0, 1, 0, 1]]]}
    }, "one <= 0.25, one <= 1"
    assert tally.take_report() is None


def test_worker_tally_drops_runs_whose_outcome_was_fenced_off() -> None:
    tally = WorkerTally()
    tally.note_run(1, "pkg.f", 0.5)
    tally.note_run(2, "pkg.f", 0.5)
    report = report_line(tally.take_report([Recorded(1, "done", "done")]))
    assert report["outcomes"] == {
        "done": {"pkg.f": [1, [0.5, [0, 0, 0, 0, 0, 0, 1]]]}
    }
    assert tally.take_report([]) is None, "the fenced run is gone"


def test_fenced_runs_are_dropped_at_their_flush_not_at_the_report() -> None:
    tally = WorkerTally()
    tally.note_run(1, "pkg.f", 0.5, waited_s=1.0)
    tally.note_run(2, "pkg.f", 0.5, waited_s=1.0)
    tally.note_recorded([Recorded(1, "done", "done")])
    tally.note_run(3, "pkg.f", 0.5, waited_s=1.0)
    tally.note_recorded(
        [Recorded(2, "done", "done"), Recorded(3, "done", "done")]
    )
    report = report_line(tally.take_report())
    # The first flush fenced job 2 off and dropped its run: a later flush
    # that names job 2 finds no run of it (and counts it unnamed).
    assert report["outcomes"] == {
        "done": {
            "pkg.f": [2, [1.0, [0, 0, 0, 0, 0, 0, 2]]],
            "": [1, [0, []]],
        }
    }
    assert report["wait_s"] == [3.0, [0, 0, 0, 0, 0, 3]]


def test_worker_tally_counts_released_jobs_without_a_duration() -> None:
    tally = WorkerTally()
    tally.note_run(7, "pkg.f")
    report = report_line(
        tally.take_report([Recorded(7, "released", "waiting")])
    )
    assert report["outcomes"] == {"released": {"pkg.f": [1, [0, []]]}}


def test_worker_tally_is_due_when_idle_claims_grow_old() -> None:
    now = [100.0]
    tally = WorkerTally(max_age_s=5.0, clock=lambda: now[0])
    assert not tally.due()
    tally.note_claim(0.001, 0)
    now[0] += 4.9
    assert not tally.due()
    now[0] += 0.2
    assert tally.due()
    assert report_line(tally.take_report())["claim_s"] == [0.001, [0, 1]]
    assert not tally.due()


def test_a_busy_tally_is_due_once_an_interval_and_at_once_when_idle() -> None:
    now = [100.0]
    tally = WorkerTally(interval_s=0.25, clock=lambda: now[0])
    tally.note_claim(0.001, 10)
    assert tally.due(), "the first report after a quiet time goes at once"
    assert tally.take() is not None
    for job in range(20):
        now[0] += 0.01
        tally.note_claim(0.001, 1)
        assert not tally.due()
        tally.note_run(job, "pkg.f", 0.001)
        tally.note_recorded([Recorded(job, "done", "done")])
        assert not tally.due()
    now[0] += 0.05
    assert tally.due(), "0.25 s after the last report"
    report = tally.take()
    assert report is not None
    assert (report.claimed, report.outcomes["done"]["pkg.f"].count) == (20, 20)
    now[0] += 0.01
    tally.note_claim(0.001, 1)
    tally.note_run(99, "pkg.f", 0.001)
    tally.note_recorded([Recorded(99, "done", "done")])
    assert not tally.due()
    tally.note_claim(0.001, 0)
    assert tally.due(), "a claim that found nothing: the worker goes idle"
    tally.take()
    tally.note_claim(0.001, 0)
    assert not tally.due(), "an idle poll's claim alone waits max_age_s"


def test_a_snapshot_is_the_report_to_come_left_in_the_tally() -> None:
    tally = WorkerTally()
    assert tally.snapshot() is None and not tally.changed
    tally.note_claim(0.001, 2)
    assert tally.changed
    snapshot = tally.snapshot()
    assert not tally.changed
    assert snapshot is not None and (snapshot.seq, snapshot.claimed) == (1, 2)
    tally.note_run(1, "pkg.f", 0.5)
    assert not tally.changed, "a run counts once its outcome is recorded"
    tally.note_recorded([Recorded(1, "done", "done")])
    assert tally.changed
    report = tally.take()
    assert report is not None and report.seq == 1
    assert report.claimed == 2 and report.outcomes["done"]["pkg.f"].count == 1
    assert not tally.changed and tally.snapshot() is None
    tally.note_claim(0.001, 0)
    later = tally.snapshot()
    assert later is not None and later.seq == 2


def test_a_report_line_does_not_grow_with_its_jobs() -> None:
    def line(jobs: int) -> str:
        runs = [
            JobRun("done", "pkg.mod.f", 0.123456789 + i % 300)
            for i in range(jobs)
        ]
        return json.dumps(
            batch_report(claimed=jobs, wait_s=[1.25] * jobs, runs=runs)
        )

    assert line(300).count("pkg.mod.f") == 1
    assert len(line(30000)) <= len(line(300)) + 40 < 400


def test_batch_report_refuses_an_unknown_outcome() -> None:
    with pytest.raises(ValueError, match="unknown outcome"):
        batch_report(runs=[JobRun("vanished", "f", None)])


# ------------------------------------------------------------ aggregation


def feed_a_day(pool: PoolMetrics) -> None:
    """Two workers' reports and the supervisor's own events."""
    first = WorkerTally()
    second = WorkerTally()
    first.note_claim(0.004, 3)
    pool.apply_worker_report(report_line(first.take_report()))
    second.note_claim(0.001, 0)
    second.note_claim(0.002, 2)
    pool.apply_worker_report(report_line(second.take_report()))
    first.note_run(1, "pkg.mod.f", 0.5, waited_s=2.0)
    first.note_run(2, "pkg.mod.g", 3.0, waited_s=2.5)
    first.note_run(3, "pkg.mod.f", 40.0, waited_s=3.0, timed_out=True)
    pool.apply_worker_report(
        report_line(
            first.take_report(
                [
                    Recorded(1, "done", "done"),
                    Recorded(2, "failed", "waiting"),
                    Recorded(3, "failed", "errored_out"),
                ]
            )
        )
    )
    second.note_run(4, "pkg.mod.g", 0.25, waited_s=0.5)
    second.note_run(5, "pkg.mod.g")
    pool.apply_worker_report(
        report_line(
            second.take_report(
                [
                    Recorded(4, "failed", "errored_out"),
                    Recorded(5, "released", "waiting"),
                ]
            )
        )
    )
    # The second worker died running a job it had claimed with two others.
    pool.count_taken_back(running=1, released=2, duration_s=7.0)
    pool.count_worker_restart("crashed")
    pool.apply_worker_report({"event": "db_error", "operation": "claim"})
    pool.count_db_error("record outcomes")
    pool.count_db_error("record outcomes")
    pool.set_workers([(0, os.getpid(), "running"), (1, os.getpid(), "booting")])
    pool.set_queue({"waiting": 12, "executing": 3}, 42.5)
    pool.config_reloaded(False)


def test_counts_are_exact_after_worker_reports_and_supervisor_events() -> None:
    pool = PoolMetrics(version="9.8.7", function_labels=["pkg.mod.f"])
    feed_a_day(pool)
    scrape = parse_scrape(pool.render().decode())
    value = values_of(scrape)
    assert value("pdoflowd_jobs_claimed_total") == 5
    processed = "pdoflowd_jobs_processed_total"
    assert value(processed, outcome="done", function="pkg.mod.f") == 1
    assert value(processed, outcome="failed", function="other") == 1
    assert value(processed, outcome="timeout", function="pkg.mod.f") == 1
    assert value(processed, outcome="errored_out", function="other") == 1
    assert value(processed, outcome="released", function="other") == 3
    assert value(processed, outcome="worker_died", function="other") == 1
    assert scrape_sum(scrape, processed) == 8
    assert pool.processed() == 8
    assert pool.processed("done") == 1
    duration = "pdoflowd_job_duration_seconds"
    assert (
        value(f"{duration}_count", outcome="timeout", function="pkg.mod.f") == 1
    )
    assert (
        value(f"{duration}_sum", outcome="timeout", function="pkg.mod.f") == 40
    )
    assert value(f"{duration}_count", outcome="released", function="other") == 0
    assert (
        value(
            f"{duration}_bucket", outcome="done", function="pkg.mod.f", le="0.5"
        )
        == 1
    )
    assert (
        value(
            f"{duration}_bucket",
            outcome="done",
            function="pkg.mod.f",
            le="0.25",
        )
        == 0
    )
    assert (
        value(f"{duration}_sum", outcome="worker_died", function="other") == 7
    )
    wait = "pdoflowd_job_queue_wait_seconds"
    assert value(f"{wait}_count") == 4
    assert value(f"{wait}_sum") == 8
    assert value(f"{wait}_bucket", le="2.5") == 3
    assert value("pdoflowd_claim_duration_seconds_count") == 3
    assert math.isclose(value("pdoflowd_claim_duration_seconds_sum"), 0.007)
    restarts = "pdoflowd_worker_restarts_total"
    assert value(restarts, reason="crashed") == 1
    assert value(restarts, reason="reload") == 0
    errors = "pdoflowd_db_errors_total"
    assert value(errors, operation="claim") == 1
    assert value(errors, operation="record_outcomes") == 2
    assert value(errors, operation="heartbeat") == 0
    assert value("pdoflowd_workers", state="running") == 1
    assert value("pdoflowd_workers", state="booting") == 1
    assert value("pdoflowd_workers", state="idle") == 0
    assert value("pdoflowd_queue_jobs", status="waiting") == 12
    assert value("pdoflowd_queue_jobs", status="executing") == 3
    assert value("pdoflowd_queue_oldest_waiting_seconds") == 42.5
    assert value("pdoflowd_config_last_reload_successful") == 0
    assert value("pdoflowd_build_info", version="9.8.7") == 1
    assert value("process_cpu_seconds_total") > 0
    assert value("pdoflowd_worker_resident_memory_bytes", slot="0") > 0


def values_of(scrape: Scrape) -> Callable[..., float]:
    def value(name: str, **labels: str) -> float:
        return scrape_value(scrape, name, **labels)

    return value


def test_the_scrape_passes_promtool_check_metrics(promtool: str) -> None:
    pool = PoolMetrics(version="0.1.0", function_labels=["pkg.mod.f"])
    feed_a_day(pool)
    promtool_check_metrics(promtool, pool.render())


def test_a_fresh_registry_passes_promtool_check_metrics(promtool: str) -> None:
    promtool_check_metrics(promtool, PoolMetrics(version="0.1.0").render())


def test_every_outcome_starts_at_zero_so_rates_see_the_first_one() -> None:
    scrape = parse_scrape(PoolMetrics(version="0").render().decode())
    for outcome in OUTCOMES:
        assert (
            scrape_value(
                scrape,
                "pdoflowd_jobs_processed_total",
                outcome=outcome,
                function="other",
            )
            == 0
        )


def test_functions_outside_the_allow_list_share_one_label() -> None:
    pool = PoolMetrics(version="0", function_labels=["pkg.keep"])
    runs = [JobRun("done", f"pkg.f{i}", 0.1) for i in range(500)]
    runs.append(JobRun("done", "pkg.keep", 0.1))
    pool.apply_worker_report(report_line(batch_report(runs=runs)))
    scrape = parse_scrape(pool.render().decode())
    functions = {
        dict(labels)["function"]
        for name, labels in scrape
        if name == "pdoflowd_jobs_processed_total"
    }
    assert functions == {"pkg.keep", "other"}
    assert (
        scrape_value(
            scrape,
            "pdoflowd_jobs_processed_total",
            outcome="done",
            function="other",
        )
        == 500
    )


# ------------------------------------------------ pre-binned histograms

_HISTOGRAMS = (
    "pdoflowd_job_duration_seconds",
    "pdoflowd_job_queue_wait_seconds",
    "pdoflowd_claim_duration_seconds",
)


def observed_registry(
    functions: list[str],
    claim_s: list[float],
    wait_s: list[float],
    runs: list[JobRun],
) -> CollectorRegistry:
    """The three histograms as prometheus_client's Histogram makes them,
    observing every sample: what PoolMetrics exported before workers
    binned their durations themselves."""
    registry = CollectorRegistry(auto_describe=True)
    duration = Histogram(
        "pdoflowd_job_duration_seconds",
        "How long the job's function ran, by outcome.",
        ["outcome", "function"],
        buckets=DURATION_BUCKETS,
        registry=registry,
    )
    wait = Histogram(
        "pdoflowd_job_queue_wait_seconds",
        "How long a job had been runnable when a worker started it.",
        buckets=WAIT_BUCKETS,
        registry=registry,
    )
    claim = Histogram(
        "pdoflowd_claim_duration_seconds",
        "How long one claim statement took, empty claims included.",
        buckets=CLAIM_BUCKETS,
        registry=registry,
    )
    for function in (*functions, "other"):
        for outcome in OUTCOMES:
            duration.labels(outcome, function)
    for seconds in claim_s:
        claim.observe(seconds)
    for seconds in wait_s:
        wait.observe(seconds)
    for run in runs:
        if run.duration_s is not None:
            label = run.function if run.function in functions else "other"
            duration.labels(run.outcome, label).observe(run.duration_s)
    return registry


def histogram_lines(text: bytes) -> set[str]:
    """The exposition's lines of the three histograms, ``_created``'s value
    left out (when the series started, which differs by microseconds)."""
    lines = set()
    for line in text.decode().splitlines():
        name = line.removeprefix("# HELP ").removeprefix("# TYPE ")
        if not name.startswith(_HISTOGRAMS):
            continue
        if not line.startswith("#") and "_created" in line:
            line = line.rsplit(" ", 1)[0]
        lines.add(line)
    return lines


def samples_of(registry_text: bytes) -> dict[tuple[str, Any], float]:
    return {
        key: value
        for key, value in parse_scrape(registry_text.decode()).items()
        if key[0].startswith(_HISTOGRAMS) and not key[0].endswith("_created")
    }


_seconds = st.one_of(
    st.floats(min_value=0, max_value=200_000, allow_nan=False),
    st.sampled_from(DURATION_BUCKETS + WAIT_BUCKETS + CLAIM_BUCKETS),
)
_runs = st.lists(
    st.builds(
        JobRun,
        st.sampled_from(OUTCOMES),
        st.sampled_from(["pkg.f", "pkg.g", ""]),
        st.one_of(st.none(), _seconds),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(
    claim_s=st.lists(_seconds, max_size=30),
    wait_s=st.lists(_seconds, max_size=30),
    runs=_runs,
    reports=st.integers(min_value=1, max_value=4),
)
def test_pre_binned_histograms_equal_observed_ones(
    claim_s: list[float], wait_s: list[float], runs: list[JobRun], reports: int
) -> None:
    """Bucket counts, count and sum, whether the samples come in one report
    or several (whose sums add up in another order, so are merely close)."""
    pool = PoolMetrics(
        version="0", function_labels=["pkg.f"], process_metrics=False
    )
    for part in range(reports):
        pool.apply_worker_report(
            report_line(
                batch_report(
                    claimed=1,
                    claim_s=claim_s[part::reports],
                    wait_s=wait_s[part::reports],
                    runs=runs[part::reports],
                )
            )
        )
    binned = samples_of(pool.render())
    observed = samples_of(
        generate_latest(observed_registry(["pkg.f"], claim_s, wait_s, runs))
    )
    assert binned.keys() == observed.keys()
    for key, value in observed.items():
        if key[0].endswith("_sum") and reports > 1:
            assert math.isclose(binned[key], value, rel_tol=1e-12), key
        else:
            assert binned[key] == value, key


def test_pre_binned_histograms_are_exported_as_histograms_were() -> None:
    """Names, help, types, labels pre-exported at zero, le values, the
    order of samples and ``_created``: the same text, line for line."""
    claim_s = [0.0004, 0.001, 0.003, 12.0]
    wait_s = [0.01, 3.0, 90000.0]
    runs = [
        JobRun("done", "pkg.f", 0.005),
        JobRun("failed", "pkg.g", 30000.0),
        JobRun("released", "pkg.f", None),
    ]
    pool = PoolMetrics(
        version="0", function_labels=["pkg.f"], process_metrics=False
    )
    observed = generate_latest(
        observed_registry(["pkg.f"], claim_s, wait_s, runs)
    )
    assert histogram_lines(pool.render()) != histogram_lines(observed)
    pool.apply_worker_report(
        report_line(batch_report(claim_s=claim_s, wait_s=wait_s, runs=runs))
    )
    assert histogram_lines(pool.render()) == histogram_lines(observed)

    # Series in the same order within each family.
    def order(text: bytes) -> list[str]:
        return [
            line.split(" ")[0]
            for line in text.decode().splitlines()
            if line.startswith("pdoflowd_claim")
            or line.startswith("pdoflowd_job_queue_wait")
            or line.startswith(
                'pdoflowd_job_duration_seconds_bucket{function="pkg.f",outcome="done"'
            )
        ]

    assert order(pool.render()) == order(observed)
    created = [
        value
        for (name, _), value in parse_scrape(pool.render().decode()).items()
        if name.startswith(_HISTOGRAMS) and name.endswith("_created")
    ]
    assert len(created) == 2 + 2 * len(OUTCOMES)
    assert all(abs(value - time.time()) < 60 for value in created)


def test_created_series_follow_prometheus_clients_switch() -> None:
    prometheus_client.metrics.disable_created_metrics()
    try:
        pool = PoolMetrics(version="0", process_metrics=False)
        observed = generate_latest(observed_registry([], [], [], []))
        assert b"_created" not in pool.render()
        assert histogram_lines(pool.render()) == histogram_lines(observed)
    finally:
        prometheus_client.metrics.enable_created_metrics()
    assert b"pdoflowd_claim_duration_seconds_created" in pool.render()


def test_a_taken_back_job_is_observed_once_in_its_bucket() -> None:
    pool = PoolMetrics(version="0", process_metrics=False)
    pool.count_taken_back(running=1, released=3, duration_s=7.0)
    pool.count_taken_back(running=0, released=1, duration_s=2.0)
    scrape = parse_scrape(pool.render().decode())
    duration = "pdoflowd_job_duration_seconds"
    labels = {"outcome": "worker_died", "function": "other"}
    assert scrape_value(scrape, f"{duration}_count", **labels) == 1
    assert scrape_value(scrape, f"{duration}_sum", **labels) == 7
    assert scrape_value(scrape, f"{duration}_bucket", le="5.0", **labels) == 0
    assert scrape_value(scrape, f"{duration}_bucket", le="10.0", **labels) == 1
    released = {"outcome": "released", "function": "other"}
    assert scrape_value(scrape, f"{duration}_count", **released) == 0


def test_a_reload_can_change_the_allow_list() -> None:
    pool = PoolMetrics(version="0")
    assert pool.function_label("pkg.f") == "other"
    pool.set_function_labels(["pkg.f"])
    assert pool.function_label("pkg.f") == "pkg.f"


@pytest.mark.parametrize(
    "report",
    [
        {"event": "metrics", "v": 1},
        {"event": "metrics", "v": 2, "claimed": -1},
        {"event": "metrics", "v": 2, "claimed": True},
        {"event": "metrics", "v": 2, "claim_s": [0.1, [1, "slow"]]},
        {"event": "metrics", "v": 2, "claim_s": [0.1, [1.5]]},
        {"event": "metrics", "v": 2, "wait_s": [float("nan"), [1]]},
        {"event": "metrics", "v": 2, "wait_s": [1, [0] * 20 + [1]]},
        {"event": "metrics", "v": 2, "outcomes": {"vanished": {}}},
        {"event": "metrics", "v": 2, "outcomes": {"done": {"f": [1]}}},
        {"event": "metrics", "v": 2, "outcomes": {"done": {"f": [1, [1, 2]]}}},
        {
            "event": "metrics",
            "v": 2,
            "outcomes": {"done": {"f": [1, [1.5, [1, 1]]]}},
        },
        {
            "event": "metrics",
            "v": 2,
            "outcomes": {"done": {"f": [1, [-1, [1]]]}},
        },
        {"event": "ready"},
    ],
)
def test_a_malformed_report_is_refused_and_changes_nothing(
    report: dict[str, Any],
) -> None:
    pool = PoolMetrics(version="0", process_metrics=False)
    before = pool.render()
    # A valid part before the broken one must not be counted either.
    report = {"claimed": 5, **report}
    with pytest.raises(ValueError):
        pool.apply_worker_report(report)
    assert pool.render() == before


def test_taken_back_jobs_count_as_timeout_when_the_supervisor_killed_it() -> (
    None
):
    pool = PoolMetrics(version="0", function_labels=["pkg.f"])
    pool.count_taken_back(
        running=1, released=0, outcome="timeout", function="pkg.f"
    )
    scrape = parse_scrape(pool.render().decode())
    assert (
        scrape_value(
            scrape,
            "pdoflowd_jobs_processed_total",
            outcome="timeout",
            function="pkg.f",
        )
        == 1
    )
    with pytest.raises(ValueError):
        pool.count_taken_back(running=1, released=0, outcome="done")


def test_queue_gauges_reset_statuses_not_reported_and_no_oldest_is_zero() -> (
    None
):
    pool = PoolMetrics(version="0")
    pool.set_queue({"waiting": 5, "executing": 2}, 10.0)
    pool.set_queue({"executing": 1}, None)
    scrape = parse_scrape(pool.render().decode())
    assert scrape_value(scrape, "pdoflowd_queue_jobs", status="waiting") == 0
    assert scrape_value(scrape, "pdoflowd_queue_jobs", status="executing") == 1
    assert scrape_value(scrape, "pdoflowd_queue_oldest_waiting_seconds") == 0
    refreshed = scrape_value(
        scrape, "pdoflowd_queue_last_refresh_timestamp_seconds"
    )
    assert abs(refreshed - time.time()) < 60


def test_worker_process_metrics_come_from_proc_per_slot() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; sum(range(10**7)); time.sleep(60)"]
    )
    try:
        time.sleep(0.5)
        pool = PoolMetrics(version="0")
        pool.set_workers([(3, child.pid, "running")])
        scrape = parse_scrape(pool.render().decode())
        assert (
            scrape_value(
                scrape, "pdoflowd_worker_resident_memory_bytes", slot="3"
            )
            > 1_000_000
        )
        assert (
            scrape_value(scrape, "pdoflowd_worker_cpu_seconds_total", slot="3")
            > 0
        )
        started = scrape_value(
            scrape, "pdoflowd_worker_start_time_seconds", slot="3"
        )
        assert abs(started - time.time()) < 30
    finally:
        child.kill()
        child.wait()
    scrape = parse_scrape(pool.render().decode())
    assert not any(
        name == "pdoflowd_worker_cpu_seconds_total" for name, _ in scrape
    ), "a dead worker's pid is skipped"
    pool.set_workers([])
    assert (
        scrape_value(
            parse_scrape(pool.render().decode()),
            "pdoflowd_workers",
            state="running",
        )
        == 0
    )


def test_metric_names_cover_what_the_issue_names() -> None:
    names = PoolMetrics(version="0").metric_names()
    for name in (
        "pdoflowd_jobs_claimed_total",
        "pdoflowd_jobs_processed_total",
        "pdoflowd_job_duration_seconds_bucket",
        "pdoflowd_job_queue_wait_seconds_bucket",
        "pdoflowd_claim_duration_seconds_bucket",
        "pdoflowd_workers",
        "pdoflowd_worker_restarts_total",
        "pdoflowd_db_errors_total",
        "pdoflowd_queue_jobs",
        "pdoflowd_queue_oldest_waiting_seconds",
        "pdoflowd_config_last_reload_successful",
        "pdoflowd_build_info",
        "pdoflowd_worker_cpu_seconds_total",
        "pdoflowd_worker_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert name in names


def test_every_exported_metric_is_documented() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    names = PoolMetrics(version="0").metric_names()
    histograms = {
        n.removesuffix("_bucket") for n in names if n.endswith("_bucket")
    }
    for name in names:
        base = name.rsplit("_", 1)[0]
        if name.endswith("_created"):
            continue
        if base in histograms:
            name = base
        assert f"`{name}`" in docs, f"{name} is not in docs/metrics.md"


# ------------------------------------------------------------ readiness


def test_ready_when_started_with_a_live_worker_and_the_database() -> None:
    assert readiness(
        started=True, draining=False, live_workers=1, database_reachable=True
    ) == Readiness(True, ())


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ({"started": False}, "starting"),
        ({"draining": True}, "draining"),
        ({"live_workers": 0}, "no live worker"),
        ({"database_reachable": False}, "database unreachable"),
    ],
)
def test_not_ready_says_why(state: dict[str, Any], reason: str) -> None:
    healthy: dict[str, Any] = {
        "started": True,
        "draining": False,
        "live_workers": 2,
        "database_reachable": True,
    }
    ready, reasons = readiness(**{**healthy, **state})
    assert not ready
    assert len(reasons) == 1
    assert reason in reasons[0]


# ------------------------------------------------------------ the endpoint


@dataclass
class Health:
    """The supervisor's state as /readyz sees it, changeable by a test."""

    started: bool = True
    draining: bool = False
    live_workers: int = 2
    database_reachable: bool = True
    scrapes: int = 0

    def readiness(self) -> Readiness:
        return readiness(
            started=self.started,
            draining=self.draining,
            live_workers=self.live_workers,
            database_reachable=self.database_reachable,
        )

    def before_scrape(self) -> None:
        self.scrapes += 1


@dataclass
class ServedLoop:
    """A selectors loop shaped like the supervisor's, serving one endpoint.

    It runs in a thread of the test so the test can be the client; it
    records the longest time one iteration of the loop took.
    """

    server: HttpServer
    selector: selectors.BaseSelector
    stop: threading.Event = field(default_factory=threading.Event)
    longest_iteration_s: float = 0.0
    most_connections: int = 0
    thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server.address[1]

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def run(self) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
            for key, events in self.selector.select(0.05):
                assert self.server.handle(key, events), key
            self.server.expire()
            self.most_connections = max(
                self.most_connections, len(self.server.connections)
            )
            self.longest_iteration_s = max(
                self.longest_iteration_s, time.monotonic() - began - 0.05
            )

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)
        self.server.close()
        self.selector.close()


@pytest.fixture
def health() -> Health:
    return Health()


@pytest.fixture
def pool() -> PoolMetrics:
    pool = PoolMetrics(version="0.1.0")
    feed_a_day(pool)
    return pool


@pytest.fixture
def serve(
    pool: PoolMetrics, health: Health
) -> Iterator[Callable[..., ServedLoop]]:
    loops: list[ServedLoop] = []

    def start(
        *, tls: ssl.SSLContext | None = None, limits: Limits | None = None
    ) -> ServedLoop:
        selector = selectors.DefaultSelector()
        endpoint = MetricsEndpoint(pool, health.readiness, health.before_scrape)
        server = HttpServer(
            selector, "127.0.0.1", 0, endpoint, tls=tls, limits=limits
        )
        loop = ServedLoop(server, selector)
        loops.append(loop)
        loop.start()
        return loop

    yield start
    for loop in loops:
        loop.close()


@dataclass
class Fetched:
    status: int
    headers: Mapping[str, str]
    body: bytes


def fetch(
    url: str,
    *,
    method: str = "GET",
    context: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> Fetched:
    """A real HTTP(S) request through urllib (no proxy), errors included."""
    handlers: list[urllib.request.BaseHandler] = [
        urllib.request.ProxyHandler({})
    ]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(url, method=method)
    try:
        with opener.open(request, timeout=timeout) as answer:
            return Fetched(answer.status, dict(answer.headers), answer.read())
    except urllib.error.HTTPError as error:
        with error:
            return Fetched(error.code, dict(error.headers), error.read())


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def connect(loop: ServedLoop) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", loop.port), timeout=5)
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_metrics_are_served_in_prometheus_text_format(
    serve: Callable[..., ServedLoop], health: Health, promtool: str
) -> None:
    loop = serve()
    answer = fetch(loop.url("/metrics"))
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith(
        "text/plain; version=0.0.4"
    )
    scrape = parse_scrape(answer.body.decode())
    assert scrape_sum(scrape, "pdoflowd_jobs_processed_total") == 8
    assert health.scrapes == 1
    promtool_check_metrics(promtool, answer.body)


def test_livez_answers_while_the_loop_runs(
    serve: Callable[..., ServedLoop],
) -> None:
    answer = fetch(serve().url("/livez"))
    assert (answer.status, answer.body) == (
        200,
        b"ok: the supervisor loop is running\n",
    )


def test_readyz_is_200_when_ready_and_503_with_the_reasons_when_not(
    serve: Callable[..., ServedLoop], health: Health
) -> None:
    loop = serve()
    assert fetch(loop.url("/readyz")).status == 200
    health.draining = True
    health.database_reachable = False
    answer = fetch(loop.url("/readyz"))
    assert answer.status == 503
    assert answer.body == (
        b"not ready: draining: the daemon is stopping\n"
        b"not ready: database unreachable\n"
    )


def test_unknown_paths_are_404_and_other_methods_405(
    serve: Callable[..., ServedLoop],
) -> None:
    loop = serve()
    assert fetch(loop.url("/nothing")).status == 404
    refused = fetch(loop.url("/metrics"), method="POST")
    assert refused.status == 405
    assert refused.headers["Allow"] == "GET, HEAD"


def test_head_gets_the_length_without_the_body(
    serve: Callable[..., ServedLoop],
) -> None:
    loop = serve()
    answer = fetch(loop.url("/livez"), method="HEAD")
    assert answer.status == 200
    assert answer.body == b""
    assert answer.headers["Content-Length"] == str(
        len(b"ok: the supervisor loop is running\n")
    )


def test_the_query_string_is_ignored(serve: Callable[..., ServedLoop]) -> None:
    assert fetch(serve().url("/livez?verbose=1")).status == 200


def test_a_failing_handler_gives_500_and_the_server_keeps_serving() -> None:
    calls = []

    def handler(method: str, path: str) -> Response:
        calls.append(path)
        if path == "/boom":
            raise RuntimeError("boom")
        return Response(200, b"fine\n")

    selector = selectors.DefaultSelector()
    loop = ServedLoop(HttpServer(selector, "127.0.0.1", 0, handler), selector)
    loop.start()
    try:
        assert fetch(loop.url("/boom")).status == 500
        assert fetch(loop.url("/fine")).status == 200
    finally:
        loop.close()


def test_a_garbled_request_line_gets_400(
    serve: Callable[..., ServedLoop],
) -> None:
    loop = serve()
    with connect(loop) as sock:
        sock.sendall(b"HELLO\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize(
    "stuck_with",
    [b"", b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"],
    ids=["nothing", "half a request"],
)
def test_a_stuck_client_neither_blocks_others_nor_outlives_its_deadline(
    serve: Callable[..., ServedLoop], stuck_with: bytes
) -> None:
    loop = serve(limits=Limits(deadline_s=1.0))
    with connect(loop) as stuck:
        stuck.sendall(stuck_with)
        wait_until(lambda: len(loop.server.connections) == 1)
        began = time.monotonic()
        assert fetch(loop.url("/livez")).status == 200
        assert time.monotonic() - began < 0.5
        assert read_all_until_reset(stuck) == b"", "dropped, not answered"
        assert 0.5 <= time.monotonic() - began < 3.0
    wait_until(lambda: not loop.server.connections)
    assert loop.longest_iteration_s < 0.2


def test_an_oversized_request_is_refused(
    serve: Callable[..., ServedLoop],
) -> None:
    loop = serve(limits=Limits(max_request_bytes=1024))
    with connect(loop) as sock:
        sock.sendall(
            b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * 4096 + b"\r\n\r\n"
        )
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b"pdoflowd_" not in answer


def test_an_endless_request_is_refused_before_it_ends(
    serve: Callable[..., ServedLoop],
) -> None:
    loop = serve(limits=Limits(max_request_bytes=1024, deadline_s=2.0))
    with connect(loop) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * 2048)
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock).startswith(b"HTTP/1.1 431 ")


def test_open_connections_are_bounded_and_a_new_client_displaces_an_idle_one(
    serve: Callable[..., ServedLoop],
) -> None:
    loop = serve(limits=Limits(max_connections=2, deadline_s=5.0))
    stuck = [connect(loop), connect(loop)]
    try:
        wait_until(lambda: len(loop.server.connections) == 2)
        began = time.monotonic()
        answer = fetch(loop.url("/livez"))
        waited = time.monotonic() - began
        closed = read_all_until_reset(stuck[0])
    finally:
        for sock in stuck:
            sock.close()
    assert answer.status == 200
    assert waited < 0.5, "served at once, not after a stuck client expired"
    assert closed == b"", "the oldest idle connection made room"
    assert loop.most_connections == 2
    assert loop.longest_iteration_s < 0.2


def test_a_slow_reader_of_a_large_answer_is_dropped_at_its_deadline() -> None:
    body = b"x" * (16 * 1024 * 1024)
    selector = selectors.DefaultSelector()
    server = HttpServer(
        selector,
        "127.0.0.1",
        0,
        lambda method, path: Response(200, body),
        limits=Limits(deadline_s=1.0),
    )
    loop = ServedLoop(server, selector)
    loop.start()
    try:
        with connect(loop) as reader:
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.sendall(b"GET / HTTP/1.1\r\n\r\n")
            time.sleep(0.2)
            assert fetch(loop.url("/")).status == 200
            wait_until(lambda: not server.connections, timeout=5)
            received = len(read_all_until_reset(reader))
        assert received < len(body)
        assert loop.longest_iteration_s < 0.5
    finally:
        loop.close()


def read_all_until_reset(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def test_the_server_hands_out_its_descriptors_for_the_forked_children(
    serve: Callable[..., ServedLoop],
) -> None:
    loop = serve()
    with connect(loop):
        wait_until(lambda: len(loop.server.connections) == 1)
        fds = loop.server.fds()
        assert len(fds) == 2
        assert all(fd >= 0 for fd in fds)


def test_an_address_in_use_is_an_endpoint_error() -> None:
    selector = selectors.DefaultSelector()
    first = HttpServer(selector, "127.0.0.1", 0, lambda m, p: Response(200))
    try:
        with pytest.raises(EndpointError, match="cannot listen on"):
            HttpServer(
                selector,
                "127.0.0.1",
                first.address[1],
                lambda m, p: Response(200),
            )
    finally:
        first.close()
        selector.close()


# ------------------------------------------------------------ TLS


@dataclass(frozen=True)
class Pki:
    """Certificates for the TLS tests, each a PEM file with its key."""

    server_cert: Path
    server_key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _pki_with_cryptography(directory: Path) -> Pki:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def write_key(key: ec.EllipticCurvePrivateKey, name: str) -> Path:
        path = directory / name
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    def issue(
        name: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
        *,
        ca: bool,
        usage: x509.ObjectIdentifier | None,
    ) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer_name, issuer_key = (
            (issuer[0].subject, issuer[1]) if issuer else (subject, key)
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.BasicConstraints(ca=ca, path_length=None), critical=True
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    issuer_key.public_key()
                ),
                critical=False,
            )
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        if usage is not None:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([usage]), critical=False
            )
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.DNSName("localhost"),
                    ]
                ),
                critical=False,
            )
        return builder.sign(issuer_key, hashes.SHA256())

    def write_cert(cert: x509.Certificate, name: str) -> Path:
        path = directory / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def new_key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    server_key = new_key()
    # Self-signed: the client trusts this very certificate.
    server = issue(
        "pdoflowd test server",
        server_key,
        None,
        ca=True,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    ca_key, stranger_ca_key = new_key(), new_key()
    ca = issue("pdoflowd test client CA", ca_key, None, ca=True, usage=None)
    stranger_ca = issue(
        "a stranger CA", stranger_ca_key, None, ca=True, usage=None
    )
    client_key, stranger_key = new_key(), new_key()
    client = issue(
        "scraper",
        client_key,
        (ca, ca_key),
        ca=False,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    stranger = issue(
        "stranger",
        stranger_key,
        (stranger_ca, stranger_ca_key),
        ca=False,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    return Pki(
        write_cert(server, "server.pem"),
        write_key(server_key, "server.key"),
        write_cert(ca, "client-ca.pem"),
        write_cert(client, "client.pem"),
        write_key(client_key, "client.key"),
        write_cert(stranger, "stranger.pem"),
        write_key(stranger_key, "stranger.key"),
    )


def _pki_with_openssl(directory: Path) -> Pki:
    openssl = shutil.which("openssl")
    assert openssl is not None

    def run(*args: str) -> None:
        subprocess.run(
            [openssl, *args], cwd=directory, check=True, capture_output=True
        )

    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")

    def self_signed(name: str, cn: str, *extensions: str) -> None:
        extra = [arg for ext in extensions for arg in ("-addext", ext)]
        run(
            "req", "-x509", *key, "-keyout", f"{name}.key",
            "-out", f"{name}.pem", "-days", "1", "-subj", f"/CN={cn}",
            *extra,
        )  # fmt: skip

    def signed(name: str, cn: str, ca: str, usage: str) -> None:
        run(
            "req", "-new", *key, "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={cn}",
        )  # fmt: skip
        (directory / f"{name}.ext").write_text(
            "basicConstraints=critical,CA:FALSE\n"
            f"extendedKeyUsage={usage}\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid\n"
        )
        run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem",
            "-CAkey", f"{ca}.key", "-CAcreateserial", "-days", "1",
            "-extfile", f"{name}.ext", "-out", f"{name}.pem",
        )  # fmt: skip

    self_signed(
        "server",
        "pdoflowd test server",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "extendedKeyUsage=serverAuth",
    )
    ca_extensions = (
        "basicConstraints=critical,CA:TRUE",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )
    self_signed("client-ca", "pdoflowd test client CA", *ca_extensions)
    self_signed("stranger-ca", "a stranger CA", *ca_extensions)
    signed("client", "scraper", "client-ca", "clientAuth")
    signed("stranger", "stranger", "stranger-ca", "clientAuth")
    return Pki(
        directory / "server.pem",
        directory / "server.key",
        directory / "client-ca.pem",
        directory / "client.pem",
        directory / "client.key",
        directory / "stranger.pem",
        directory / "stranger.key",
    )


@pytest.fixture(params=["cryptography", "openssl"])
def pki(request: pytest.FixtureRequest, tmp_path: Path) -> Pki:
    if request.param == "cryptography":
        pytest.importorskip("cryptography")
        return _pki_with_cryptography(tmp_path)
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    return _pki_with_openssl(tmp_path)


def client_context(pki: Pki, cert: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.server_cert))
    if cert is not None:
        context.load_cert_chain(cert, cert.with_suffix(".key"))
    return context


def test_metrics_are_served_over_tls(
    serve: Callable[..., ServedLoop], pki: Pki
) -> None:
    loop = serve(tls=tls_context(pki.server_cert, pki.server_key))
    answer = fetch(loop.url("/metrics", "https"), context=client_context(pki))
    assert answer.status == 200
    assert b"pdoflowd_jobs_claimed_total 5.0" in answer.body
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        fetch(
            loop.url("/metrics", "https"), context=ssl.create_default_context()
        )


def test_a_stalled_tls_handshake_does_not_block_others(
    serve: Callable[..., ServedLoop], pki: Pki
) -> None:
    loop = serve(
        tls=tls_context(pki.server_cert, pki.server_key),
        limits=Limits(deadline_s=1.0),
    )
    context = client_context(pki)
    with connect(loop) as stalled, connect(loop) as plain:
        stalled.sendall(b"\x16\x03\x01")  # the start of a ClientHello
        plain.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        wait_until(lambda: len(loop.server.connections) >= 1)
        assert fetch(loop.url("/livez", "https"), context=context).status == 200
        assert b"200 OK" not in read_all_until_reset(plain)
        assert read_all_until_reset(stalled) == b""
    wait_until(lambda: not loop.server.connections)
    assert loop.longest_iteration_s < 0.2


def test_required_client_certificates_refuse_clients_without_one(
    serve: Callable[..., ServedLoop], pki: Pki
) -> None:
    loop = serve(
        tls=tls_context(pki.server_cert, pki.server_key, pki.client_ca)
    )
    url = loop.url("/metrics", "https")
    for refused in (
        client_context(pki),
        client_context(pki, pki.stranger_cert),
    ):
        with pytest.raises(
            (
                urllib.error.URLError,
                ConnectionError,
                ssl.SSLError,
                http.client.HTTPException,
            )
        ):
            fetch(url, context=refused)
    answer = fetch(url, context=client_context(pki, pki.client_cert))
    assert answer.status == 200
    assert parse_scrape(answer.body.decode())


def test_the_tls_context_can_be_replaced_for_later_connections(
    serve: Callable[..., ServedLoop], pki: Pki
) -> None:
    loop = serve()
    assert fetch(loop.url("/livez")).status == 200
    loop.server.set_tls(tls_context(pki.server_cert, pki.server_key))
    answer = fetch(loop.url("/livez", "https"), context=client_context(pki))
    assert answer.status == 200


def test_unreadable_tls_files_are_an_endpoint_error(
    tmp_path: Path, pki: Pki
) -> None:
    with pytest.raises(EndpointError, match="cannot load the TLS certificate"):
        tls_context(tmp_path / "missing.pem", tmp_path / "missing.key")
    with pytest.raises(EndpointError, match="cannot load the client CA"):
        tls_context(pki.server_cert, pki.server_key, tmp_path / "none.pem")


# ------------------------------------------------------------ queue gauges
#
# The statements of upkeep.queue_stats and the index the schema gives them
# (jobs_waiting_since), against a real PostgreSQL.


def read_queue(
    conn: psycopg.Connection[Any],
) -> tuple[dict[str, int], float | None]:
    """What the supervisor passes to PoolMetrics.set_queue."""
    return upkeep.queue_stats(conn)


def add_posting(conn: psycopg.Connection[Any], status: str) -> int:
    row = conn.execute(
        "INSERT INTO pdoflowd.postings (uuid, target_function, entry_point,"
        " status) VALUES (gen_random_uuid(), 'f', 'pkg.f', %s) RETURNING id",
        (status,),
    ).fetchone()
    assert row is not None
    return int(row[0])


def add_jobs(
    conn: psycopg.Connection[Any],
    posting: int,
    count: int,
    status: str,
    *,
    age_s: float = 0.0,
    run_in_s: float | None = None,
) -> None:
    conn.execute(
        "INSERT INTO pdoflowd.jobs (uuid, posting_id, status, created_at,"
        " run_after)"
        " SELECT gen_random_uuid(), %(posting)s, %(status)s,"
        "        now() - make_interval(secs => %(age)s),"
        "        now() + make_interval(secs => %(run_in)s)"
        " FROM generate_series(1, %(count)s)",
        {
            "posting": posting,
            "status": status,
            "age": age_s,
            "run_in": run_in_s,
            "count": count,
        },
    )


def test_queue_gauges_count_and_age_only_runnable_waiting_jobs(
    dsn: str,
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        running = add_posting(conn, "executing")
        paused = add_posting(conn, "paused")
        add_jobs(conn, running, 3, "waiting", age_s=60)
        add_jobs(conn, running, 2, "waiting", age_s=600, run_in_s=30)
        add_jobs(conn, paused, 4, "waiting", age_s=3600)
        add_jobs(conn, running, 1, "executing")
        add_jobs(conn, running, 5, "done", age_s=7200)
        counts, oldest = read_queue(conn)
    assert counts == {"waiting": 9, "executing": 1}
    assert oldest is not None
    assert 60 <= oldest < 70, "paused and scheduled jobs are not waiting yet"


def test_no_runnable_job_means_no_oldest_age(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        add_jobs(conn, add_posting(conn, "executing"), 2, "done")
        assert read_queue(conn) == ({"waiting": 0, "executing": 0}, None)


def plan_of(conn: psycopg.Connection[Any], query: str) -> str:
    rows = conn.execute(
        "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) " + query,
        {"cap": upkeep.QUEUE_COUNT_CAP},
    ).fetchall()
    return "\n".join(row[0] for row in rows)


def buffers_of(plan: str) -> int:
    first = next(line for line in plan.splitlines() if "Buffers:" in line)
    return sum(
        int(part.split("=")[1])
        for part in first.split("Buffers:")[1].split()
        if "=" in part
    )


@pytest.mark.slow
def test_queue_gauge_queries_stay_cheap_beside_a_million_done_jobs(
    dsn: str,
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        running = add_posting(conn, "executing")
        add_jobs(conn, running, 1_000_000, "done", age_s=86400)
        add_jobs(conn, running, 1000, "waiting", age_s=5)
        add_jobs(conn, running, 100, "executing")
        conn.execute("VACUUM ANALYZE pdoflowd.jobs")
        counts_plan = plan_of(conn, upkeep._QUEUE_COUNTS)
        oldest_plan = plan_of(conn, upkeep._OLDEST_WAITING)
        counts, oldest = read_queue(conn)
    assert counts == {"waiting": 1000, "executing": 100}
    assert oldest is not None
    assert "Seq Scan on jobs" not in counts_plan, counts_plan
    assert "Seq Scan on jobs" not in oldest_plan, oldest_plan
    assert "jobs_waiting_since" in oldest_plan, oldest_plan
    assert buffers_of(counts_plan) < 50, counts_plan
    assert buffers_of(oldest_plan) < 20, oldest_plan
