"""Supervision: timeouts, recycling, signals, lost hosts, outages.

Each test drives the real daemon as a subprocess against a real PostgreSQL,
with intervals and leases shrunk through config.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from harness import (
    daemon_config,
    wait_until,
    write_config,
)
from pdoflowd.client import Client
from pdoflowd.db import queue
from pdoflowd.status import PostingStatus


def the_job(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        rows = cur.execute("SELECT * FROM pdoflowd.jobs").fetchall()
    assert len(rows) == 1
    return dict(rows[0])


def all_jobs(dsn: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        return cur.execute("SELECT * FROM pdoflowd.jobs").fetchall()


def runs(dsn: str, key: str, note: str | None = None) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT pid FROM effects WHERE key = %s"
                " AND (%s::text IS NULL OR note = %s) ORDER BY id",
                (key, note, note),
            ).fetchall()
        ]


def ended(dsn: str, status: str) -> Any:
    return lambda: (row := the_job(dsn))["status"] == status and row


# ---------------------------------------------------------------- timeouts


def test_timeout_in_python_code_is_recorded_and_the_worker_carries_on(
    effects_dsn: str, daemons: Any
) -> None:
    daemon = daemons(workers={"count": 1})
    before = daemon.workers()
    Client(effects_dsn).post("jobfns.spin", [[30]], tries=1, timeout_s=0.5)
    row = wait_until(ended(effects_dsn, "errored_out"))
    assert row["error"] == "timeout after 0.5 s"
    assert daemon.workers() == before
    assert "worker died" not in daemon.log()


def test_timeout_in_code_deaf_to_sigterm_kills_the_worker_after_grace(
    effects_dsn: str, daemons: Any
) -> None:
    daemon = daemons(
        workers={"count": 1}, jobs={"timeout_s": 0.5, "timeout_grace_s": 0.5}
    )
    before = daemon.workers()
    Client(effects_dsn).post("jobfns.stubborn", [[30]], tries=1)
    row = wait_until(ended(effects_dsn, "errored_out"))
    assert row["error"] == "timeout after 0.5 s"
    after = wait_until(daemon.workers)
    assert after != before


def test_timeout_uses_a_try_and_the_job_runs_again(
    effects_dsn: str, daemons: Any
) -> None:
    daemons(workers={"count": 1})
    Client(effects_dsn).post("jobfns.spin", [[30]], tries=2, timeout_s=0.3)
    row = wait_until(ended(effects_dsn, "errored_out"))
    assert row["attempt"] == 2
    assert row["tries_remaining"] == 0


# ---------------------------------------------------------------- recycling


def test_max_jobs_per_worker_retires_workers_without_counting_a_crash(
    effects_dsn: str, daemons: Any
) -> None:
    daemon = daemons(workers={"count": 1, "max_jobs_per_worker": 5})
    client = Client(effects_dsn)
    posting = client.post("jobfns.record", [[f"r{i}"] for i in range(20)])
    assert client.wait(posting.id, 30, poll_interval=0.05).status is (
        PostingStatus.FINISHED
    )
    with psycopg.connect(effects_dsn) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT key), count(DISTINCT pid)"
            " FROM effects"
        ).fetchone()
    assert row is not None
    assert row[:2] == (20, 20)
    assert row[2] >= 4
    assert "worker died" not in daemon.log()
    assert "retire (max_jobs)" in daemon.log()


def test_max_memory_retires_a_worker_after_its_job(
    effects_dsn: str, daemons: Any
) -> None:
    daemon = daemons(workers={"count": 1, "max_memory_mb": 120})
    client = Client(effects_dsn)
    client.wait(
        client.post("jobfns.hog_memory", [[200, "hog"]]).id,
        30,
        poll_interval=0.05,
    )
    client.wait(
        client.post("jobfns.record", [["after"]]).id, 30, poll_interval=0.05
    )
    assert runs(effects_dsn, "hog") != runs(effects_dsn, "after")
    assert "retire (max_memory)" in daemon.log()
    assert "worker died" not in daemon.log()


# ---------------------------------------------------------------- crashes


def test_workers_that_cannot_boot_end_in_a_crash_loop_exit(
    daemons: Any,
) -> None:
    daemon = daemons(
        ready=False,
        workers={"preload_modules": ["jobfns_missing_module"]},
        daemon={
            "crash_loop_max": 4,
            "crash_loop_window_s": 60.0,
            "respawn_delay_s": 0.05,
        },
    )
    assert daemon.wait(60) == 1
    log = daemon.log()
    assert "worker could not start" in log
    assert "jobfns_missing_module" in log
    assert "crash loop" in log
    assert "READY=1" not in "".join(daemon.messages)


def test_crashed_slot_is_refilled_with_growing_backoff(
    effects_dsn: str, daemons: Any
) -> None:
    daemon = daemons(
        workers={"count": 1},
        daemon={"respawn_delay_s": 0.4, "crash_loop_max": 100},
    )
    client = Client(effects_dsn)
    crashes = client.post("jobfns.exit_hard", [[9]] * 3, tries=1)
    wait_until(lambda: client.status(crashes.id).finished)
    after = client.post("jobfns.noop", [[]])
    client.wait(after.id, 30, poll_interval=0.05)
    with psycopg.connect(effects_dsn) as conn:
        deaths = [
            r[0]
            for r in conn.execute(
                "SELECT completed_at FROM pdoflowd.jobs j"
                " JOIN pdoflowd.postings p ON p.id = j.posting_id"
                " WHERE p.uuid = %s ORDER BY completed_at",
                (crashes.id,),
            ).fetchall()
        ]
        row = conn.execute(
            "SELECT work_started_at FROM pdoflowd.jobs j"
            " JOIN pdoflowd.postings p ON p.id = j.posting_id"
            " WHERE p.uuid = %s",
            (after.id,),
        ).fetchone()
    assert row is not None
    gaps = [
        (b - a).total_seconds()
        for a, b in zip(deaths, [*deaths[1:], row[0]], strict=True)
    ]
    # Refilled at once after the first crash, then after >= 0.2 s (half of
    # 0.4 s, the least jitter allows), then after >= 0.4 s.
    assert gaps[1] >= 0.2
    assert gaps[2] >= 0.4
    assert daemon.log().count("(slot 0): worker died: exit code 9") == 3


# ---------------------------------------------------------------- signals


def test_sigint_stops_fast_and_requeues_the_running_job(
    effects_dsn: str, daemons: Any
) -> None:
    daemon = daemons(workers={"count": 1})
    Client(effects_dsn).post("jobfns.sleep", [[60, "slow"]])
    wait_until(lambda: runs(effects_dsn, "slow"))
    began = time.monotonic()
    assert daemon.stop(signal.SIGINT) == 0
    assert time.monotonic() - began < 5
    row = the_job(effects_dsn)
    assert row["status"] == "waiting"
    assert row["error"] == "daemon stopped fast: job killed"
    assert row["tries_remaining"] == 2


def test_sighup_applies_a_new_worker_count_and_rolls_every_worker(
    effects_dsn: str, daemons: Any
) -> None:
    daemon = daemons(workers={"count": 2})
    before = set(daemon.workers())
    write_config(
        daemon.config_path, daemon_config(effects_dsn, workers={"count": 3})
    )
    daemon.send(signal.SIGHUP)
    daemon.wait_for_message("RELOADING=1")
    wait_until(
        lambda: (
            len(set(daemon.workers())) == 3
            and not (set(daemon.workers()) & before)
        ),
        timeout=30,
    )


def test_reload_under_load_loses_nothing_and_runs_nothing_twice(
    effects_dsn: str, daemons: Any
) -> None:
    daemon = daemons(workers={"count": 2, "outcome_flush_ms": 0})
    client = Client(effects_dsn)
    posting = client.post("jobfns.sleep", [[0.01, f"k{i}"] for i in range(150)])
    for _ in range(3):
        time.sleep(0.3)
        daemon.send(signal.SIGHUP)
    state = client.wait(posting.id, 60, poll_interval=0.05)
    assert state.jobs["done"] == 150
    with psycopg.connect(effects_dsn) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT key) FROM effects"
            " WHERE note = 'end'"
        ).fetchone()
    assert row == (150, 150)


def test_invalid_config_on_sighup_is_refused_and_the_old_one_kept(
    effects_dsn: str, daemons: Any
) -> None:
    daemon = daemons(workers={"count": 2})
    before = daemon.workers()
    daemon.config_path.write_text("[workers]\ncount = 0\n")
    daemon.send(signal.SIGHUP)
    message = daemon.wait_for_message("RELOADING=1")
    refused = daemon.wait_for_text("reload refused")
    assert "workers.count" in refused
    assert "READY=1" in refused.split("\n")
    assert message
    assert daemon.workers() == before
    client = Client(effects_dsn)
    posting = client.post("jobfns.noop", [[]])
    assert client.wait(posting.id, 30).status is PostingStatus.FINISHED


def test_sigttin_and_sigttou_add_and_remove_a_worker(
    daemons: Any,
) -> None:
    daemon = daemons(workers={"count": 2})
    daemon.send(signal.SIGTTIN)
    wait_until(lambda: len(daemon.workers()) == 3)
    # Signals of one kind sent at once may merge: one at a time.
    daemon.send(signal.SIGTTOU)
    wait_until(lambda: len(daemon.workers()) == 2)
    daemon.send(signal.SIGTTOU)
    wait_until(lambda: len(daemon.workers()) == 1)


def test_workers_exit_after_their_job_when_the_supervisor_dies(
    effects_dsn: str, daemons: Any
) -> None:
    daemon = daemons(workers={"count": 1})
    Client(effects_dsn).post("jobfns.sleep", [[1.0, "orphan"]])
    [pid] = wait_until(lambda: runs(effects_dsn, "orphan", "start"))
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait(10)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=10)
    row = the_job(effects_dsn)
    assert row["status"] == "done"


# ---------------------------------------------------------------- hosts


def host_config(lease: float) -> dict[str, Any]:
    return {
        "workers": {"count": 1},
        "daemon": {
            "heartbeat_interval_s": 0.2,
            "host_lease_s": lease,
            "maintenance_interval_s": 0.1,
        },
    }


def test_a_claim_that_commits_after_its_worker_was_reaped_is_taken_back(
    effects_dsn: str, daemons: Any
) -> None:
    # A worker killed while its claim was in flight: the claim commits
    # after the supervisor took back the worker's jobs, under an owner that
    # no live worker has. Made here by claiming in the daemon's name.
    daemon = daemons(**host_config(5.0))
    Client(effects_dsn).post(
        "jobfns.noop", [[1], [2]], requires=["elsewhere"], tries=3
    )
    with psycopg.connect(effects_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT id FROM pdoflowd.daemons WHERE pid = %s", (daemon.pid,)
        ).fetchone()
        assert row is not None
        claimed = queue.claim(
            conn,
            owner=uuid.uuid4(),
            daemon_id=row[0],
            limit=2,
            provides=["elsewhere"],
        )
    assert len(claimed) == 2
    wait_until(
        lambda: (
            {
                (r["status"], r["owner"], r["tries_remaining"])
                for r in all_jobs(effects_dsn)
            }
            == {("waiting", None, 3)}
        )
    )
    assert "took back 2 job(s) without a live owner (0 of lost hosts)" in (
        daemon.log()
    )


@pytest.mark.slow
def test_jobs_of_a_dead_host_are_rescued_by_another_daemon(
    effects_dsn: str, daemons: Any
) -> None:
    first = daemons(**host_config(1.5))
    # Long enough to be still running once the second daemon is ready.
    Client(effects_dsn).post("jobfns.sleep", [[5.0, "h"]])
    wait_until(lambda: runs(effects_dsn, "h", "start"))
    second = daemons(**host_config(1.5))
    assert len(runs(effects_dsn, "h", "end")) == 0, "it ended too soon"
    first.kill_host()
    row = wait_until(ended(effects_dsn, "done"), timeout=30)
    assert row["attempt"] == 2
    assert row["tries_remaining"] == 2
    starts = runs(effects_dsn, "h", "start")
    assert len(starts) == 2
    assert starts[1] in second.workers()


def test_a_long_job_of_a_live_owner_is_never_rescued(
    effects_dsn: str, daemons: Any
) -> None:
    daemons(**host_config(0.8))
    daemons(**host_config(0.8))
    Client(effects_dsn).post("jobfns.sleep", [[3.0, "long"]])
    row = wait_until(ended(effects_dsn, "done"), timeout=30)
    assert row["attempt"] == 1
    assert len(runs(effects_dsn, "long", "start")) == 1


def test_a_cut_off_daemon_cannot_overwrite_the_rescued_job(
    effects_dsn: str, daemons: Any
) -> None:
    cut_off = daemons(**host_config(0.8))
    Client(effects_dsn).post("jobfns.sleep", [[2.5, "p"]], tries=3)
    [first_pid] = wait_until(lambda: runs(effects_dsn, "p", "start"))
    rescuer = daemons(**host_config(0.8))
    # Its supervisor stops heartbeating; its worker runs on, unaware.
    os.kill(cut_off.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: len(runs(effects_dsn, "p", "start")) == 2, 30)
    finally:
        os.kill(cut_off.pid, signal.SIGCONT)
    # The cut-off worker finishes its run first; its outcome is fenced off.
    wait_until(lambda: "fenced off" in cut_off.log(), timeout=30)
    assert the_job(effects_dsn)["status"] == "executing"
    row = wait_until(ended(effects_dsn, "done"), timeout=30)
    assert row["attempt"] == 2
    second_pid = runs(effects_dsn, "p", "start")[1]
    assert second_pid in rescuer.workers()
    assert first_pid != second_pid
    wait_until(lambda: "declared lost" in cut_off.log(), timeout=10)


# ---------------------------------------------------------------- outages


def test_a_database_restart_is_ridden_out_without_losing_outcomes(
    effects_dsn: str, daemons: Any, pg_server: Any
) -> None:
    if not pg_server.can_restart:
        pytest.skip("this PostgreSQL cannot be restarted from the tests")
    daemon = daemons(workers={"count": 2})
    before = daemon.workers()
    client = Client(effects_dsn)
    # Tries to spare: a job whose own connection the restart cuts fails.
    posting = client.post(
        "jobfns.sleep", [[0.05, f"o{i}"] for i in range(60)], tries=5
    )
    wait_until(lambda: runs(effects_dsn, "o5", "end"))
    pg_server.restart()
    state = client.wait(posting.id, 60, poll_interval=0.1)
    assert state.jobs["done"] == 60
    assert daemon.workers() == before
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert "database connection restored" in daemon.log()


@pytest.mark.parametrize("killed", ["worker", "connection"])
def test_a_claim_cut_off_while_it_writes_the_last_outcomes(
    effects_dsn: str, daemons: Any, killed: str
) -> None:
    # The statement that writes a batch's outcomes also claims the next
    # batch. Here it waits on a row lock a submitter holds on the job just
    # run, and is cut off there: its worker killed (the supervisor must take
    # back the job still held under the last claim's token at once, the
    # host's lease being far off), or its connection (the worker writes the
    # outcome again, under that token, and claims anew). Either way each
    # job ends done, runs at most twice, and uses no try.
    config = host_config(60.0)
    config["workers"]["batch_size"] = 1
    daemon = daemons(**config)
    client = Client(effects_dsn)
    client.post("jobfns.sleep", [[0.5, "held"], [0.0, "next"]], tries=3)
    wait_until(lambda: runs(effects_dsn, "held", "start"))
    [worker] = daemon.workers()
    with (
        psycopg.connect(effects_dsn) as holder,
        psycopg.connect(effects_dsn, autocommit=True) as watch,
    ):
        holder.execute(
            "SELECT FROM pdoflowd.jobs WHERE posargs->>1 = 'held'"
            " FOR NO KEY UPDATE"
        )

        def waiting() -> Any:
            return watch.execute(
                "SELECT pid FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%%claim_jobs%%'"
            ).fetchall()

        [(backend,)] = wait_until(waiting)
        if killed == "worker":
            os.kill(worker, signal.SIGKILL)
            wait_until(lambda: worker not in daemon.workers())
        watch.execute("SELECT pg_terminate_backend(%s)", (backend,))
        holder.rollback()
    began = time.monotonic()
    wait_until(
        lambda: {r["status"] for r in all_jobs(effects_dsn)} == {"done"},
        timeout=20,
    )
    assert time.monotonic() - began < 20, "taken back at once, not by lease"
    for row in all_jobs(effects_dsn):
        assert row["tries_remaining"] == 3, row
    held_runs = len(runs(effects_dsn, "held", "end"))
    assert held_runs == (2 if killed == "worker" else 1)
    assert len(runs(effects_dsn, "next", "end")) == 1
    # Taken back as the dead worker's, not left to the sweep of jobs
    # without a live owner.
    assert "without a live owner" not in daemon.log()
