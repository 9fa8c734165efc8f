"""One job: reading it whole, cancelling and retrying it, through the
client and ``pdoflow``, checked by the database for its poster."""

from __future__ import annotations

import json
import math
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from harness import (
    SUBMITTER_GRANTS_AT_6,
    Daemon,
    Roles,
    create_effects_table,
    daemon_config,
    migrate_before,
    run_pdoflow,
)
from pdoflowd.client import (
    Client,
    PostingError,
    PostingStateError,
)
from pdoflowd.db import migrate, singlejob
from pdoflowd.status import JobStatus, PostingStatus

NOOP = "jobfns.noop"


def _end_posting(dsn: str, posting_id: uuid.UUID, status: str) -> None:
    """Settles a posting as a daemon would (no daemon runs here)."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE pdoflowd.postings SET status = %s, finished_at = now()"
            " WHERE uuid = %s",
            (status, posting_id),
        )


def _fail_job(dsn: str, job_id: uuid.UUID) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE pdoflowd.jobs SET status = 'errored_out', error = 'boom',"
            " tries_remaining = 0, attempt = 3, completed_at = now()"
            " WHERE uuid = %s",
            (job_id,),
        )


def pdoflow(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_pdoflow(dsn, *args)


# ------------------------------------------------------------ reading


def test_a_job_is_read_whole_with_its_arguments_decoded(dsn: str) -> None:
    client = Client(dsn)
    posting = client.post(
        NOOP, [[1.5, math.inf]], [{"mode": "fast"}], priority=7, tries=4
    )
    info = client.job(posting.job_ids[0])
    assert info.id == posting.job_ids[0]
    assert info.posting_id == posting.id
    assert (info.status, info.posting_status) == (
        JobStatus.WAITING,
        PostingStatus.EXECUTING,
    )
    assert (info.priority, info.attempt, info.tries_remaining) == (7, 0, 4)
    assert info.args == [1.5, math.inf]
    assert info.kwargs == {"mode": "fast"}
    assert info.entry_point == NOOP
    assert (info.claimed_at, info.started_at, info.completed_at) == (
        None,
        None,
        None,
    )
    assert (info.daemon_host, info.daemon_pid) == (None, None)
    assert not info.result_stored


def test_an_unknown_job_is_a_key_error(dsn: str) -> None:
    client = Client(dsn)
    with pytest.raises(KeyError, match="no job"):
        client.job(uuid.uuid4())
    with pytest.raises(KeyError, match="not a job id"):
        client.job("nope")
    with pytest.raises(KeyError, match="no job"):
        client.cancel_job(uuid.uuid4())


def test_pdoflow_job_json_has_every_key(dsn: str) -> None:
    posting = Client(dsn).post(NOOP, [[1, "a"]])
    done = pdoflow(dsn, "job", str(posting.job_ids[0]), "--json")
    assert done.returncode == 0, done.stderr
    shape = json.loads(done.stdout)
    assert shape["id"] == str(posting.job_ids[0])
    assert shape["status"] == "waiting"
    assert shape["args"] == [1, "a"]
    assert set(shape) >= {
        "posting_id",
        "attempt",
        "error",
        "traceback",
        "result",
        "created_at",
        "claimed_at",
        "started_at",
        "completed_at",
        "daemon_host",
        "daemon_pid",
    }
    plain = pdoflow(dsn, "job", str(posting.job_ids[0]))
    assert plain.returncode == 0
    assert f"job:         {posting.job_ids[0]}" in plain.stdout
    assert "status:      waiting" in plain.stdout


def test_pdoflow_job_of_an_unknown_job_is_a_usage_error(dsn: str) -> None:
    done = pdoflow(dsn, "job", str(uuid.uuid4()))
    assert done.returncode == 64
    assert "no job" in done.stderr


# ------------------------------------------------------------ controls


def test_cancelling_a_waiting_job_ends_it_alone(dsn: str) -> None:
    client = Client(dsn)
    posting = client.post(NOOP, [[1], [2]])
    first, second = posting.job_ids
    result = client.cancel_job(first)
    assert (result.status, result.posting_status) == (
        JobStatus.ERRORED_OUT,
        PostingStatus.EXECUTING,
    )
    info = client.job(first)
    assert (info.status, info.error) == (JobStatus.ERRORED_OUT, "cancelled")
    assert client.job(second).status is JobStatus.WAITING
    with pytest.raises(PostingStateError, match="ended already"):
        client.cancel_job(first)


def test_a_cancelled_job_is_retried_with_fresh_tries(dsn: str) -> None:
    client = Client(dsn)
    posting = client.post(NOOP, [[1]], tries=5)
    (job_id,) = posting.job_ids
    client.cancel_job(job_id)
    _end_posting(dsn, posting.id, "finished")
    result = client.retry_job(job_id, tries=2)
    assert (result.status, result.posting_status) == (
        JobStatus.WAITING,
        PostingStatus.EXECUTING,
    )
    info = client.job(job_id)
    assert (info.tries_remaining, info.completed_at) == (2, None)


def test_a_retried_job_takes_its_postings_tries_and_stays_paused(
    dsn: str,
) -> None:
    client = Client(dsn)
    posting = client.post(NOOP, [[1]], tries=4, paused=True)
    (job_id,) = posting.job_ids
    _fail_job(dsn, job_id)
    result = client.retry_job(job_id)
    assert result.posting_status is PostingStatus.PAUSED
    assert client.job(job_id).tries_remaining == 4


def test_only_an_errored_out_job_of_a_live_posting_is_retried(
    dsn: str,
) -> None:
    client = Client(dsn)
    posting = client.post(NOOP, [[1], [2]])
    waiting, other = posting.job_ids
    with pytest.raises(PostingStateError, match="only an errored-out job"):
        client.retry_job(waiting)
    client.cancel(posting.id)
    with pytest.raises(PostingStateError, match="retry the posting"):
        client.retry_job(other)
    with pytest.raises(PostingError, match="tries"):
        client.retry_job(other, tries=0)


def test_pdoflow_cancel_job_and_retry_job(dsn: str) -> None:
    posting = Client(dsn).post(NOOP, [[1]])
    job_id = str(posting.job_ids[0])
    cancelled = pdoflow(dsn, "cancel-job", job_id, "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout) == {
        "id": job_id,
        "status": "errored_out",
        "posting_status": "executing",
    }
    again = pdoflow(dsn, "cancel-job", job_id)
    assert again.returncode == 64
    assert "ended already" in again.stderr
    retried = pdoflow(dsn, "retry-job", job_id, "--tries", "2")
    assert retried.returncode == 0, retried.stderr
    assert (
        retried.stdout.strip() == f"job {job_id}: waiting (posting executing)"
    )


# ------------------------------------------------------------ posters


def test_a_poster_reads_and_controls_only_its_own_jobs(
    submitters: tuple[str, str],
) -> None:
    alice, bob = (Client(d) for d in submitters)
    posting = alice.post(NOOP, [[1]])
    (job_id,) = posting.job_ids
    for action in (bob.job, bob.cancel_job, bob.retry_job):
        with pytest.raises(KeyError, match="no job"):
            action(job_id)
    assert alice.job(job_id).status is JobStatus.WAITING
    assert alice.cancel_job(job_id).status is JobStatus.ERRORED_OUT
    assert alice.retry_job(job_id).status is JobStatus.WAITING


# What `pdoflowd migrate --grant-submitter` granted at schema versions 7 and
# 8 (the keys; before the job controls).
SUBMITTER_GRANTS_AT_7 = tuple(
    template.replace(
        " requires, store_result, tries) ON pdoflowd.postings",
        " requires, store_result, tries, idempotency_key, key_scope)"
        " ON pdoflowd.postings",
    )
    for template in SUBMITTER_GRANTS_AT_6
)


def test_a_submitter_granted_before_job_controls_may_use_them(
    empty_dsn: str, empty_roles: Roles
) -> None:
    """A role granted a submitter's privileges before the job controls
    existed controls its jobs after the upgrade, without a new grant."""
    role, daemon_role = empty_roles.make(), empty_roles.make()
    with psycopg.connect(empty_dsn) as conn:
        migrate_before(conn, "control_job")
        for template in SUBMITTER_GRANTS_AT_7:
            conn.execute(sql.SQL(template).format(role=sql.Identifier(role)))
        for template in migrate.DAEMON_GRANTS:
            # What the daemon is granted on objects of later versions.
            later = (
                "control_job",
                "job_output",
                "schedule",
                "posting_dependencies",
            )
            if not any(name in template for name in later):
                # Nor the concurrency caps' columns.
                template = template.replace(", max_running, uses)", ")")
                conn.execute(
                    sql.SQL(template).format(role=sql.Identifier(daemon_role))
                )
    migrate.upgrade(empty_dsn)
    with psycopg.connect(empty_dsn) as conn:
        row = conn.execute(
            "SELECT has_function_privilege(%s,"
            " 'pdoflowd.control_job(uuid, text, integer)', 'EXECUTE')",
            (daemon_role,),
        ).fetchone()
    assert row == (True,)
    client = Client(empty_roles.dsn_of(role))
    posting = client.post(NOOP, [[1]])
    (job_id,) = posting.job_ids
    assert client.cancel_job(job_id).status is JobStatus.ERRORED_OUT
    assert client.job(job_id).daemon_host is None


# ------------------------------------------------------------ output


def _store(dsn: str, job_id: uuid.UUID, attempt: int, text: str) -> None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT id FROM pdoflowd.jobs WHERE uuid = %s", (job_id,)
        ).fetchone()
        assert row is not None
        conn.execute(
            "UPDATE pdoflowd.jobs SET attempt = %s WHERE id = %s",
            (attempt, row[0]),
        )
        singlejob.store_output(
            conn,
            job_id=row[0],
            attempt=attempt,
            output=text,
            total=len(text.encode()) + 10,
        )


def test_pdoflow_logs_prints_an_attempts_output(dsn: str) -> None:
    posting = Client(dsn).post(NOOP, [[1]])
    job_id = str(posting.job_ids[0])
    _store(dsn, posting.job_ids[0], 2, "second\n")
    done = pdoflow(dsn, "logs", job_id)
    assert (done.returncode, done.stdout) == (0, "second\n")
    assert "the last 7 of 17 bytes" in done.stderr
    first = pdoflow(dsn, "logs", job_id, "--attempt", "1", "--json")
    assert json.loads(first.stdout) == {
        "id": job_id,
        "attempt": 1,
        "output": None,
        "total_bytes": 0,
        "truncated": False,
    }
    beyond = pdoflow(dsn, "logs", job_id, "--attempt", "3")
    assert beyond.returncode == 64
    assert "no attempt 3" in beyond.stderr


def test_a_poster_reads_only_its_own_jobs_output(
    dsn: str, submitters: tuple[str, str]
) -> None:
    alice, bob = (Client(d) for d in submitters)
    posting = alice.post(NOOP, [[1]])
    (job_id,) = posting.job_ids
    _store(dsn, job_id, 1, "alice's\n")
    assert [o.output for o in alice.job_output(job_id)] == ["alice's\n"]
    with pytest.raises(KeyError, match="no job"):
        bob.job_output(job_id)
    with psycopg.connect(submitters[1]) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pdoflowd.job_output"
        ).fetchone()
    assert row == (0,)


def test_with_output_tail_bytes_0_output_is_not_captured(
    dsn: str, tmp_path: Path
) -> None:
    create_effects_table(dsn)
    config = daemon_config(
        dsn,
        workers={"count": 1},
        jobs={
            "allowed_modules": ["jobfns", "featurejobs"],
            "output_tail_bytes": 0,
        },
    )
    daemon = Daemon(tmp_path, config, effects_dsn=dsn)
    try:
        daemon.start().wait_ready()
        client = Client(dsn)
        posting = client.post("featurejobs.print_lines", [[2]])
        client.wait(posting.id, timeout=30, poll_interval=0.05)
        assert client.job_output(posting.job_ids[0]) == []
        log = daemon.log()
        assert "line 0000000 " in log
        assert "[job " not in log
        assert daemon.stop() == 0
    finally:
        daemon.close()
