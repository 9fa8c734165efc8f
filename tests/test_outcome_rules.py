"""How a claim ends, against a real PostgreSQL: the one retry rule, and
retry times on the database's clock."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import psycopg
import pytest

from pdoflowd import queries
from pdoflowd.client import Client

DAEMON = uuid.uuid4()


@pytest.fixture
def conn(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


def claim(conn: Any, limit: int, owner: uuid.UUID) -> list[Any]:
    return queries.claim(conn, owner=owner, daemon_id=DAEMON, limit=limit)


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
    queries.record_outcomes(
        conn,
        owner=owner,
        outcomes=[queries.Outcome(failed.id, failed.attempt, "failed")],
    )
    queries.requeue_owner(
        conn,
        daemon_id=DAEMON,
        owner=owner,
        running_job_id=died.id,
        reason="worker died",
    )
    lost = uuid.uuid4()
    queries.heartbeat(conn, daemon_id=lost, hostname="gone", pid=1, version="0")
    [rescued] = queries.claim(conn, owner=owner, daemon_id=lost, limit=1)
    conn.execute(
        "UPDATE pdoflowd.daemons SET heartbeat_at = now() - interval '2 min'"
    )
    queries.rescue_lost_daemons(conn, lease_s=60)
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
    queries.record_outcomes(
        conn,
        owner=owner,
        outcomes=[
            queries.Outcome(
                job.id,
                job.attempt,
                "failed",
                skewed,
                skewed,
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
