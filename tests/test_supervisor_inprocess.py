"""The supervisor inside the test process, as gunicorn tests its arbiter.

A real :class:`Supervisor` is built here and driven one pass of its loop
at a time (``step``), so a test can look at its pool between passes: real
workers forked from this process, real signals sent to it (its handlers
are installed here, and put back afterwards), a real database session
against a real PostgreSQL. Intervals are shrunk through the config. The
last part pins, without processes, how the pool words and counts a
worker's end when two causes meet, which real processes reach only by
races.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from harness import children_of, daemon_config
from pdoflowd.client import Client
from pdoflowd.config import Config, parse, resolve_password
from pdoflowd.daemon.pool import Ending, WorkerEnd, WorkerHandle
from pdoflowd.daemon.reports import MetricsReport
from pdoflowd.daemon.scoreboard import WorkerState
from pdoflowd.daemon.supervisor import HANDLED_SIGNALS, Supervisor
from pdoflowd.daemon.tally import REPORT_INTERVAL_S
from pdoflowd.exitcodes import EXIT_OK


class Driven:
    """A supervisor begun in this process, stepped by the test."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.finished = False

    def until(self, predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
        """Step the loop until ``predicate`` holds; return what it gave."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"condition not met within {timeout} s")
            assert self.supervisor.step(), "the loop ended first"

    def stop(self, signum: int, timeout: float = 20.0) -> int:
        """Send ``signum`` to this process; step until the loop ends."""
        os.kill(os.getpid(), signum)
        deadline = time.monotonic() + timeout
        while self.supervisor.step():
            assert time.monotonic() < deadline, (
                f"still running {timeout} s after"
            )
        self.supervisor.finish()
        self.finished = True
        return self.supervisor.exit_code

    def worker_running_a_job(self) -> WorkerHandle | None:
        pool = self.supervisor.pool
        for handle in pool.workers.values():
            if pool.scoreboard.read(handle.slot).state is WorkerState.RUNNING:
                return handle
        return None

    def abandon(self) -> None:
        """Kill what is left of a test that failed half-way."""
        sup = self.supervisor
        for pid in [*sup.pool.workers, sup.keeper.pid]:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        sup.selector.close()


def _forget_effects_connection() -> None:
    # A worker forked from here must open its own connection to the effects
    # table, never use one this process may hold from an earlier test.
    jobfns = sys.modules.get("jobfns")
    if jobfns is not None and jobfns._conn is not None:
        jobfns._conn.close()
        jobfns._conn = None


@pytest.fixture
def supervise(
    effects_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Driven]]:
    """``supervise(reload_to=None, **overrides)``: a begun supervisor."""
    monkeypatch.setenv("PDOFLOWD_TEST_EFFECTS_DSN", effects_dsn)
    _forget_effects_connection()
    saved = {signum: signal.getsignal(signum) for signum in HANDLED_SIGNALS}
    made: list[Driven] = []

    def make(
        reload_to: dict[str, Any] | None = None, **overrides: Any
    ) -> Driven:
        config = parse(daemon_config(effects_dsn, **overrides))
        password = resolve_password(config.database, os.environ)

        def reload() -> tuple[Config, str | None]:
            assert reload_to is not None, "this test reloads nothing"
            return parse(daemon_config(effects_dsn, **reload_to)), password

        driven = Driven(Supervisor(config, password, reload_config=reload))
        made.append(driven)
        assert driven.supervisor.begin()
        return driven

    try:
        yield make
    finally:
        signal.set_wakeup_fd(-1)
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        for driven in made:
            if not driven.finished:
                driven.abandon()
            os.close(driven.supervisor._signal_r)
            os.close(driven.supervisor._signal_w)


def job_rows(dsn: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        return cur.execute("SELECT * FROM pdoflowd.jobs ORDER BY id").fetchall()


def restarts(driven: Driven, reason: str) -> float:
    value = driven.supervisor.metrics.registry.get_sample_value(
        "pdoflowd_worker_restarts_total", {"reason": reason}
    )
    return value or 0.0


def is_our_child(pid: int) -> bool:
    return pid in children_of(os.getpid())


# ---------------------------------------------------------------- start


def test_slots_fill_with_forked_workers_then_ready_and_watchdog_are_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, supervise: Any
) -> None:
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(tmp_path / "notify"))
    systemd.settimeout(0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    with systemd:
        driven = supervise(workers={"count": 2})
        sup = driven.supervisor
        driven.until(lambda: sup.announced_ready)
        pool = sup.pool
        assert len(pool.workers) == 2
        assert sorted(s.worker_pid or 0 for s in pool.slots) == sorted(
            pool.workers
        )
        assert all(is_our_child(pid) for pid in pool.workers)
        assert all(h.ready and h.end is None for h in pool.workers.values())
        assert sup.readiness().ready
        messages: list[str] = []

        def heard(text: str) -> int:
            with contextlib.suppress(BlockingIOError):
                while True:
                    messages.append(systemd.recv(4096).decode())
            return sum(text in m.split("\n") for m in messages)

        driven.until(lambda: heard("READY=1"))
        # Pinged from the loop every half of WATCHDOG_USEC.
        pings = heard("WATCHDOG=1")
        driven.until(lambda: heard("WATCHDOG=1") >= pings + 2)
        assert driven.stop(signal.SIGTERM) == EXIT_OK
    assert not children_of(os.getpid())


# ---------------------------------------------------------------- ends


def test_a_killed_worker_is_replaced_and_its_job_taken_back(
    effects_dsn: str, supervise: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pdoflowd")
    driven = supervise(workers={"count": 1})
    sup = driven.supervisor
    Client(effects_dsn).post("jobfns.sleep", [[60]], tries=3)
    victim = driven.until(driven.worker_running_a_job)
    [job] = job_rows(effects_dsn)
    os.kill(victim.pid, signal.SIGKILL)

    def rerun() -> bool:
        [row] = job_rows(effects_dsn)
        return row["attempt"] == 2 and row["status"] == "executing"

    driven.until(rerun)
    [slot] = sup.pool.slots
    assert slot.worker_pid not in (None, victim.pid)
    assert is_our_child(slot.worker_pid or 0)
    [row] = job_rows(effects_dsn)
    assert row["error"] == "worker died: signal 9 (SIGKILL)"
    assert row["tries_remaining"] == 2
    driven.until(lambda: not sup.keeper.takebacks)
    assert sup.metrics.processed("worker_died") == 1
    assert restarts(driven, "crashed") == 1
    assert (
        f"worker {victim.pid} (slot 0): worker died: signal 9 (SIGKILL)"
        f" while running job {job['id']}"
    ) in caplog.text

    assert driven.stop(signal.SIGINT) == EXIT_OK
    [row] = job_rows(effects_dsn)
    assert row["status"] == "waiting"
    assert row["error"] == "daemon stopped fast: job killed"
    assert not children_of(os.getpid())


def test_a_job_past_its_timeout_in_code_deaf_to_sigterm_is_killed(
    effects_dsn: str, supervise: Any
) -> None:
    driven = supervise(
        workers={"count": 1}, jobs={"timeout_s": 0.5, "timeout_grace_s": 0.5}
    )
    sup = driven.supervisor
    Client(effects_dsn).post("jobfns.stubborn", [[30]], tries=1)
    handle = driven.until(driven.worker_running_a_job)
    end = driven.until(lambda: handle.end)
    assert end.why is WorkerEnd.TIMED_OUT
    assert end.job == job_rows(effects_dsn)[0]["id"]
    driven.until(lambda: handle.pid not in sup.pool.workers)
    driven.until(lambda: job_rows(effects_dsn)[0]["status"] == "errored_out")
    assert job_rows(effects_dsn)[0]["error"] == "timeout after 0.5 s"
    driven.until(lambda: sup.metrics.processed("timeout") == 1)
    assert restarts(driven, "timeout") == 1
    assert restarts(driven, "crashed") == 0
    driven.until(lambda: sup.pool.ready_count() == 1)
    assert driven.stop(signal.SIGTERM) == EXIT_OK


def test_a_worker_running_a_cancelled_job_is_ended_and_replaced(
    effects_dsn: str, supervise: Any
) -> None:
    driven = supervise(workers={"count": 1})
    sup = driven.supervisor
    client = Client(effects_dsn)
    posting = client.post("jobfns.sleep", [[60]])
    victim = driven.until(driven.worker_running_a_job)
    client.cancel(posting.id)
    driven.until(lambda: victim.pid not in sup.pool.workers)
    assert victim.end is not None
    assert victim.end.why is WorkerEnd.CANCELLED
    assert victim.end.job == job_rows(effects_dsn)[0]["id"]
    assert restarts(driven, "cancelled") == 1
    assert restarts(driven, "crashed") == 0
    driven.until(lambda: sup.pool.ready_count() == 1)
    [row] = job_rows(effects_dsn)
    assert (row["status"], row["error"]) == ("errored_out", "cancelled")
    assert driven.stop(signal.SIGTERM) == EXIT_OK


def test_report_lines_that_are_no_report_are_logged_and_skipped(
    supervise: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pdoflowd")
    driven = supervise(workers={"count": 1})
    sup = driven.supervisor
    driven.until(lambda: sup.announced_ready)
    (handle,) = sup.pool.workers.values()
    for line in (b"[1]", b"{not json", b'{"event": "bogus"}', b'"ready"'):
        sup.pool.on_report(handle, line)
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(f"bad report from worker {handle.pid}")
    ]
    assert len(warned) == 4
    assert handle.ready and handle.end is None
    # The loop goes on: the worker stays, and a stop still drains it.
    for _ in range(5):
        assert sup.step()
    assert list(sup.pool.workers) == [handle.pid]
    assert driven.stop(signal.SIGTERM) == EXIT_OK


# ---------------------------------------------------------------- signals


def test_sigterm_drains_the_pool_and_marks_the_daemon_stopped(
    effects_dsn: str, supervise: Any
) -> None:
    driven = supervise(workers={"count": 2})
    sup = driven.supervisor
    client = Client(effects_dsn)
    posting = client.post("jobfns.record", [[f"k{i}"] for i in range(20)])
    driven.until(lambda: client.status(posting.id).finished)
    workers = list(sup.pool.workers)
    assert driven.stop(signal.SIGTERM) == EXIT_OK
    assert not sup.pool.workers
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert sup.keeper.pid is None
    assert not children_of(os.getpid())
    with psycopg.connect(effects_dsn) as conn:
        row = conn.execute(
            "SELECT stopped_at IS NOT NULL FROM pdoflowd.daemons"
        ).fetchone()
    assert row == (True,)


def test_busy_workers_report_a_few_times_and_exactly_once_idle(
    effects_dsn: str, supervise: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, each claim and each flush sent a report: two per batch."""
    driven = supervise(workers={"count": 2, "batch_size": 10})
    sup = driven.supervisor
    driven.until(lambda: sup.pool.ready_count() == 2)
    applied: list[Any] = []
    apply = sup.metrics.apply

    def counted(report: Any) -> None:
        applied.append(report)
        apply(report)

    monkeypatch.setattr(sup.metrics, "apply", counted)
    jobs = 3000
    began = time.monotonic()
    Client(effects_dsn).post("jobfns.noop", [[i] for i in range(jobs)])
    # Every worker alive: the counts are whole once they have gone idle.
    driven.until(lambda: sup.metrics.processed("done") == jobs, timeout=120)
    elapsed = time.monotonic() - began
    reports = [r for r in applied if isinstance(r, MetricsReport)]
    assert sum(r.claimed for r in reports) == jobs
    assert len(reports) <= 2 * (elapsed / REPORT_INTERVAL_S + 3)
    assert len(reports) < jobs / 10, "fewer than the batches"
    registry = sup.metrics.registry
    for name in (
        "pdoflowd_job_queue_wait_seconds_count",
        "pdoflowd_jobs_claimed_total",
    ):
        assert registry.get_sample_value(name) == jobs
    assert (
        registry.get_sample_value(
            "pdoflowd_job_duration_seconds_count",
            {"outcome": "done", "function": "other"},
        )
        == jobs
    )
    assert driven.stop(signal.SIGTERM) == EXIT_OK


def test_sighup_rolls_every_worker_onto_the_reloaded_config(
    supervise: Any,
) -> None:
    driven = supervise(
        workers={"count": 2}, reload_to={"workers": {"count": 3}}
    )
    sup = driven.supervisor
    driven.until(lambda: sup.announced_ready)
    before = set(sup.pool.workers)
    os.kill(os.getpid(), signal.SIGHUP)
    driven.until(
        lambda: (
            len(sup.pool.workers) == 3
            and not set(sup.pool.workers) & before
            and sup.pool.ready_count() == 3
        )
    )
    assert sup.config.workers.count == 3
    assert all(h.generation == 1 for h in sup.pool.workers.values())
    assert restarts(driven, "reload") == 2
    assert driven.stop(signal.SIGTERM) == EXIT_OK


def test_sigttin_and_sigttou_grow_and_shrink_the_pool(
    supervise: Any,
) -> None:
    driven = supervise(workers={"count": 1})
    sup = driven.supervisor
    driven.until(lambda: sup.announced_ready)
    os.kill(os.getpid(), signal.SIGTTIN)
    driven.until(lambda: sup.pool.ready_count() == 2)
    assert [s.index for s in sup.pool.slots] == [0, 1]
    second = sup.pool.slots[1].worker_pid
    os.kill(os.getpid(), signal.SIGTTOU)
    driven.until(lambda: second not in sup.pool.workers)
    assert [s.index for s in sup.pool.slots] == [0]
    assert len(sup.pool.workers) == 1
    assert driven.stop(signal.SIGTERM) == EXIT_OK


# ---------------------------------------------------------------- ends, pure

KILLED = 9  # a wait status: killed by SIGKILL


def handle() -> WorkerHandle:
    return WorkerHandle(
        slot=0, pid=1, wake_fd=-1, report_fd=-1, generation=0, started=0.0
    )


def test_a_timeout_overtaking_a_reload_is_counted_as_the_reload() -> None:
    worker = handle()
    worker.retire("reload")
    worker.ends(WorkerEnd.TIMED_OUT, "timeout after 2 s", job=7, kill_at=5.0)
    end = worker.end
    assert end is not None and end.why is WorkerEnd.TIMED_OUT
    assert worker.forced
    assert end.retire_reason == "reload"  # so no second worker is rolled
    assert end.reason(KILLED) == "timeout after 2 s"
    assert end.takeback_outcome == "timeout"
    assert end.on_purpose
    assert end.restart_reason() == "reload"


def test_a_timeout_the_worker_recorded_itself_leaves_its_retirement() -> None:
    worker = handle()
    worker.retire("reload")
    worker.ends(WorkerEnd.TIMED_OUT, "timeout after 2 s", job=7, kill_at=5.0)
    worker.timeout_over()
    assert worker.end is not None
    assert (worker.end.why, worker.end.detail) == (WorkerEnd.RETIRED, "reload")
    assert not worker.forced
    bare = handle()
    bare.ends(WorkerEnd.TIMED_OUT, "timeout after 2 s", job=7, kill_at=5.0)
    bare.timeout_over()
    assert bare.end is None


def test_a_boot_failure_keeps_its_words_over_the_kill_at_the_stop() -> None:
    for first_the_kill in (True, False):
        worker = handle()
        if first_the_kill:
            worker.kill_on_stop("daemon stopped fast: job killed")
        worker.boot_failed("No module named 'x'")
        if not first_the_kill:
            assert not worker.forced
            worker.kill_on_stop("daemon stopped fast: job killed")
        end = worker.end
        assert end is not None and end.why is WorkerEnd.BOOT_FAILED
        assert worker.forced  # killed once, not at every pass
        assert (
            end.reason(KILLED) == "worker could not start: No module named 'x'"
        )


def test_a_boot_failure_without_words_is_told_by_its_exit_status() -> None:
    worker = handle()
    worker.boot_failed("")
    assert worker.end is None


def test_a_cancel_is_counted_as_such_even_on_a_retiring_worker() -> None:
    worker = handle()
    worker.retire("max_jobs")
    worker.ends(WorkerEnd.CANCELLED, "cancelled", job=3, killed=True)
    end = worker.end
    assert end is not None
    assert end.reason(KILLED) == "cancelled"
    assert end.takeback_outcome == "worker_died"
    assert end.restart_reason() == "cancelled"
    assert end.retire_reason == "max_jobs"


def test_a_kill_at_the_stop_is_no_end_on_purpose() -> None:
    worker = handle()
    worker.retire("max_memory")
    worker.kill_on_stop("drain budget exceeded: job killed after 10 s")
    end = worker.end
    assert end is not None and end.why is WorkerEnd.KILLED_ON_STOP
    assert end.reason(KILLED) == "drain budget exceeded: job killed after 10 s"
    assert not end.on_purpose  # a crash, unless it exited cleanly first
    assert end.restart_reason() == "max_memory"


def test_an_end_without_a_word_is_told_by_the_wait_status() -> None:
    assert Ending(WorkerEnd.DIED).reason(KILLED) == (
        "worker died: signal 9 (SIGKILL)"
    )
    assert Ending(WorkerEnd.EXITED).restart_reason() == "exited"
    retired = Ending(WorkerEnd.RETIRED, "max_jobs")
    assert retired.reason(0) == "worker died: exit code 0"
    assert retired.restart_reason() == "max_jobs"
    assert not retired.on_purpose
