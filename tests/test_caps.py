"""Concurrency caps inside the claim, against a real PostgreSQL: a
posting's max_running and the resources its jobs use (jobs.limits), kept
under concurrent claims, a slot free as soon as its job stops executing."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from plans import nested_plans
from psycopg import sql

from harness import migrate_before
from pdoflowd.client import Client
from pdoflowd.client.errors import PostingError
from pdoflowd.db import migrate, queue
from pdoflowd.status import OutcomeKind

DAEMON = uuid.uuid4()


@pytest.fixture
def conn(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


def post(dsn: str, n: int, **options: Any) -> uuid.UUID:
    return (
        Client(dsn).post("jobfns.noop", [[i] for i in range(n)], **options).id
    )


def claim(
    conn: Any,
    limit: int,
    limits: dict[str, int] | None = None,
    owner: uuid.UUID | None = None,
) -> list[queue.ClaimedJob]:
    return queue.claim(
        conn,
        owner=owner or uuid.uuid4(),
        daemon_id=DAEMON,
        limit=limit,
        resource_limits=limits,
    )


def done(job: queue.ClaimedJob) -> queue.Outcome:
    now = time.time()
    return queue.Outcome(job.id, job.attempt, OutcomeKind.DONE, now, now)


def executing(conn: Any, posting: uuid.UUID | None = None) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pdoflowd.jobs AS j"
        " JOIN pdoflowd.postings AS p ON p.id = j.posting_id"
        " WHERE j.status = 'executing'"
        " AND (%(p)s::uuid IS NULL OR p.uuid = %(p)s::uuid)",
        {"p": posting},
    ).fetchone()
    return int(row[0])


def test_a_claim_takes_no_more_than_max_running(dsn: str, conn: Any) -> None:
    capped = post(dsn, 10, max_running=2)
    assert len(claim(conn, 10)) == 2
    assert claim(conn, 10) == []
    assert executing(conn, capped) == 2


def test_a_job_that_ends_frees_its_slot_for_the_next_claim(
    dsn: str, conn: Any
) -> None:
    post(dsn, 5, max_running=2)
    first = uuid.uuid4()
    jobs = claim(conn, 10, owner=first)
    claimed = queue.record_and_claim(
        conn,
        finishing=first,
        outcomes=[done(jobs[0])],
        owner=uuid.uuid4(),
        daemon_id=DAEMON,
        limit=10,
    )
    # The outcome written in the same call frees the slot that call fills.
    assert [r.job_id for r in claimed.recorded] == [jobs[0].id]
    assert len(claimed.jobs) == 1
    assert executing(conn) == 2


def test_a_taken_back_job_frees_its_slot(dsn: str, conn: Any) -> None:
    post(dsn, 5, max_running=1)
    owner = uuid.uuid4()
    [job] = claim(conn, 10, owner=owner)
    assert claim(conn, 10) == []
    queue.requeue_owner(
        conn,
        daemon_id=DAEMON,
        owner=owner,
        running_job_id=job.id,
        reason="worker died",
    )
    assert len(claim(conn, 10)) == 1


def test_uncapped_jobs_fill_the_batch_after_the_capped_ones(
    dsn: str, conn: Any
) -> None:
    post(dsn, 5, priority=1)
    capped = post(dsn, 5, max_running=2)
    jobs = claim(conn, 4)
    assert len(jobs) == 4
    assert executing(conn, capped) == 2


def test_a_paused_capped_posting_is_not_claimed(dsn: str, conn: Any) -> None:
    post(dsn, 3, max_running=2, paused=True)
    assert claim(conn, 10) == []


def test_a_resource_limit_is_shared_by_the_postings_that_use_it(
    dsn: str, conn: Any
) -> None:
    one = post(dsn, 5, uses=["tape"])
    other = post(dsn, 5, uses=["tape"], max_running=4)
    limits = {"tape": 3}
    assert len(claim(conn, 2, limits)) == 2
    assert len(claim(conn, 10, limits)) == 1
    assert claim(conn, 10, limits) == []
    assert executing(conn, one) + executing(conn, other) == 3


def test_a_posting_is_held_to_the_tightest_of_its_caps(
    dsn: str, conn: Any
) -> None:
    post(dsn, 5, uses=["tape", "licence"], max_running=4)
    assert len(claim(conn, 10, {"tape": 3, "licence": 2})) == 2


def test_a_daemon_without_a_limit_for_a_resource_claims_none_of_its_jobs(
    dsn: str, conn: Any
) -> None:
    post(dsn, 3, uses=["tape"])
    assert claim(conn, 10) == []
    assert claim(conn, 10, {"licence": 5}) == []
    assert len(claim(conn, 10, {"tape": 5})) == 3


def test_the_best_capped_job_is_claimed_first(dsn: str, conn: Any) -> None:
    Client(dsn).post(
        "jobfns.noop", [[1], [2], [3]], priority=[0, 5, 1], max_running=1
    )
    [job] = claim(conn, 10)
    assert job.priority == 5


def test_concurrent_claims_never_run_more_than_max_running(
    dsn: str, conn: Any
) -> None:
    capped = post(dsn, 100, max_running=3, uses=["tape"])
    post(dsn, 100)
    most = 0
    failures: list[BaseException] = []
    stop = threading.Event()

    def work() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as mine:
                finishing: uuid.UUID | None = None
                outcomes: list[queue.Outcome] = []
                while not stop.is_set():
                    owner = uuid.uuid4()
                    claimed = queue.record_and_claim(
                        mine,
                        finishing=finishing,
                        outcomes=outcomes,
                        owner=owner,
                        daemon_id=DAEMON,
                        limit=4,
                        resource_limits={"tape": 5},
                    )
                    finishing = owner
                    outcomes = [done(j) for j in claimed.jobs]
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    began = time.monotonic()
    deadline = began + 20
    try:
        while time.monotonic() < deadline:
            most = max(most, executing(conn, capped))
            row = conn.execute(
                "SELECT count(*) FROM pdoflowd.jobs"
                " WHERE status IN ('waiting', 'executing')"
            ).fetchone()
            if row[0] == 0:
                break
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures
    assert most == 3
    assert executing(conn) == 0


def test_the_capped_claim_reads_its_jobs_by_index(dsn: str, conn: Any) -> None:
    conn.execute("ALTER TABLE pdoflowd.jobs SET (autovacuum_enabled = off)")
    post(dsn, 3000, max_running=5, uses=["tape"])
    plans = nested_plans(conn, lambda: claim(conn, 10, {"tape": 8}))
    assert all("Seq Scan on jobs" not in p for p in plans), plans
    assert any("jobs_capped_claim" in p for p in plans), plans
    assert all("Sort" not in p for p in plans if "LockRows" in p), plans


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_running": 0}, "max_running"),
        ({"max_running": True}, "max_running"),
        ({"max_running": 2.5}, "max_running"),
        ({"uses": "tape"}, "uses"),
        ({"uses": [""]}, r"uses\[0\]"),
        ({"uses": ["tape", 3]}, r"uses\[1\]"),
    ],
)
def test_a_cap_that_is_not_one_is_refused_before_anything_is_written(
    dsn: str, conn: Any, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(PostingError, match=message):
        post(dsn, 1, **options)
    assert (
        conn.execute("SELECT count(*) FROM pdoflowd.postings").fetchone()[0]
        == 0
    )


def test_a_submitter_granted_before_caps_may_post_capped_work_after_upgrade(
    empty_dsn: str, empty_roles: Any
) -> None:
    role = empty_roles.make()
    with psycopg.connect(empty_dsn) as conn:
        migrate_before(conn, "max_running")
        for template in migrate.SUBMITTER_GRANTS:
            before = template.replace(", max_running, uses)", ")").replace(
                ", limits)", ")"
            )
            conn.execute(sql.SQL(before).format(role=sql.Identifier(role)))
    migrate.upgrade(empty_dsn)
    client = Client(empty_roles.dsn_of(role))
    posting = client.post("jobfns.noop", [[1]], max_running=1, uses=["tape"])
    assert client.summary(posting.id).max_running == 1
    assert client.summary(posting.id).uses == ("tape",)
