"""Faults around a job that a worker must survive: a job timed out inside
its own statement, a supervisor that stops reading its workers' reports,
and a job run by hand (``pdoflow execute-job``) past its timeout.

Everything is real: the daemon and ``pdoflow`` run as subprocesses, the
timeouts are signals, the supervisor is stopped with SIGSTOP.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from harness import Daemon, wait_until
from pdoflowd import current_job, queries
from pdoflowd.client import Client
from pdoflowd.config import Config, DatabaseConfig, JobsConfig
from pdoflowd.jobcontext import JobCall
from pdoflowd.status import JobStatus

FEATURES = {"allowed_modules": ["jobfns", "featurejobs"]}


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
        first, second = queries.claim(
            conn, owner=owner, daemon_id=uuid.uuid4(), limit=2
        )

    def call(job: queries.ClaimedJob) -> JobCall:
        return JobCall(job, owner=owner, config=config, password=None, draw=0)

    call(first).run(left_in_a_transaction)
    later = call(second)
    later.run(transaction_state)
    assert later.result_json == '"IDLE"'
