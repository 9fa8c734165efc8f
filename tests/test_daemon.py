"""The daemon as a subprocess: draining, stopping, replacing workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from harness import (
    REPO_ROOT,
    daemon_config,
    job_counts,
    wait_until,
    write_config,
)
from pdoflowd.client import Client
from pdoflowd.status import PostingStatus


def job_row(dsn: str, where: str, *params: Any) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        row = cur.execute(
            f"SELECT * FROM pdoflowd.jobs WHERE {where}", params
        ).fetchone()
    assert row is not None
    return dict(row)


def effects(dsn: str, key: str) -> list[tuple[int, str]]:
    with psycopg.connect(dsn) as conn:
        return [
            (pid, note)
            for pid, note in conn.execute(
                "SELECT pid, note FROM effects WHERE key = %s ORDER BY id",
                (key,),
            ).fetchall()
        ]


def test_daemon_drains_a_posting_and_stops_cleanly_on_sigterm(
    effects_dsn: str, daemons: Any
) -> None:
    daemon = daemons()
    client = Client(effects_dsn)
    posting = client.post("jobfns.record", [[f"k{i}"] for i in range(200)])
    state = client.wait(posting.id, timeout=60, poll_interval=0.05)
    assert state.status is PostingStatus.FINISHED
    assert job_counts(effects_dsn) == {"done": 200}
    workers = daemon.workers()
    assert len(workers) == 2
    assert daemon.stop(signal.SIGTERM) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    with psycopg.connect(effects_dsn) as conn:
        row = conn.execute(
            "SELECT stopped_at IS NOT NULL FROM pdoflowd.daemons"
        ).fetchone()
    assert row == (True,)


def test_each_job_runs_once_without_failures(
    effects_dsn: str, daemons: Any
) -> None:
    daemons(workers={"count": 3})
    client = Client(effects_dsn)
    posting = client.post("jobfns.record", [[f"k{i}"] for i in range(300)])
    client.wait(posting.id, timeout=60, poll_interval=0.05)
    with psycopg.connect(effects_dsn) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT key) FROM effects"
        ).fetchone()
    assert row == (300, 300)


def test_sigterm_lets_the_running_job_finish_and_releases_the_rest(
    effects_dsn: str, daemons: Any
) -> None:
    daemon = daemons(workers={"count": 1, "batch_size": 5})
    client = Client(effects_dsn)
    # Teach the worker that jobs are quick, so it claims a batch of five.
    client.wait(
        client.post("jobfns.noop", [[]] * 5).id, timeout=30, poll_interval=0.05
    )
    posting = client.post("jobfns.sleep", [[0.6, f"s{i}"] for i in range(5)])
    wait_until(lambda: effects(effects_dsn, "s0"))
    assert daemon.stop(signal.SIGTERM) == 0
    assert effects(effects_dsn, "s0")[-1][1] == "end"
    first = job_row(effects_dsn, "posargs->>1 = 's0'")
    assert first["status"] == "done"
    state = client.status(posting.id)
    assert state.jobs["done"] + state.jobs["waiting"] == 5
    released = job_row(effects_dsn, "posargs->>1 = 's4'")
    assert released["status"] == "waiting"
    assert released["tries_remaining"] == 3
    assert released["owner"] is None
    assert effects(effects_dsn, "s4") == []


def test_drain_budget_exceeded_kills_and_requeues_the_job(
    effects_dsn: str, daemons: Any
) -> None:
    daemon = daemons(workers={"count": 1, "drain_timeout_s": 0.5})
    Client(effects_dsn).post("jobfns.sleep", [[60, "long"]])
    wait_until(lambda: effects(effects_dsn, "long"))
    began = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    assert time.monotonic() - began < 10
    row = job_row(effects_dsn, "true")
    assert row["status"] == "waiting"
    assert row["tries_remaining"] == 2
    assert "drain budget exceeded" in row["error"]


def test_worker_killed_by_its_job_is_replaced_and_the_job_rerun(
    effects_dsn: str, daemons: Any
) -> None:
    daemon = daemons(workers={"count": 2})
    before = set(daemon.workers())
    client = Client(effects_dsn)
    posting = client.post("jobfns.kill_self_once", [["victim"]])
    state = client.wait(posting.id, timeout=30, poll_interval=0.05)
    assert state.status is PostingStatus.FINISHED
    row = job_row(effects_dsn, "true")
    assert row["status"] == "done"
    assert row["attempt"] == 2
    assert row["tries_remaining"] == 2
    assert row["error"] is None
    runs = effects(effects_dsn, "victim")
    assert len(runs) == 2
    assert runs[0][0] != runs[1][0]
    wait_until(lambda: len(daemon.workers()) == 2)
    assert set(daemon.workers()) != before
    assert "worker died: signal 9 (SIGKILL)" in daemon.log()


def test_sigkill_of_a_busy_worker_requeues_its_job_with_the_reason(
    effects_dsn: str, daemons: Any
) -> None:
    daemon = daemons(workers={"count": 1})
    Client(effects_dsn).post("jobfns.sleep", [[60, "busy"]], tries=1)
    pid = wait_until(lambda: effects(effects_dsn, "busy"))[0][0]
    os.kill(pid, signal.SIGKILL)
    row = wait_until(
        lambda: (
            (r := job_row(effects_dsn, "true"))["status"] == "errored_out" and r
        )
    )
    assert row["error"] == "worker died: signal 9 (SIGKILL)"
    assert row["tries_remaining"] == 0
    new = wait_until(lambda: daemon.workers())
    assert new != [pid]


def test_failing_job_errors_out_with_its_traceback_after_its_tries(
    effects_dsn: str, daemons: Any
) -> None:
    daemons()
    client = Client(effects_dsn)
    posting = client.post("jobfns.record_then_fail", [["f"]], tries=3)
    state = client.wait(posting.id, timeout=30, poll_interval=0.05)
    assert state.jobs["errored_out"] == 1
    row = job_row(effects_dsn, "true")
    assert row["status"] == "errored_out"
    assert row["error"] == "ValueError: failing f"
    assert "Traceback" in row["traceback"]
    assert "record_then_fail" in row["traceback"]
    assert len(effects(effects_dsn, "f")) == 3


def test_posting_errors_out_when_its_threshold_is_reached(
    effects_dsn: str, daemons: Any
) -> None:
    daemons(jobs={"posting_error_threshold": 3})
    client = Client(effects_dsn)
    posting = client.post("jobfns.fail", [["x"]] * 40, tries=1)
    state = client.wait(posting.id, timeout=30, poll_interval=0.05)
    assert state.status is PostingStatus.ERRORED_OUT
    assert state.jobs["errored_out"] >= 3
    # The remaining jobs are not started.
    time.sleep(0.5)
    assert client.status(posting.id).jobs["waiting"] > 0


def test_entry_point_outside_allowed_modules_is_refused_unimported(
    effects_dsn: str, daemons: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "sneaky.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef run(): pass\n"
    )
    daemons()
    client = Client(effects_dsn)
    posting = client.post("sneaky.run", [[]])
    state = client.wait(posting.id, timeout=30, poll_interval=0.05)
    assert state.jobs["errored_out"] == 1
    row = job_row(effects_dsn, "true")
    assert row["error"].startswith("refused:")
    assert row["attempt"] == 1
    assert not marker.exists()


def run_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pdoflowd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )


def test_run_with_a_bad_config_exits_78_before_starting(
    tmp_path: Path,
) -> None:
    path = write_config(
        tmp_path / "bad.toml",
        {"workers": {"count": 0, "colour": "blue"}},
    )
    result = run_command("run", "--config", str(path))
    assert result.returncode == 78
    assert "workers.count" in result.stderr
    assert "workers.colour" in result.stderr


def test_check_config_reports_problems_and_exits_78(tmp_path: Path) -> None:
    path = write_config(tmp_path / "bad.toml", {"jobs": {"timeout_s": -1}})
    result = run_command("check-config", "--config", str(path))
    assert result.returncode == 78
    assert result.stderr.startswith("jobs.timeout_s: ")


def test_check_config_accepts_a_valid_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "ok.toml", daemon_config("dbname=x"))
    result = run_command("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr


def test_run_refuses_a_schema_behind_the_code(
    tmp_path: Path, empty_dsn: str
) -> None:
    path = write_config(tmp_path / "d.toml", daemon_config(empty_dsn))
    result = run_command("run", "--config", str(path))
    assert result.returncode == 4
    assert "pdoflowd migrate" in result.stderr


def test_migrate_command_brings_the_schema_up(
    tmp_path: Path, empty_dsn: str
) -> None:
    path = write_config(tmp_path / "d.toml", daemon_config(empty_dsn))
    assert run_command("migrate", "--config", str(path)).returncode == 0
    again = run_command("migrate", "--config", str(path))
    assert again.returncode == 0
    assert "already current" in again.stderr


def test_a_posting_announced_while_the_session_runs_a_chore_is_picked_up(
    effects_dsn: str, daemons: Any
) -> None:
    # The database session LISTENs on the connection its chores use. A
    # notification that arrives while a chore's statement runs (here its
    # heartbeat, held on a row lock a little while) is read off the socket
    # by that statement, and the socket never says so: it must still wake
    # the workers, which would otherwise find the work only at their next
    # poll, far off here.
    daemon = daemons(
        workers={"count": 1, "poll_interval_s": 60.0},
        daemon={"heartbeat_interval_s": 0.3, "host_lease_s": 30.0},
    )
    client = Client(effects_dsn)
    client.wait(client.post("jobfns.noop", [[1]]).id, timeout=30)
    with (
        psycopg.connect(effects_dsn) as holder,
        psycopg.connect(effects_dsn, autocommit=True) as watch,
    ):
        holder.execute(
            "SELECT FROM pdoflowd.daemons WHERE pid = %s FOR UPDATE",
            (daemon.pid,),
        )
        wait_until(
            lambda: (
                watch.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%%pdoflowd.daemons%%'"
                ).fetchone()
                == (1,)
            )
        )
        posted = time.monotonic()
        posting = client.post("jobfns.noop", [[2]])
        time.sleep(0.3)
        holder.rollback()
    client.wait(posting.id, timeout=30, poll_interval=0.05)
    assert time.monotonic() - posted < 10, "woken, not found by a poll"
