"""State transitions that race, against a real PostgreSQL: settling against
a retry in flight.

Each interleaving is made for real: a second connection holds its
transaction open (as a poster's own transaction would) while the statement
under test runs on another.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from pdoflowd import queries
from pdoflowd.client import Client
from pdoflowd.status import PostingStatus

DAEMON = uuid.uuid4()


@pytest.fixture
def conn(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


def claim(conn: Any, limit: int, owner: uuid.UUID) -> list[Any]:
    return queries.claim(conn, owner=owner, daemon_id=DAEMON, limit=limit)


def outcome(job: Any, kind: str) -> queries.Outcome:
    return queries.Outcome(
        job.id, job.attempt, kind, error=None if kind == "done" else "boom"
    )


def jobs_of(conn: Any, posting: uuid.UUID) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(
        "SELECT j.* FROM pdoflowd.jobs j JOIN pdoflowd.postings p"
        " ON p.id = j.posting_id WHERE p.uuid = %s ORDER BY j.id",
        (posting,),
    ).fetchall()


def posting_status(conn: Any, posting: uuid.UUID) -> PostingStatus:
    progress = queries.posting_progress(conn, posting)
    assert progress is not None
    return progress.status


def run_until_done_or_blocked(
    dsn: str, conn: Any, action: Any, timeout: float = 10.0
) -> threading.Thread:
    """Run ``action(conn)`` in a thread; return once it has finished or its
    session waits for a lock (seen in pg_stat_activity)."""
    pid = conn.info.backend_pid
    thread = threading.Thread(target=action, args=(conn,))
    thread.start()
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as watcher:
        while thread.is_alive():
            row = watcher.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                (pid,),
            ).fetchone()
            if row is not None and row[0] == "Lock":
                break
            assert time.monotonic() < deadline, "neither done nor blocked"
            time.sleep(0.01)
    return thread


# ---------------------------------------------------------------- settle


def test_a_settle_during_a_retry_in_flight_leaves_the_retried_job_to_run(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1], [2]], tries=1)
    owner = uuid.uuid4()
    done, failed = claim(conn, 2, owner)
    queries.record_outcomes(conn, owner=owner, outcomes=[outcome(done, "done")])
    queries.record_outcomes(
        conn, owner=owner, outcomes=[outcome(failed, "failed")]
    )
    # The last outcome is written, the posting not yet settled; a poster
    # retries it in a transaction of its own that is still open.
    settled: dict[int, PostingStatus] = {}
    with psycopg.connect(dsn) as poster:
        poster.execute("SELECT 1")
        queries.control_posting(poster, posting.id, "retry")
        settle = run_until_done_or_blocked(
            dsn,
            conn,
            lambda c: settled.update(
                queries.settle_postings(c, [done.posting_id], error_threshold=5)
            ),
        )
        poster.commit()
    settle.join(10)
    assert settled == {}
    assert posting_status(conn, posting.id) is PostingStatus.EXECUTING
    assert [r["status"] for r in jobs_of(conn, posting.id)] == [
        "done",
        "waiting",
    ]
    [again] = claim(conn, 1, uuid.uuid4())
    assert again.id == failed.id
