"""The worker's claim, pdoflowd.claim_jobs: its plan whatever the
statistics say, the outcomes it writes in the same statement, and its
agreement with execute-job's claim, against a real PostgreSQL."""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
import pytest
from plans import claim_plan, nested_plans

from pdoflowd.client import Client
from pdoflowd.db import onejob, queue
from pdoflowd.status import JobStatus, OutcomeKind

DAEMON = uuid.uuid4()


@pytest.fixture
def conn(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


def test_a_posting_no_analyze_has_seen_is_claimed_in_index_order(
    dsn: str, conn: Any
) -> None:
    # A table no ANALYZE has seen since it grew by a large posting: the
    # planner, left to itself, would read every waiting job and sort them.
    conn.execute("ALTER TABLE pdoflowd.jobs SET (autovacuum_enabled = off)")
    Client(dsn).post("jobfns.noop", [[i] for i in range(5000)])
    plans = nested_plans(
        conn,
        lambda: queue.claim(
            conn, owner=uuid.uuid4(), daemon_id=DAEMON, limit=10
        ),
    )
    plan = claim_plan(plans)
    assert "Index Scan using jobs_claim" in plan, plan
    assert "Sort" not in plan, plan


def test_outcomes_and_the_next_claim_go_in_one_statement(
    dsn: str, conn: Any
) -> None:
    Client(dsn).post("jobfns.noop", [[i] for i in range(5)])
    first = uuid.uuid4()
    jobs = queue.claim(conn, owner=first, daemon_id=DAEMON, limit=2)
    now = time.time()
    outcomes = [
        queue.Outcome(jobs[0].id, jobs[0].attempt, OutcomeKind.DONE, now, now),
        # An outcome of another attempt is fenced off.
        queue.Outcome(jobs[1].id, jobs[1].attempt + 1, OutcomeKind.DONE),
    ]
    second = uuid.uuid4()
    plans = nested_plans(
        conn,
        lambda: queue.record_and_claim(
            conn,
            finishing=first,
            outcomes=outcomes,
            owner=second,
            daemon_id=DAEMON,
            limit=2,
        ),
    )
    # One statement from here: the call (and the one inside it).
    assert len([p for p in plans if "claim_jobs(" in p]) == 1, plans
    rows = dict(conn.execute("SELECT id, status FROM pdoflowd.jobs").fetchall())
    assert rows[jobs[0].id] == "done"
    assert rows[jobs[1].id] == "executing"
    owners = dict(
        conn.execute(
            "SELECT id, owner FROM pdoflowd.jobs WHERE status = 'executing'"
        ).fetchall()
    )
    assert sorted(owners.values()).count(second) == 2
    assert owners[jobs[1].id] == first


def test_one_claim_returns_what_it_wrote_and_what_it_took(
    dsn: str, conn: Any
) -> None:
    Client(dsn).post("jobfns.noop", [[i] for i in range(3)])
    first = uuid.uuid4()
    [done] = queue.claim(conn, owner=first, daemon_id=DAEMON, limit=1)
    claimed = queue.record_and_claim(
        conn,
        finishing=first,
        outcomes=[queue.Outcome(done.id, done.attempt, OutcomeKind.FAILED)],
        owner=uuid.uuid4(),
        daemon_id=DAEMON,
        limit=5,
    )
    assert [(r.job_id, r.kind, r.status) for r in claimed.recorded] == [
        (done.id, OutcomeKind.FAILED, JobStatus.WAITING)
    ]
    # The job that failed waits again, but the same statement could not
    # see it waiting: it is not among those claimed.
    assert [j.id for j in claimed.jobs] == sorted(j.id for j in claimed.jobs)
    assert done.id not in {j.id for j in claimed.jobs}
    assert len(claimed.jobs) == 2


def test_a_refused_value_fails_the_outcomes_and_the_claim_together(
    dsn: str, conn: Any
) -> None:
    Client(dsn).post("jobfns.noop", [[i] for i in range(3)])
    first = uuid.uuid4()
    [ran] = queue.claim(conn, owner=first, daemon_id=DAEMON, limit=1)
    bad = queue.Outcome(
        ran.id, ran.attempt, OutcomeKind.DONE, result="not json"
    )
    with pytest.raises(psycopg.DataError):
        queue.record_and_claim(
            conn,
            finishing=first,
            outcomes=[bad],
            owner=uuid.uuid4(),
            daemon_id=DAEMON,
            limit=5,
        )
    counts = dict(
        conn.execute(
            "SELECT status, count(*) FROM pdoflowd.jobs GROUP BY status"
        ).fetchall()
    )
    assert counts == {"executing": 1, "waiting": 2}


def test_execute_jobs_claim_takes_a_job_as_the_workers_claim_does(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    client.post("jobfns.noop", [[1]], timeout_s=30)
    client.post("jobfns.noop", [[1]], timeout_s=30)
    uuids = [
        r[0]
        for r in conn.execute(
            "SELECT uuid FROM pdoflowd.jobs ORDER BY id"
        ).fetchall()
    ]
    conn.execute(
        "UPDATE pdoflowd.jobs SET progress = 0.5, progress_note = 'x',"
        " progress_at = now()"
    )
    rows_created = [
        r[0]
        for r in conn.execute(
            "SELECT created_at FROM pdoflowd.jobs ORDER BY id"
        ).fetchall()
    ]
    owner = uuid.uuid4()
    [by_worker] = queue.claim(conn, owner=owner, daemon_id=DAEMON, limit=1)
    by_hand = onejob.claim_job(
        conn, job_uuid=uuids[1], owner=owner, daemon_id=DAEMON
    )
    assert by_hand is not None
    for field in queue.ClaimedJob._fields:
        mine, theirs = getattr(by_hand, field), getattr(by_worker, field)
        if field == "runnable_since":
            assert mine == rows_created[1].timestamp()
            assert theirs == rows_created[0].timestamp()
        elif field not in ("id", "uuid", "posting_id", "posting_uuid"):
            assert mine == theirs, field
    rows = conn.execute(
        "SELECT status, owner, daemon_id, attempt, claimed_at IS NOT NULL,"
        " progress, progress_note, progress_at FROM pdoflowd.jobs"
        " ORDER BY id"
    ).fetchall()
    assert (
        rows[0]
        == rows[1]
        == ("executing", owner, DAEMON, 1, True, None, None, None)
    )


def test_a_plan_made_on_a_small_table_still_claims_by_index_when_it_grew(
    dsn: str, conn: Any
) -> None:
    # The claim's plan is made once per session: on a table of a few jobs
    # a scan of the table is the cheapest; the same plan, kept while the
    # table grows by a large posting, must not read the table per claim.
    client = Client(dsn)
    client.post("jobfns.noop", [[i] for i in range(3)])
    owner = uuid.uuid4()
    jobs = queue.claim(conn, owner=owner, daemon_id=DAEMON, limit=3)
    conn.execute("ALTER TABLE pdoflowd.jobs SET (autovacuum_enabled = off)")
    client.post("jobfns.noop", [[i] for i in range(5000)])
    plans = nested_plans(
        conn,
        lambda: queue.record_and_claim(
            conn,
            finishing=owner,
            outcomes=[
                queue.Outcome(j.id, j.attempt, OutcomeKind.DONE) for j in jobs
            ],
            owner=uuid.uuid4(),
            daemon_id=DAEMON,
            limit=10,
        ),
    )
    text = "\n".join(plans)
    assert "Seq Scan on jobs" not in text, text
    assert "Seq Scan on postings" not in text, text
