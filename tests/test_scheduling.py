"""Which jobs a claim takes: capabilities, poster scoping and run-after,
against a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import psycopg
import pytest
from plans import claim_plan, nested_plans

from pdoflowd.client import Client, PostingError, Registry, job
from pdoflowd.db import postings, queue, upkeep

DAEMON = uuid.uuid4()


@job(requires=["gpu"], store_result=True)
def render(frame: int) -> int:
    return frame


@pytest.fixture
def conn(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


def claim(conn: Any, **scope: Any) -> list[queue.ClaimedJob]:
    return queue.claim(
        conn, owner=uuid.uuid4(), daemon_id=DAEMON, limit=100, **scope
    )


def session_user(conn: Any) -> str:
    row = conn.execute("SELECT session_user").fetchone()
    assert row is not None
    return str(row[0])


def test_requirements_are_stored_on_the_posting(dsn: str, conn: Any) -> None:
    Client(dsn).post("jobfns.noop", [[1]], requires=["gpu", "ram", "gpu"])
    row = conn.execute("SELECT requires FROM pdoflowd.postings").fetchone()
    assert row == (["gpu", "ram"],)


def test_the_job_definition_gives_requirements_and_result_keeping(
    dsn: str, conn: Any
) -> None:
    Registry[render].post_work([[1]], dsn=dsn)
    row = conn.execute(
        "SELECT requires, store_result FROM pdoflowd.postings"
    ).fetchone()
    assert row == (["gpu"], True)


def test_a_daemon_claims_only_what_it_provides(dsn: str, conn: Any) -> None:
    client = Client(dsn)
    plain = client.post("jobfns.noop", [[1]])
    gpu = client.post("jobfns.noop", [[2]], requires=["gpu"])
    both = client.post("jobfns.noop", [[3]], requires=["gpu", "ram"])
    assert [j.posting_uuid for j in claim(conn)] == [plain.id]
    assert [j.posting_uuid for j in claim(conn, provides=["gpu", "x"])] == [
        gpu.id
    ]
    assert [j.posting_uuid for j in claim(conn, provides=["ram", "gpu"])] == [
        both.id
    ]


def test_a_job_nobody_can_run_stays_waiting_and_says_so(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1]], requires=["tpu"])
    upkeep.heartbeat(
        conn,
        daemon_id=DAEMON,
        hostname="h",
        pid=1,
        version="0",
        lease_s=60,
        provides=["gpu"],
    )
    assert claim(conn, provides=["gpu"]) == []
    summary = client.summary(posting.id)
    assert summary.claimable_by == 0
    assert summary.jobs[queue.JobStatus.WAITING] == 1
    upkeep.heartbeat(
        conn,
        daemon_id=uuid.uuid4(),
        hostname="h2",
        pid=2,
        version="0",
        lease_s=60,
        provides=["tpu", "gpu"],
    )
    assert client.summary(posting.id).claimable_by == 1


def test_a_daemon_scoped_to_posters_claims_only_their_postings(
    dsn: str, conn: Any
) -> None:
    Client(dsn).post("jobfns.noop", [[1]])
    me = session_user(conn)
    assert claim(conn, posters=["someone else"]) == []
    assert len(claim(conn, posters=["someone else", me])) == 1


def test_the_poster_is_the_session_user_and_never_sent(
    dsn: str, conn: Any
) -> None:
    Client(dsn).post("jobfns.noop", [[1]])
    row = conn.execute("SELECT poster FROM pdoflowd.postings").fetchone()
    assert row == (session_user(conn),)
    # Not among the columns inserted, nor a parameter (the key's conflict
    # target names the column, which is not sending it).
    columns = postings._INSERT_POSTING.split("VALUES")[0]
    assert "poster" not in columns
    assert "%(poster)s" not in postings._INSERT_POSTING


def test_a_delay_in_seconds_holds_jobs_back_by_the_databases_clock(
    dsn: str, conn: Any
) -> None:
    Client(dsn).post("jobfns.noop", [[1]], run_after=3600)
    assert claim(conn) == []
    row = conn.execute("SELECT run_after - now() FROM pdoflowd.jobs").fetchone()
    assert row is not None
    assert dt.timedelta(minutes=59) < row[0] <= dt.timedelta(hours=1)
    conn.execute("UPDATE pdoflowd.jobs SET run_after = now()")
    assert len(claim(conn)) == 1


@pytest.mark.parametrize(
    "when",
    [
        dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1),
        dt.timedelta(0),
        0,
    ],
)
def test_a_run_after_already_past_runs_at_once(
    dsn: str, conn: Any, when: Any
) -> None:
    Client(dsn).post("jobfns.noop", [[1]], run_after=when)
    assert len(claim(conn)) == 1


def test_a_run_after_datetime_is_stored_as_given(dsn: str, conn: Any) -> None:
    when = dt.datetime(2031, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    Client(dsn).post("jobfns.noop", [[1], [2]], run_after=when)
    rows = conn.execute("SELECT run_after FROM pdoflowd.jobs").fetchall()
    assert rows == [(when,), (when,)]
    assert claim(conn) == []


@pytest.mark.parametrize(
    ("when", "problem"),
    [
        (dt.datetime(2031, 1, 2), "timezone-aware"),
        (-1, "at least 0 seconds"),
        (float("nan"), "at least 0 seconds"),
        (float("inf"), "at least 0 seconds"),
        ("soon", "datetime or a delay"),
        (True, "datetime or a delay"),
    ],
)
def test_a_meaningless_run_after_is_refused(
    dsn: str, conn: Any, when: Any, problem: str
) -> None:
    with pytest.raises(PostingError, match=problem):
        Client(dsn).post("jobfns.noop", [[1]], run_after=when)
    assert conn.execute(
        "SELECT count(*) FROM pdoflowd.postings"
    ).fetchone() == (0,)


@pytest.mark.parametrize(
    "requires", ["gpu", [""], ["  "], ["a\x00b"], [3], {"gpu": 1}]
)
def test_malformed_requirements_are_refused(dsn: str, requires: Any) -> None:
    with pytest.raises(PostingError, match=r"requires|capabilit"):
        Client(dsn).post("jobfns.noop", [[1]], requires=requires)


def test_the_claim_walks_the_claim_index_with_scopes_and_statistics(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    for index in range(20):
        client.post(
            "jobfns.noop",
            [[i] for i in range(50)],
            requires=["gpu"] if index % 2 else [],
            paused=index % 5 == 0,
        )
    conn.execute("ANALYZE pdoflowd.jobs")
    conn.execute("ANALYZE pdoflowd.postings")
    plan = claim_plan(
        nested_plans(
            conn,
            lambda: claim(conn, provides=["gpu"], posters=[session_user(conn)]),
        )
    )
    assert "Index Scan using jobs_claim" in plan, plan
    assert "Sort Key: j_1.priority" not in plan, plan
