"""Posting controls against a real PostgreSQL: pause, resume, cancel, retry,
set-status, and the queue's statements around a cancelled posting."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from pdoflowd.client import Client, PostingStateError
from pdoflowd.db import common, queue, upkeep
from pdoflowd.status import JobStatus, PostingStatus

DAEMON = uuid.uuid4()


@pytest.fixture
def conn(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


def claim(conn: Any, limit: int, owner: uuid.UUID | None = None) -> list[Any]:
    return queue.claim(
        conn, owner=owner or uuid.uuid4(), daemon_id=DAEMON, limit=limit
    )


def jobs_of(conn: Any, posting: uuid.UUID) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(
        "SELECT j.* FROM pdoflowd.jobs j JOIN pdoflowd.postings p"
        " ON p.id = j.posting_id WHERE p.uuid = %s ORDER BY j.id",
        (posting,),
    ).fetchall()


def fail(conn: Any, owner: uuid.UUID, jobs: list[Any]) -> None:
    queue.record_outcomes(
        conn,
        owner=owner,
        outcomes=[
            queue.Outcome(j.id, j.attempt, "failed", error="boom") for j in jobs
        ],
    )


def test_a_paused_posting_is_not_claimed_until_resumed(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1]])
    paused = client.pause(posting.id)
    assert (paused.status, paused.jobs_changed) == (PostingStatus.PAUSED, 0)
    assert claim(conn, 10) == []
    assert client.resume(posting.id).status is PostingStatus.EXECUTING
    assert [j.posting_uuid for j in claim(conn, 10)] == [posting.id]


def test_resume_wakes_listening_daemons(dsn: str, conn: Any) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1]], paused=True)
    conn.execute(f"LISTEN {common.NOTIFY_CHANNEL}")
    client.resume(posting.id)
    assert len(list(conn.notifies(timeout=5, stop_after=1))) == 1


def test_pausing_a_posting_that_is_not_executing_is_refused(
    dsn: str,
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1]], paused=True)
    with pytest.raises(PostingStateError, match="is paused; only an exec"):
        client.pause(posting.id)


def test_cancel_ends_waiting_and_running_jobs_as_cancelled(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1], [2], [3]])
    owner = uuid.uuid4()
    running = claim(conn, 1, owner)
    result = client.cancel(posting.id)
    assert (result.status, result.jobs_changed) == (PostingStatus.CANCELLED, 3)
    rows = jobs_of(conn, posting.id)
    assert {(r["status"], r["error"]) for r in rows} == {
        ("errored_out", "cancelled")
    }
    # The running job keeps its owner: its run may still be going.
    assert [r["owner"] for r in rows] == [owner, None, None]
    # Its late outcome is fenced off.
    assert (
        queue.record_outcomes(
            conn,
            owner=owner,
            outcomes=[queue.Outcome(running[0].id, running[0].attempt, "done")],
        )
        == []
    )
    state = client.status(posting.id)
    assert state.status is PostingStatus.CANCELLED and state.finished


def test_a_cancelled_posting_is_never_settled_nor_claimed(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1]])
    client.cancel(posting.id)
    assert claim(conn, 10) == []
    assert queue.unsettled_postings(conn) == []
    assert client.status(posting.id).status is PostingStatus.CANCELLED


def test_cancelling_an_ended_posting_is_refused(dsn: str, conn: Any) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1]])
    client.cancel(posting.id)
    with pytest.raises(PostingStateError, match="ended already"):
        client.cancel(posting.id)


def test_requeue_of_a_dead_workers_jobs_ends_those_of_cancelled_postings(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    cancelled = client.post("jobfns.noop", [[1], [2]])
    other = client.post("jobfns.noop", [[3]])
    owner = uuid.uuid4()
    running, unstarted, kept = claim(conn, 3, owner)
    # As if a cancel landed between the claim and the worker's death
    # without reaching the jobs (the posting row alone).
    conn.execute(
        "UPDATE pdoflowd.postings SET status = 'cancelled' WHERE uuid = %s",
        (cancelled.id,),
    )
    requeued = queue.requeue_owner(
        conn,
        daemon_id=DAEMON,
        owner=owner,
        running_job_id=running.id,
        reason="cancelled",
    )
    ends = {r.job_id: r.status for r in requeued}
    assert ends == {
        running.id: JobStatus.ERRORED_OUT,
        unstarted.id: JobStatus.ERRORED_OUT,
        kept.id: JobStatus.WAITING,
    }
    assert {r["error"] for r in jobs_of(conn, cancelled.id)} == {"cancelled"}
    [left] = jobs_of(conn, other.id)
    assert (left["status"], left["tries_remaining"]) == ("waiting", 3)


def test_rescue_of_a_lost_daemon_ends_jobs_of_cancelled_postings(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1]])
    lost = uuid.uuid4()
    upkeep.heartbeat(
        conn, daemon_id=lost, hostname="gone", pid=1, version="0", lease_s=60
    )
    queue.claim(conn, owner=uuid.uuid4(), daemon_id=lost, limit=1)
    conn.execute("UPDATE pdoflowd.postings SET status = 'cancelled'")
    conn.execute(
        "UPDATE pdoflowd.daemons SET heartbeat_at = now() - interval '2 min'"
    )
    [rescued] = upkeep.take_back_ownerless_jobs(conn, may_declare_lost=True)
    assert rescued.status is JobStatus.ERRORED_OUT
    assert jobs_of(conn, posting.id)[0]["error"] == "cancelled"


def test_cancelled_among_names_only_jobs_of_cancelled_postings(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    doomed = client.post("jobfns.noop", [[1]])
    client.post("jobfns.noop", [[2]])
    jobs = claim(conn, 2)
    client.cancel(doomed.id)
    [gone] = [j.id for j in jobs if j.posting_uuid == doomed.id]
    assert queue.cancelled_among(conn, [j.id for j in jobs]) == {gone}
    assert queue.cancelled_among(conn, []) == set()


def test_retry_puts_errored_out_jobs_back_with_fresh_tries(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1], [2]], tries=2)
    for _ in range(2):
        owner = uuid.uuid4()
        fail(conn, owner, claim(conn, 1, owner))
    owner = uuid.uuid4()
    queue.record_outcomes(
        conn,
        owner=owner,
        outcomes=[
            queue.Outcome(j.id, j.attempt, "done")
            for j in claim(conn, 1, owner)
        ],
    )
    queue.settle_postings(
        conn, [jobs_of(conn, posting.id)[0]["posting_id"]], error_threshold=1
    )
    assert client.status(posting.id).status is PostingStatus.ERRORED_OUT
    result = client.retry(posting.id)
    assert (result.status, result.jobs_changed) == (PostingStatus.EXECUTING, 1)
    rows = jobs_of(conn, posting.id)
    assert [(r["status"], r["tries_remaining"]) for r in rows] == [
        ("waiting", 2),
        ("done", 2),
    ]
    assert rows[0]["completed_at"] is None
    assert client.status(posting.id).finished is False


def test_retry_may_give_a_number_of_tries(dsn: str, conn: Any) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1]], tries=1)
    owner = uuid.uuid4()
    fail(conn, owner, claim(conn, 1, owner))
    assert client.retry(posting.id, tries=7).jobs_changed == 1
    assert jobs_of(conn, posting.id)[0]["tries_remaining"] == 7


def test_retry_of_a_cancelled_posting_runs_its_jobs_again(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1], [2]])
    client.cancel(posting.id)
    assert client.retry(posting.id).status is PostingStatus.EXECUTING
    assert len(claim(conn, 10)) == 2


def test_retry_without_errored_out_jobs_changes_nothing(dsn: str) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1]], paused=True)
    result = client.retry(posting.id)
    assert (result.status, result.jobs_changed) == (PostingStatus.PAUSED, 0)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("paused", PostingStatus.PAUSED),
        ("cancelled", PostingStatus.CANCELLED),
        ("finished", PostingStatus.FINISHED),
        (PostingStatus.ERRORED_OUT, PostingStatus.ERRORED_OUT),
    ],
)
def test_set_status_reaches_each_status(
    dsn: str, status: Any, expected: PostingStatus
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1]])
    assert client.set_status(posting.id, status).status is expected
    assert client.status(posting.id).status is expected


def test_set_status_executing_resumes_a_paused_posting(dsn: str) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1]], paused=True)
    assert (
        client.set_status(posting.id, "executing").status
        is PostingStatus.EXECUTING
    )


def test_set_status_refuses_an_unknown_status(dsn: str) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1]])
    with pytest.raises(PostingStateError, match="is not a posting status"):
        client.set_status(posting.id, "done")


@pytest.mark.parametrize("verb", ["pause", "resume", "cancel", "retry"])
def test_controls_of_an_unknown_posting_raise_key_error(
    dsn: str, verb: str
) -> None:
    unknown = uuid.uuid4()
    with pytest.raises(KeyError, match=f"no posting {unknown}"):
        getattr(Client(dsn), verb)(unknown)
