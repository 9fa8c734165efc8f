"""Faults around a job that a worker must survive: a job timed out inside
its own statement, a supervisor that stops reading its workers' reports,
and a job run by hand (``pdoflow execute-job``) past its timeout or cut
short by Ctrl-C.

Everything is real: the daemon and ``pdoflow`` run as subprocesses, the
timeouts are signals, the supervisor is stopped with SIGSTOP.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
import pytest

from devtools.devcluster import free_port
from harness import REPO_ROOT, TESTS_DIR, Daemon, wait_until, write_config
from pdoflowd import current_job
from pdoflowd.client import Client
from pdoflowd.config import Config, DatabaseConfig, JobsConfig
from pdoflowd.daemon.metrics import PoolMetrics
from pdoflowd.daemon.pool import Pool, WorkerHandle
from pdoflowd.daemon.scoreboard import Scoreboard
from pdoflowd.daemon.tally import (
    REPORT_INTERVAL_S,
    JobRun,
    WorkerTally,
    batch_report,
    merge_reports,
)
from pdoflowd.daemon.worker import Worker, WorkerSpec
from pdoflowd.db import queue
from pdoflowd.exitcodes import EXIT_ERRORED, EXIT_INTERRUPTED
from pdoflowd.jobcontext import JobCall, job_connector
from pdoflowd.status import JobStatus, PostingStatus
from scrape import parse_scrape, scrape_sum

FEATURES = {"allowed_modules": ["jobfns", "featurejobs"]}


def fetch(port: int, path: str) -> str:
    url = f"http://127.0.0.1:{port}{path}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def job_row(dsn: str, job_id: Any) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        row = cur.execute(
            "SELECT * FROM pdoflowd.jobs WHERE uuid = %s", (job_id,)
        ).fetchone()
    assert row is not None
    return dict(row)


def sleeping_backends(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE query LIKE 'SELECT pg_sleep%%' AND state = 'active'"
        ).fetchone()
    assert row is not None
    return int(row[0])


# ------------------------------------------------ a timeout inside a query


def test_a_job_timed_out_inside_its_query_leaves_the_next_jobs_a_connection(
    daemons: Any, effects_dsn: str
) -> None:
    daemon: Daemon = daemons(
        workers={"count": 1},
        # Long enough that the worker is not killed (and its connection
        # with it) within the test: it must recover by itself.
        jobs={**FEATURES, "timeout_grace_s": 60.0},
    )
    [worker] = daemon.workers()
    client = Client(effects_dsn)
    stuck = client.post(
        "featurejobs.query_past_timeout", [[30]], tries=1, timeout_s=0.5
    )
    client.wait(stuck.id, timeout=30, poll_interval=0.05)
    row = job_row(effects_dsn, stuck.job_ids[0])
    assert (row["status"], row["error"]) == (
        "errored_out",
        "timeout after 0.5 s",
    )
    # The statement was cancelled, not left running on the server.
    wait_until(lambda: sleeping_backends(effects_dsn) == 0, timeout=5)

    progress = client.post("featurejobs.report_progress", [[3]], tries=1)
    counter = client.post("featurejobs.count_up", [[2]], tries=1)
    described = client.post(
        "featurejobs.describe", [[]], tries=1, store_result=True
    )
    for posting in (progress, counter, described):
        client.wait(posting.id, timeout=30, poll_interval=0.05)
        row = job_row(effects_dsn, posting.job_ids[0])
        assert (row["status"], row["error"]) == ("done", None)
    assert job_row(effects_dsn, progress.job_ids[0])["progress_note"] == (
        "step 3 of 3"
    )
    assert client.shared(counter.id).get("counter") == 2
    [result] = client.results(described.id)
    assert result.status is JobStatus.DONE
    assert result.value["pid"] == worker
    assert daemon.workers() == [worker]


def left_in_a_transaction() -> None:
    current_job().connection().execute("BEGIN")
    current_job().connection().execute("SELECT 1")


def transaction_state() -> str:
    return str(current_job().connection().info.transaction_status.name)


def test_a_transaction_a_job_left_open_does_not_reach_the_next_job(
    dsn: str,
) -> None:
    owner = uuid.uuid4()
    config = Config(
        database=DatabaseConfig(dsn=dsn), jobs=JobsConfig(allowed_modules=())
    )
    Client(dsn).post("tests.left_open", [[], []], store_result=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        first, second = queue.claim(
            conn, owner=owner, daemon_id=uuid.uuid4(), limit=2
        )

    def call(job: queue.ClaimedJob) -> JobCall:
        return JobCall(
            job,
            owner=owner,
            config=config,
            connect=job_connector(config.database, None),
            draw=0,
        )

    call(first).run(left_in_a_transaction)
    later = call(second)
    later.run(transaction_state)
    assert later.result_json == '"IDLE"'


# ------------------------------------------------ a supervisor not reading


def database_attempts(dsn: str) -> tuple[int, int]:
    """(attempts made, jobs done) as the database recorded them."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(attempt), 0),"
            " count(*) FILTER (WHERE status = 'done') FROM pdoflowd.jobs"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_workers_go_on_while_the_supervisor_reads_no_report_and_count_all(
    daemons: Any, effects_dsn: str
) -> None:
    port = free_port()
    daemon: Daemon = daemons(
        # One report per claim and one per outcome: a few hundred jobs fill
        # the report pipe of a supervisor that does not read it.
        workers={"count": 1, "batch_size": 1, "outcome_flush_ms": 0},
        metrics={"listen": f"127.0.0.1:{port}"},
        daemon={"host_lease_s": 120.0},
    )
    jobs = 1500
    daemon.send(signal.SIGSTOP)
    try:
        Client(effects_dsn).post("jobfns.noop", [[]] * jobs)
        wait_until(
            lambda: database_attempts(effects_dsn)[1] == jobs, timeout=60
        )
    finally:
        daemon.send(signal.SIGCONT)
    attempts, done = database_attempts(effects_dsn)
    assert (attempts, done) == (jobs, jobs)

    def counted() -> Any:
        scrape = parse_scrape(fetch(port, "/metrics"))
        return (
            scrape_sum(scrape, "pdoflowd_jobs_processed_total")
            == scrape_sum(scrape, "pdoflowd_jobs_claimed_total")
            == attempts
        ) and scrape

    scrape = wait_until(counted, timeout=30)
    processed = "pdoflowd_jobs_processed_total"
    assert scrape_sum(scrape, processed, outcome="done") == jobs
    assert daemon.stop() == 0
    assert "report from worker" not in daemon.log(), "every line was whole"


def scrape_of(*reports: dict[str, Any]) -> dict[Any, float]:
    pool = PoolMetrics(version="test", process_metrics=False)
    for report in reports:
        pool.apply_worker_report(report)
    return {
        key: value
        for key, value in parse_scrape(pool.render().decode()).items()
        if ("job" in key[0] or "claim" in key[0])
        and not key[0].endswith("_created")
    }


def test_a_held_report_merged_with_later_ones_counts_what_they_count() -> None:
    reports = [
        batch_report(claimed=3, claim_s=[0.001], wait_s=[0.5, 1.0]),
        batch_report(
            claim_s=[0.002],
            wait_s=[2.0],
            runs=[
                JobRun("done", "pkg.f", 0.25),
                JobRun("failed", "pkg.f", 1.5),
                JobRun("released", "pkg.g", None),
            ],
        ),
        batch_report(claimed=1, runs=[JobRun("done", "pkg.f", 0.75)]),
    ]
    merged = reports[0]
    for later in reports[1:]:
        merged = merge_reports(merged, later)
    assert json.loads(json.dumps(merged)) == merged
    assert scrape_of(merged) == scrape_of(*reports)


def test_a_held_report_counts_every_duration_and_stays_one_report() -> None:
    one = batch_report(
        claimed=1, claim_s=[0.001], runs=[JobRun("done", "pkg.f", 0.5)]
    )
    merged = one
    for _ in range(9999):
        merged = merge_reports(merged, one)
    assert merged["claimed"] == 10000
    assert merged["claim_s"][1] == [0, 10000]
    assert merged["outcomes"]["done"]["pkg.f"][0] == 10000
    assert len(json.dumps(merged)) < len(json.dumps(one)) + 40
    scrape = scrape_of(merged)
    assert scrape_sum(scrape, "pdoflowd_jobs_processed_total") == 10000
    assert scrape_sum(scrape, "pdoflowd_jobs_claimed_total") == 10000
    assert scrape_sum(scrape, "pdoflowd_claim_duration_seconds_count") == 10000
    assert scrape_sum(scrape, "pdoflowd_job_duration_seconds_count") == 10000


def unconnected_worker(report_fd: int) -> Worker:
    """A real Worker in this process that writes its reports on
    ``report_fd``; it is given no database, so tests call its parts."""
    return Worker(
        WorkerSpec(
            slot=0,
            daemon_id=uuid.uuid4(),
            config=Config(),
            password=None,
            scoreboard=Scoreboard(1),
            wake_fd=-1,
            report_fd=report_fd,
            parent_pid=os.getpid(),
            inherited_fds=(),
        )
    )


def test_report_lines_stay_whole_and_metrics_exact_through_a_full_pipe() -> (
    None
):
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    worker = unconnected_worker(write_fd)
    received = bytearray()

    def read(limit: int) -> None:
        with contextlib.suppress(BlockingIOError):
            received.extend(os.read(read_fd, limit))

    try:
        sent = 0
        for n in range(3000):
            # Lines of every size up to twice PIPE_BUF, so writes are cut.
            worker.report("probe", n=n, pad="x" * (n * 997 % 8192))
            worker.tally.note_claim(0.001, 1)
            # Forced: one report per line here, each merged while held.
            worker.send_metrics(force=True)
            sent += 1
            if n % 40 == 0:
                read(3000)  # a supervisor reading now and then, in bits
        deadline = time.monotonic() + 10
        while not worker.deliver_reports() and time.monotonic() < deadline:
            read(65536)
        read(65536)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert received.endswith(b"\n")
    lines = [json.loads(line) for line in received.splitlines()]
    probes = [line["n"] for line in lines if line["event"] == "probe"]
    assert probes == sorted(set(probes)), "in order, none twice"
    assert 0 < len(probes) < sent, "the pipe was full: some were dropped"
    assert worker.reports_dropped == sent - len(probes)
    reports = [line for line in lines if line["event"] == "metrics"]
    # No metrics report is ever dropped: every claim is counted.
    assert sum(report["claimed"] for report in reports) == sent


class Recorded(NamedTuple):
    job_id: int
    kind: str
    status: str


def test_a_busy_worker_reports_a_few_times_and_exactly_once_idle() -> None:
    """A burst of 300 batches of 10 jobs, 3 s by the worker's clock, in the
    order Worker.run goes: claim, report if due, run, flush (the outcomes
    go to the tally, a report if due); then a claim finds nothing."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    worker = unconnected_worker(write_fd)
    now = [1000.0]
    worker.tally = WorkerTally(clock=lambda: now[0])
    batches, batch = 300, 10
    received = bytearray()
    try:
        for number in range(batches):
            worker.tally.note_claim(0.002, batch)
            worker.send_metrics()
            ids = range(number * batch, (number + 1) * batch)
            for job_id in ids:
                worker.tally.note_run(job_id, "pkg.f", 0.0001, waited_s=0.5)
                now[0] += 0.001
            # The last job of each batch is fenced off: not counted.
            worker.outcomes_recorded(
                [Recorded(job_id, "done", "done") for job_id in ids[:-1]]
            )
            with contextlib.suppress(BlockingIOError):
                received += os.read(read_fd, 65536)
        busy = [json.loads(line) for line in received.splitlines()]
        # The idle branch of Worker.run.
        worker.tally.note_claim(0.002, 0)
        if worker.tally.due():
            worker.send_metrics()
        with contextlib.suppress(BlockingIOError):
            received += os.read(read_fd, 65536)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    lines = [json.loads(line) for line in received.splitlines()]
    elapsed = batches * batch * 0.001
    assert len(busy) <= elapsed / REPORT_INTERVAL_S + 1
    assert len(lines) == len(busy) + 1, "going idle sent what was left"
    scrape = scrape_of(*lines)
    assert scrape_sum(scrape, "pdoflowd_jobs_claimed_total") == batches * batch
    done = batches * (batch - 1)
    assert scrape_sum(scrape, "pdoflowd_jobs_processed_total") == done
    assert scrape_sum(scrape, "pdoflowd_job_duration_seconds_count") == done
    assert (
        scrape_sum(scrape, "pdoflowd_job_queue_wait_seconds_count")
        == batches * batch
    )
    assert (
        scrape_sum(scrape, "pdoflowd_claim_duration_seconds_count")
        == batches + 1
    )
    assert worker.tally.take() is None


class DyingWorker:
    """A worker in this process and a pool that reads its pipe and, as it
    does for a worker that ended, its scoreboard slot's stash."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.worker = unconnected_worker(write_fd)
        self.now = 1000.0
        self.worker.tally = WorkerTally(clock=lambda: self.now)
        self.metrics = PoolMetrics(version="test", process_metrics=False)
        self.pool = Pool(
            Config(),
            None,
            daemon_id=uuid.uuid4(),
            scoreboard=self.worker.spec.scoreboard,
            selector=selectors.DefaultSelector(),
            metrics=self.metrics,
            rng=random.Random(),
            inherited_fds=tuple,
            take_back=lambda *args: None,
        )
        self.handle = WorkerHandle(
            slot=0,
            pid=12345,
            wake_fd=-1,
            report_fd=read_fd,
            generation=0,
            started=0.0,
        )
        self.pool.workers[self.handle.pid] = self.handle
        self.jobs = 0

    def batch(self, *, killed: bool = False) -> None:
        """Claim two jobs, run them, record them, as Worker.run does; or
        be ``killed`` by the first."""
        ids = (self.jobs, self.jobs + 1)
        self.jobs += 2
        self.worker.tally.note_claim(0.002, 2)
        self.worker.send_metrics()
        for job_id in ids:
            # As Worker.run_job does before each job.
            self.worker.send_metrics(stash=True)
            if killed:
                return
            self.worker.tally.note_run(job_id, "pkg.f", 0.01, waited_s=0.5)
        self.worker.outcomes_recorded(
            [Recorded(job_id, "done", "done") for job_id in ids]
        )
        self.now += 0.01

    def ended(self) -> None:
        while self.pool.read_report(self.handle.pid):
            pass
        self.pool.count_stash(self.handle)

    def counted(self) -> tuple[float, float]:
        scrape = parse_scrape(self.metrics.render().decode())
        return (
            scrape_sum(scrape, "pdoflowd_jobs_claimed_total"),
            scrape_sum(scrape, "pdoflowd_jobs_processed_total"),
        )


def test_a_dead_workers_unsent_counts_are_counted_from_its_slot() -> None:
    """A worker killed between two reports (a job of its may kill it) has
    stashed what it had not sent in its scoreboard slot: the pool counts
    it, after the lines it read, once."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        dying = DyingWorker(read_fd, write_fd)
        for _ in range(5):
            dying.batch()
        dying.batch(killed=True)
        # The first claim was reported at once; everything since waits.
        while dying.pool.read_report(dying.handle.pid):
            pass
        assert dying.counted() == (2, 0)
        dying.ended()
        assert dying.counted() == (12, 10)
        dying.ended()
        assert dying.counted() == (12, 10), "once"
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_a_stash_a_report_counted_already_is_not_counted_again() -> None:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        dying = DyingWorker(read_fd, write_fd)
        for _ in range(5):
            dying.batch()
        # Sent, and killed before its next stash.
        dying.worker.send_metrics(force=True)
        dying.ended()
        assert dying.counted() == (10, 10)
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_a_report_too_long_to_stash_goes_at_once() -> None:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    worker = unconnected_worker(write_fd)
    worker.tally = WorkerTally(clock=lambda: 1000.0)
    try:
        worker.tally.note_claim(0.002, 1)
        worker.send_metrics()
        first = os.read(read_fd, 65536)
        functions = [f"pkg.module_{n}.function_{n}" for n in range(200)]
        for job_id, function in enumerate(functions):
            worker.tally.note_run(job_id, function, 0.01)
        worker.outcomes_recorded(
            [Recorded(job_id, "done", "done") for job_id in range(200)]
        )
        worker.send_metrics(stash=True)
        second = os.read(read_fd, 65536)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert len(first.splitlines()) == len(second.splitlines()) == 1
    report = json.loads(second)
    assert len(report["outcomes"]["done"]) == 200


def test_a_worker_closing_sends_what_it_holds() -> None:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    worker = unconnected_worker(write_fd)
    try:
        worker.tally.note_claim(0.002, 3)
        worker.send_metrics()
        worker.tally.note_claim(0.002, 3)
        worker.send_metrics()
        first = os.read(read_fd, 65536)
        worker.close()
        last = os.read(read_fd, 65536)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert [json.loads(line)["claimed"] for line in first.splitlines()] == [3]
    assert [json.loads(line)["claimed"] for line in last.splitlines()] == [3]


# ------------------------------------------------ execute-job's timeout


def execute_job(
    dsn: str, config: Path, job_id: Any, limit_s: float = 25.0
) -> tuple[subprocess.CompletedProcess[str], float]:
    """``pdoflow execute-job`` as a subprocess: its result and duration."""
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PG") and k != "PDOFLOW_DSN"
    }
    environ["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT)])
    began = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdoflowd.cli",
            "--dsn",
            dsn,
            "execute-job",
            str(job_id),
            "--config",
            str(config),
        ],
        env=environ,
        capture_output=True,
        text=True,
        timeout=limit_s,
    )
    return done, time.monotonic() - began


def daemon_rows_stopped(dsn: str) -> list[bool]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT stopped_at IS NOT NULL FROM pdoflowd.daemons"
        ).fetchall()
    return [bool(row[0]) for row in rows]


@pytest.mark.parametrize(
    ("posted_timeout_s", "config_timeout_s"), [(0.5, 0.0), (None, 0.5)]
)
def test_execute_job_ends_a_job_at_its_timeout_and_records_it(
    dsn: str,
    tmp_path: Path,
    posted_timeout_s: float | None,
    config_timeout_s: float,
) -> None:
    config = write_config(
        tmp_path / "pdoflowd.toml",
        {
            "jobs": {
                "allowed_modules": ["featurejobs"],
                "timeout_s": config_timeout_s,
            }
        },
    )
    posting = Client(dsn).post(
        "featurejobs.nap", [[30]], timeout_s=posted_timeout_s
    )
    done, seconds = execute_job(dsn, config, posting.job_ids[0])
    assert done.returncode == EXIT_ERRORED, done.stderr
    assert "timeout after 0.5 s" in done.stdout
    assert seconds < 15
    row = job_row(dsn, posting.job_ids[0])
    assert (row["status"], row["attempt"], row["tries_remaining"]) == (
        "waiting",
        1,
        2,
    )
    assert row["error"] == "timeout after 0.5 s"
    assert daemon_rows_stopped(dsn) == [True]


def test_execute_job_abandons_a_job_deaf_to_its_timeout_after_the_grace(
    dsn: str, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "pdoflowd.toml",
        {"jobs": {"allowed_modules": ["featurejobs"], "timeout_grace_s": 1.0}},
    )
    client = Client(dsn)
    posting = client.post(
        "featurejobs.nap_deaf", [[30]], tries=1, timeout_s=0.5
    )
    done, seconds = execute_job(dsn, config, posting.job_ids[0])
    assert done.returncode == EXIT_ERRORED, done.stderr
    assert "did not stop within jobs.timeout_grace_s" in done.stderr
    assert 1.5 <= seconds < 15
    row = job_row(dsn, posting.job_ids[0])
    assert (row["status"], row["attempt"], row["tries_remaining"]) == (
        "errored_out",
        1,
        0,
    )
    assert row["error"] == "timeout after 0.5 s"
    assert client.status(posting.id).status is PostingStatus.FINISHED
    assert daemon_rows_stopped(dsn) == [True]


def test_execute_job_cut_short_by_ctrl_c_gives_the_job_back(
    dsn: str, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "pdoflowd.toml",
        {"jobs": {"allowed_modules": ["featurejobs"]}},
    )
    posting = Client(dsn).post("featurejobs.wait_for_flag", [["never", 60]])
    job_id = posting.job_ids[0]
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PG") and k != "PDOFLOW_DSN"
    }
    environ["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT)])
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pdoflowd.cli",
            "--dsn",
            dsn,
            "execute-job",
            str(job_id),
            "--config",
            str(config),
        ],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The job reports its progress once it runs, then waits.
        wait_until(lambda: job_row(dsn, job_id)["progress"] == 0.5, 20)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == EXIT_INTERRUPTED, err
    assert "): waiting after " in out
    assert "interrupted; the job is waiting again" in err
    assert "Traceback" not in err
    row = job_row(dsn, job_id)
    assert (
        row["status"],
        row["attempt"],
        row["tries_remaining"],
        row["error"],
        row["owner"],
    ) == ("waiting", 1, 3, None, None)
    assert daemon_rows_stopped(dsn) == [True]
