"""How a claim ends, against a real PostgreSQL: the one retry rule, retry
times on the database's clock, and outcomes the database refuses."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from harness import Daemon, daemon_config, wait_until
from pdoflowd.client import Client
from pdoflowd.db import migrate, queue, upkeep
from pdoflowd.status import JobStatus, OutcomeKind

DAEMON = uuid.uuid4()


@pytest.fixture
def conn(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


def claim(conn: Any, limit: int, owner: uuid.UUID) -> list[Any]:
    return queue.claim(conn, owner=owner, daemon_id=DAEMON, limit=limit)


def job_rows(conn: Any) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute("SELECT * FROM pdoflowd.jobs ORDER BY id").fetchall()


def db_now(conn: Any) -> dt.datetime:
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("kind", "tries", "posting", "expected"),
    [
        ("done", 1, "executing", ("done", 1, "e")),
        ("done", 2, "cancelled", ("done", 2, "e")),
        ("released", 2, "executing", ("waiting", 2, "e")),
        ("released", 2, "paused", ("waiting", 2, "e")),
        ("released", 2, "cancelled", ("errored_out", 2, "cancelled")),
        ("failed", 3, "executing", ("waiting", 2, "e")),
        ("timeout", 2, "executing", ("waiting", 1, "e")),
        ("failed", 1, "executing", ("errored_out", 0, "e")),
        ("timeout", 1, "errored_out", ("errored_out", 0, "e")),
        ("failed", 3, "cancelled", ("errored_out", 2, "cancelled")),
        ("refused", 3, "executing", ("errored_out", 0, "e")),
    ],
)
def test_the_retry_rule(
    conn: Any, kind: str, tries: int, posting: str, expected: tuple[Any, ...]
) -> None:
    row = conn.execute(
        "SELECT (r).status, (r).tries_remaining, (r).error"
        " FROM pdoflowd.end_job(%s, %s, %s, 'e') AS r",
        (kind, tries, posting),
    ).fetchone()
    assert row == expected


def test_every_outcome_kind_is_one_end_job_knows() -> None:
    schema = (Path(migrate.__file__).parent / "schema.sql").read_text()
    match = re.search(
        r"CREATE FUNCTION pdoflowd\.end_job\(.*?\$\$(.*?)\$\$", schema, re.S
    )
    assert match is not None
    for kind in OutcomeKind:
        assert f"'{kind.value}'" in match.group(1), kind


def test_an_outcome_given_a_plain_kind_holds_the_enum() -> None:
    outcome = queue.Outcome(1, 1, "timeout")  # type: ignore[arg-type]
    assert outcome.kind is OutcomeKind.TIMEOUT
    assert queue.Outcome(1, 1, OutcomeKind.TIMEOUT) == outcome
    with pytest.raises(ValueError):
        queue.Outcome(1, 1, "vanished")  # type: ignore[arg-type]


def test_every_statement_that_ends_claims_follows_the_one_rule(
    dsn: str, conn: Any
) -> None:
    # Change the rule in the database: no failure is retried any more.
    conn.execute(
        """
        CREATE OR REPLACE FUNCTION pdoflowd.end_job(
            kind text, tries_remaining integer, posting_status text,
            error text)
        RETURNS pdoflowd.job_end
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS $$
        SELECT ROW(CASE WHEN kind IN ('done', 'released') THEN 'waiting'
                        ELSE 'errored_out' END,
                   tries_remaining, 'by the new rule')::pdoflowd.job_end
        $$"""
    )
    client = Client(dsn)
    client.post("jobfns.noop", [[1], [2], [3]], tries=3)
    owner = uuid.uuid4()
    failed, died = claim(conn, 2, owner)
    queue.record_outcomes(
        conn,
        owner=owner,
        outcomes=[queue.Outcome(failed.id, failed.attempt, "failed")],
    )
    queue.requeue_owner(
        conn,
        daemon_id=DAEMON,
        owner=owner,
        running_job_id=died.id,
        reason="worker died",
    )
    lost = uuid.uuid4()
    upkeep.heartbeat(
        conn, daemon_id=lost, hostname="gone", pid=1, version="0", lease_s=60
    )
    [rescued] = queue.claim(conn, owner=owner, daemon_id=lost, limit=1)
    conn.execute(
        "UPDATE pdoflowd.daemons SET heartbeat_at = now() - interval '2 min'"
    )
    upkeep.take_back_ownerless_jobs(conn, may_declare_lost=True)
    ends = [(r["id"], r["status"], r["error"]) for r in job_rows(conn)]
    assert ends == [
        (failed.id, "errored_out", "by the new rule"),
        (died.id, "errored_out", "by the new rule"),
        (rescued.id, "errored_out", "by the new rule"),
    ]


# ---------------------------------------------------------------- clocks


def test_a_retry_is_due_by_the_databases_clock_not_the_workers(
    dsn: str, conn: Any
) -> None:
    Client(dsn).post("jobfns.noop", [[1]], tries=3)
    owner = uuid.uuid4()
    [job] = claim(conn, 1, owner)
    # The worker's host clock is a day behind.
    skewed = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
    before = db_now(conn)
    queue.record_outcomes(
        conn,
        owner=owner,
        outcomes=[
            queue.Outcome(
                job.id,
                job.attempt,
                "failed",
                skewed.timestamp(),
                skewed.timestamp(),
                error="boom",
                retry_delay_s=60.0,
            )
        ],
    )
    after = db_now(conn)
    [row] = job_rows(conn)
    delay = dt.timedelta(seconds=60)
    assert before + delay <= row["run_after"] <= after + delay
    assert row["completed_at"] == skewed


# ---------------------------------------------------------------- refusals


@pytest.fixture
def latin1_dsn(pg_server: Any) -> Iterator[str]:
    """A database in the LATIN1 encoding, with the schema current: jsonb
    there refuses a character LATIN1 does not have."""
    name = "t_latin1_" + uuid.uuid4().hex[:10]
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(
            sql.SQL(
                "CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C'"
                " LC_CTYPE 'C' TEMPLATE template0"
            ).format(sql.Identifier(name))
        )
    try:
        target = pg_server.dsn(name)
        migrate.upgrade(target)
        yield target
    finally:
        pg_server.drop_database(name)


def test_a_result_the_database_refuses_ends_that_job_alone(
    tmp_path: Path, latin1_dsn: str
) -> None:
    client = Client(latin1_dsn)
    posting = client.post(
        "outcomejobs.price",
        [["12", True], ["12", False]],
        tries=3,
        store_result=True,
    )
    daemon = Daemon(
        tmp_path,
        daemon_config(
            latin1_dsn,
            workers={"count": 1},
            jobs={"allowed_modules": ["outcomejobs"]},
        ),
    )
    try:
        daemon.start().wait_ready()
        wait_until(lambda: client.status(posting.id).finished, timeout=20)
        workers = daemon.workers()
    finally:
        daemon.close()
    with psycopg.connect(latin1_dsn) as conn:
        refused, stored = job_rows(conn)
    assert (refused["status"], refused["attempt"]) == ("errored_out", 1)
    assert refused["tries_remaining"] == 0
    assert refused["error"].startswith(
        "done, but the return value could not be stored: "
    )
    assert refused["result"] is None
    assert (stored["status"], stored["result"]) == ("done", "12")
    assert len(workers) == 1
    assert "worker failed" not in daemon.log()


def test_an_outcome_refused_unexpectedly_still_uses_its_try(
    effects_dsn: str, daemons: Any
) -> None:
    with psycopg.connect(effects_dsn, autocommit=True) as conn:
        conn.execute(
            """
            CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'refused by a test trigger'; END $$;
            CREATE TRIGGER refuse BEFORE UPDATE ON pdoflowd.jobs
                FOR EACH ROW WHEN (NEW.traceback LIKE '%failing poison%')
                EXECUTE FUNCTION refuse();
            """
        )
    client = Client(effects_dsn)
    poisoned = client.post("jobfns.record_then_fail", [["poison"]], tries=2)
    fine = client.post("jobfns.record", [["fine"]])
    daemon = daemons(
        workers={"count": 1},
        jobs={"retry_delay_s": 0.0, "retry_delay_max_s": 0.0},
    )
    wait_until(lambda: client.status(poisoned.id).finished, timeout=20)
    wait_until(lambda: client.status(fine.id).finished, timeout=20)
    with psycopg.connect(effects_dsn) as conn:
        runs = conn.execute(
            "SELECT count(*) FROM effects WHERE key = 'poison'"
        ).fetchone()
        job = conn.execute(
            "SELECT j.status, j.error, j.traceback FROM pdoflowd.jobs j"
            " JOIN pdoflowd.postings p ON p.id = j.posting_id"
            " WHERE p.uuid = %s",
            (poisoned.id,),
        ).fetchone()
    assert runs == (2,)
    assert job is not None
    status, error, traceback = job
    assert (status, traceback) == (JobStatus.ERRORED_OUT.value, None)
    assert error.startswith("ValueError: failing poison (stored without its")
    assert "refused by a test trigger" in error
    assert client.status(fine.id).jobs[JobStatus.DONE] == 1
    assert "worker failed" not in daemon.log()
