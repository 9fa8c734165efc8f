"""State transitions that race, against a real PostgreSQL: settling against
a retry in flight, and cancels against claims whose runs may still be going.

Each interleaving is made for real: a second connection holds its
transaction open (as a poster's own transaction would) while the statement
under test runs on another.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from harness import wait_until
from pdoflowd.client import Client, Posting
from pdoflowd.daemon import worker
from pdoflowd.db import common, postings, queue, upkeep
from pdoflowd.status import JobStatus, PostingStatus

DAEMON = uuid.uuid4()


@pytest.fixture
def conn(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


def claim(conn: Any, limit: int, owner: uuid.UUID) -> list[Any]:
    return queue.claim(conn, owner=owner, daemon_id=DAEMON, limit=limit)


def outcome(job: Any, kind: str) -> queue.Outcome:
    return queue.Outcome(
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
    progress = postings.posting_progress(conn, posting)
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
    queue.record_outcomes(conn, owner=owner, outcomes=[outcome(done, "done")])
    queue.record_outcomes(
        conn, owner=owner, outcomes=[outcome(failed, "failed")]
    )
    # The last outcome is written, the posting not yet settled; a poster
    # retries it in a transaction of its own that is still open.
    settled: dict[int, PostingStatus] = {}
    with psycopg.connect(dsn) as poster:
        poster.execute("SELECT 1")
        postings.control_posting(poster, posting.id, "retry")
        settle = run_until_done_or_blocked(
            dsn,
            conn,
            lambda c: settled.update(
                queue.settle_postings(c, [done.posting_id], error_threshold=5)
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


# ---------------------------------------------------------------- cancel


def test_a_retry_after_a_cancel_gives_a_claimed_job_back_to_its_claim(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1], [2]])
    owner = uuid.uuid4()
    [running] = claim(conn, 1, owner)
    client.cancel(posting.id)
    assert client.retry(posting.id).jobs_changed == 2
    # Only the job nobody had claimed is there to claim: no second run
    # starts beside the one that may still be going.
    assert [j.id for j in claim(conn, 10, uuid.uuid4())] != [running.id]
    rows = jobs_of(conn, posting.id)
    assert (rows[0]["status"], rows[0]["owner"], rows[0]["attempt"]) == (
        "executing",
        owner,
        running.attempt,
    )
    # That run's outcome counts.
    [recorded] = queue.record_outcomes(
        conn, owner=owner, outcomes=[outcome(running, "done")]
    )
    assert recorded.status is JobStatus.DONE


def test_a_fenced_outcome_gives_the_cancelled_claim_up_for_a_later_retry(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1]])
    owner = uuid.uuid4()
    [job] = claim(conn, 1, owner)
    client.cancel(posting.id)
    done = [outcome(job, "done")]
    assert queue.record_outcomes(conn, owner=owner, outcomes=done) == []
    claims = [(job.id, job.attempt)]
    assert queue.give_up_claims(conn, owner=owner, claims=claims) == 1
    row = jobs_of(conn, posting.id)[0]
    assert (row["status"], row["error"], row["owner"]) == (
        "errored_out",
        "cancelled",
        None,
    )
    assert queue.give_up_claims(conn, owner=owner, claims=claims) == 0
    client.retry(posting.id)
    assert [j.id for j in claim(conn, 1, uuid.uuid4())] == [job.id]


def test_giving_up_a_claim_a_retry_gave_back_releases_the_job(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1]], tries=2)
    owner = uuid.uuid4()
    [job] = claim(conn, 1, owner)
    client.cancel(posting.id)
    done = [outcome(job, "done")]
    assert queue.record_outcomes(conn, owner=owner, outcomes=done) == []
    # The retry lands between the fenced write and the giving up.
    client.retry(posting.id)
    claims = [(job.id, job.attempt)]
    assert queue.give_up_claims(conn, owner=owner, claims=claims) == 1
    row = jobs_of(conn, posting.id)[0]
    assert (row["status"], row["owner"], row["tries_remaining"]) == (
        "waiting",
        None,
        2,
    )


def test_taking_back_a_dead_workers_jobs_after_cancel_and_retry(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1], [2]], tries=3)
    owner = uuid.uuid4()
    running, unstarted = claim(conn, 2, owner)
    client.cancel(posting.id)
    client.retry(posting.id, tries=5)
    # Its worker was ended because of the cancel, and is taken back now.
    requeued = queue.requeue_owner(
        conn,
        daemon_id=DAEMON,
        owner=owner,
        running_job_id=running.id,
        reason="cancelled",
    )
    assert {(r.job_id, r.was_running, r.status) for r in requeued} == {
        (running.id, True, JobStatus.WAITING),
        (unstarted.id, False, JobStatus.WAITING),
    }
    rows = jobs_of(conn, posting.id)
    assert [(r["tries_remaining"], r["owner"]) for r in rows] == [
        (4, None),
        (5, None),
    ]


def test_taking_back_a_dead_workers_cancelled_claims_ends_them(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    cancelled = client.post("jobfns.noop", [[1]])
    other = client.post("jobfns.noop", [[2]])
    owner = uuid.uuid4()
    running, kept = claim(conn, 2, owner)
    client.cancel(cancelled.id)
    # The cancel leaves the claim to its run, which may still be going.
    assert jobs_of(conn, cancelled.id)[0]["owner"] == owner
    requeued = queue.requeue_owner(
        conn,
        daemon_id=DAEMON,
        owner=owner,
        running_job_id=running.id,
        reason="cancelled",
    )
    # The cancelled claim ends with its worker but is not taken back.
    assert [(r.job_id, r.status) for r in requeued] == [
        (kept.id, JobStatus.WAITING)
    ]
    [row] = jobs_of(conn, cancelled.id)
    assert (row["status"], row["error"], row["owner"]) == (
        "errored_out",
        "cancelled",
        None,
    )
    assert jobs_of(conn, other.id)[0]["tries_remaining"] == 3
    client.retry(cancelled.id)
    assert [j.id for j in claim(conn, 1, uuid.uuid4())] == [running.id]


def test_rescuing_a_lost_host_after_cancel_and_retry(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1]], tries=3)
    lost = uuid.uuid4()
    upkeep.heartbeat(
        conn, daemon_id=lost, hostname="gone", pid=1, version="0", lease_s=60
    )
    [job] = queue.claim(conn, owner=uuid.uuid4(), daemon_id=lost, limit=1)
    client.cancel(posting.id)
    client.retry(posting.id)
    conn.execute(
        "UPDATE pdoflowd.daemons SET heartbeat_at = now() - interval '2 min'"
    )
    [rescued] = upkeep.take_back_ownerless_jobs(conn, may_declare_lost=True)
    assert (rescued.job_id, rescued.status) == (job.id, JobStatus.WAITING)
    row = jobs_of(conn, posting.id)[0]
    assert (row["owner"], row["tries_remaining"]) == (None, 2)


def test_rescuing_a_lost_host_ends_its_cancelled_claims(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1]])
    lost = uuid.uuid4()
    upkeep.heartbeat(
        conn, daemon_id=lost, hostname="gone", pid=1, version="0", lease_s=60
    )
    owner = uuid.uuid4()
    queue.claim(conn, owner=owner, daemon_id=lost, limit=1)
    client.cancel(posting.id)
    assert jobs_of(conn, posting.id)[0]["owner"] == owner
    conn.execute(
        "UPDATE pdoflowd.daemons SET heartbeat_at = now() - interval '2 min'"
    )
    assert upkeep.take_back_ownerless_jobs(conn, may_declare_lost=True) == []
    row = jobs_of(conn, posting.id)[0]
    assert (row["status"], row["owner"]) == ("errored_out", None)


def test_a_cancel_tells_the_daemons_at_once(dsn: str, conn: Any) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1]])
    conn.execute(f"LISTEN {common.CANCEL_CHANNEL}")
    client.cancel(posting.id)
    [heard] = list(conn.notifies(timeout=5, stop_after=1))
    assert heard.payload == str(jobs_of(conn, posting.id)[0]["posting_id"])


def test_a_worker_learns_which_of_its_claims_a_cancel_ended(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    doomed = client.post("jobfns.noop", [[1], [2]])
    client.post("jobfns.noop", [[3]])
    owner = uuid.uuid4()
    jobs = claim(conn, 3, owner)
    assert queue.held_claims(conn, owner=owner, jobs=jobs) == {
        j.id for j in jobs
    }
    client.cancel(doomed.id)
    kept = {j.id for j in jobs if j.posting_uuid != doomed.id}
    assert queue.held_claims(conn, owner=owner, jobs=jobs) == kept
    assert upkeep.cancelled_claim_owners(conn, daemon_id=DAEMON) == {owner}
    gone = [(j.id, j.attempt) for j in jobs if j.id not in kept]
    assert queue.give_up_claims(conn, owner=owner, claims=gone) == 2
    assert upkeep.cancelled_claim_owners(conn, daemon_id=DAEMON) == set()


def test_a_cancelled_claim_no_live_worker_holds_is_given_up_by_the_sweep(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1]])
    owner = uuid.uuid4()
    claim(conn, 1, owner)
    client.cancel(posting.id)
    assert jobs_of(conn, posting.id)[0]["owner"] == owner
    # Two heartbeats of its daemon since the claim, neither listing it.
    for _ in range(2):
        upkeep.heartbeat(
            conn, daemon_id=DAEMON, hostname="h", pid=1, version="0", lease_s=60
        )
    assert upkeep.take_back_ownerless_jobs(conn, may_declare_lost=False) == []
    row = jobs_of(conn, posting.id)[0]
    assert (row["status"], row["owner"], row["error"]) == (
        "errored_out",
        None,
        "cancelled",
    )


# ---------------------------------------------------------------- workers


def runs(dsn: str, key: str, note: str | None = None) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT pid FROM effects WHERE key = %s"
                " AND (%s::text IS NULL OR note = %s) ORDER BY id",
                (key, note, note),
            ).fetchall()
        ]


def post_behind_a_long_job(dsn: str, seconds: float) -> tuple[Posting, Posting]:
    """A long job and, behind it, three short ones that one worker claims
    in the same batch: it has run jobs before (so it claims batches), and
    the two postings commit together."""
    client = Client(dsn)
    warm_up = client.post("jobfns.noop", [[i] for i in range(3)])
    wait_until(lambda: client.status(warm_up.id).finished)
    with psycopg.connect(dsn) as conn:
        first = client.post("jobfns.sleep", [[seconds, "first"]], conn=conn)
        doomed = client.post("jobfns.sleep", [[0.05, "doomed"]] * 3, conn=conn)
    wait_until(lambda: runs(dsn, "first", "start"))
    return first, doomed


def test_jobs_claimed_before_a_cancel_do_not_start_after_it(
    effects_dsn: str, daemons: Any
) -> None:
    client = Client(effects_dsn)
    daemons(workers={"count": 1, "batch_size": 5})
    first, doomed = post_behind_a_long_job(effects_dsn, 1.5)
    with psycopg.connect(effects_dsn) as conn:
        claimed = {r["status"] for r in jobs_of(conn, doomed.id)}
    assert claimed == {"executing"}
    client.cancel(doomed.id)
    wait_until(lambda: client.status(first.id).finished)
    time.sleep(1.0)
    assert runs(effects_dsn, "doomed") == []
    with psycopg.connect(effects_dsn) as conn:
        rows = jobs_of(conn, doomed.id)
    assert {(r["status"], r["error"], r["owner"]) for r in rows} == {
        ("errored_out", "cancelled", None)
    }


def test_a_worker_told_of_a_cancel_drops_those_jobs_before_its_next(
    effects_dsn: str, daemons: Any
) -> None:
    client = Client(effects_dsn)
    daemon = daemons(workers={"count": 1, "batch_size": 5})
    first, doomed = post_behind_a_long_job(effects_dsn, 0.8)
    [pid] = daemon.workers()
    client.cancel(doomed.id)
    # What the supervisor does when it hears of a cancel.
    os.kill(pid, worker.CLAIMS_SIGNAL)
    wait_until(lambda: client.status(first.id).finished)
    time.sleep(0.5)
    assert runs(effects_dsn, "doomed") == []
    assert daemon.workers() == [pid]
