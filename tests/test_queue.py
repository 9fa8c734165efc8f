"""The queue's SQL against a real PostgreSQL: claim, outcomes, fencing."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from plans import claim_plan, nested_plans

from pdoflowd.client import Client
from pdoflowd.db import postings, queue, upkeep
from pdoflowd.status import JobStatus, PostingStatus

DAEMON = uuid.uuid4()


@pytest.fixture
def conn(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


def post(dsn: str, n: int, priority: Any = 0, tries: int = 3) -> uuid.UUID:
    posting = Client(dsn).post(
        "jobfns.noop", [[i] for i in range(n)], priority=priority, tries=tries
    )
    return posting.id


def claim(conn: Any, limit: int, owner: uuid.UUID | None = None) -> list[Any]:
    return queue.claim(
        conn, owner=owner or uuid.uuid4(), daemon_id=DAEMON, limit=limit
    )


def now() -> float:
    return time.time()


def finish(
    conn: Any, owner: uuid.UUID, jobs: list[Any], kind: str = "done"
) -> list[queue.RecordedOutcome]:
    outcomes = [
        queue.Outcome(
            j.id,
            j.attempt,
            kind,
            now(),
            now(),
            error=None if kind == "done" else "boom",
        )
        for j in jobs
    ]
    return queue.record_outcomes(conn, owner=owner, outcomes=outcomes)


def db_now(conn: Any) -> dt.datetime:
    """The database's clock (not the transaction's start)."""
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def job_row(conn: Any, job_id: int) -> dict[str, Any]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    row = cur.execute(
        "SELECT * FROM pdoflowd.jobs WHERE id = %s", (job_id,)
    ).fetchone()
    assert row is not None
    return dict(row)


def test_claim_takes_highest_priority_first(dsn: str, conn: Any) -> None:
    post(dsn, 3, priority=[1, 5, 3])
    jobs = claim(conn, 3)
    assert [j.priority for j in jobs] == [5, 3, 1]


def test_claim_is_fifo_within_a_priority(dsn: str, conn: Any) -> None:
    first = post(dsn, 4)
    second = post(dsn, 4)
    jobs = claim(conn, 8)
    assert [j.posting_uuid for j in jobs] == [first] * 4 + [second] * 4
    assert [j.posargs_json for j in jobs] == ["[0]", "[1]", "[2]", "[3]"] * 2


def test_claim_respects_limit_and_marks_executing(dsn: str, conn: Any) -> None:
    post(dsn, 5)
    owner = uuid.uuid4()
    jobs = claim(conn, 2, owner)
    assert len(jobs) == 2
    for j in jobs:
        row = job_row(conn, j.id)
        assert row["status"] == "executing"
        assert row["owner"] == owner
        assert row["attempt"] == 1
        assert row["daemon_id"] == DAEMON


def test_claim_skips_paused_postings(dsn: str, conn: Any) -> None:
    Client(dsn).post("jobfns.noop", [[1]], paused=True)
    assert claim(conn, 10) == []


def test_claim_skips_jobs_not_yet_due(dsn: str, conn: Any) -> None:
    post(dsn, 1)
    conn.execute(
        "UPDATE pdoflowd.jobs SET run_after = now() + interval '1 hour'"
    )
    assert claim(conn, 10) == []


def test_concurrent_claims_take_each_job_exactly_once(
    dsn: str, conn: Any
) -> None:
    total = 400
    post(dsn, total)
    claimed: list[list[int]] = [[] for _ in range(6)]
    barrier = threading.Barrier(6)

    def claimer(index: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as own:
            barrier.wait()
            while True:
                got = claim(own, 7)
                if not got:
                    return
                claimed[index].extend(j.id for j in got)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for ids in claimed for i in ids]
    assert len(every) == total
    assert len(set(every)) == total
    assert sum(1 for ids in claimed if ids) > 1


def test_done_outcome_records_completion(dsn: str, conn: Any) -> None:
    post(dsn, 1)
    owner = uuid.uuid4()
    [job] = claim(conn, 1, owner)
    [recorded] = finish(conn, owner, [job])
    assert recorded.status is JobStatus.DONE
    row = job_row(conn, job.id)
    assert row["status"] == "done"
    assert row["exited_ok"] is True
    assert row["completed_at"] is not None
    assert row["tries_remaining"] == 3


def test_failure_uses_a_try_and_waits_again(dsn: str, conn: Any) -> None:
    post(dsn, 1, tries=3)
    owner = uuid.uuid4()
    [job] = claim(conn, 1, owner)
    [recorded] = finish(conn, owner, [job], kind="failed")
    assert recorded.status is JobStatus.WAITING
    row = job_row(conn, job.id)
    assert row["tries_remaining"] == 2
    assert row["error"] == "boom"
    assert row["owner"] is None


def test_last_try_failing_errors_the_job_out(dsn: str, conn: Any) -> None:
    post(dsn, 1, tries=2)
    for expected in (JobStatus.WAITING, JobStatus.ERRORED_OUT):
        owner = uuid.uuid4()
        [job] = claim(conn, 1, owner)
        [recorded] = finish(conn, owner, [job], kind="failed")
        assert recorded.status is expected
    row = job_row(conn, job.id)
    assert row["tries_remaining"] == 0
    assert row["exited_ok"] is False
    assert row["attempt"] == 2


def test_released_job_waits_again_without_using_a_try(
    dsn: str, conn: Any
) -> None:
    post(dsn, 1)
    owner = uuid.uuid4()
    [job] = claim(conn, 1, owner)
    [recorded] = finish(conn, owner, [job], kind="released")
    assert recorded.status is JobStatus.WAITING
    assert job_row(conn, job.id)["tries_remaining"] == 3


def test_outcome_times_and_texts_are_stored_exactly(
    dsn: str, conn: Any
) -> None:
    post(dsn, 2, tries=3)
    owner = uuid.uuid4()
    done, failed = claim(conn, 2, owner)
    before = db_now(conn)
    base = dt.datetime(2026, 11, 26, 14, 7, 3, tzinfo=dt.timezone.utc)
    started = base + dt.timedelta(microseconds=999_999)
    completed = base + dt.timedelta(seconds=1, microseconds=1)
    delay = dt.timedelta(days=400, microseconds=123_457)
    error = 'ValueError: "quoted" \\ back\\slash, tab\t, newline\n, é, 💥'
    tb = "Traceback (most recent call last):\n  …\n" + error
    queue.record_outcomes(
        conn,
        owner=owner,
        outcomes=[
            queue.Outcome(
                done.id,
                done.attempt,
                "done",
                started.timestamp(),
                completed.timestamp(),
                result='{"x": [1.5, "two"]}',
            ),
            queue.Outcome(
                failed.id,
                failed.attempt,
                "failed",
                started.timestamp(),
                completed.timestamp(),
                error=error,
                traceback=tb,
                retry_delay_s=delay.total_seconds(),
            ),
        ],
    )
    after = db_now(conn)
    row = job_row(conn, done.id)
    assert (row["work_started_at"], row["completed_at"]) == (started, completed)
    assert row["result"] == {"x": [1.5, "two"]}
    row = job_row(conn, failed.id)
    assert (row["error"], row["traceback"]) == (error, tb)
    assert before + delay <= row["run_after"] <= after + delay


def test_error_texts_postgresql_refuses_are_spelt_out(
    dsn: str, conn: Any
) -> None:
    post(dsn, 1, tries=1)
    owner = uuid.uuid4()
    [job] = claim(conn, 1, owner)
    undecodable = b"caf\xe9".decode("utf-8", "surrogateescape")
    [recorded] = queue.record_outcomes(
        conn,
        owner=owner,
        outcomes=[
            queue.Outcome(
                job.id,
                job.attempt,
                "failed",
                now(),
                now(),
                error="NUL\x00 in " + undecodable,
                traceback="x\x00y",
            )
        ],
    )
    assert recorded.status is JobStatus.ERRORED_OUT
    row = job_row(conn, job.id)
    assert row["error"] == "NUL\\x00 in caf\\udce9"
    assert row["traceback"] == "x\\x00y"


def test_claim_and_outcome_commit_at_once_without_autocommit(
    dsn: str, conn: Any
) -> None:
    post(dsn, 1)
    owner = uuid.uuid4()
    with psycopg.connect(dsn) as own:
        [job] = claim(own, 1, owner)
        assert job_row(conn, job.id)["status"] == "executing"
        finish(own, owner, [job])
        assert job_row(conn, job.id)["status"] == "done"


def test_outcome_of_another_owner_changes_nothing(dsn: str, conn: Any) -> None:
    post(dsn, 1)
    [job] = claim(conn, 1, uuid.uuid4())
    assert finish(conn, uuid.uuid4(), [job]) == []
    assert job_row(conn, job.id)["status"] == "executing"


def test_late_outcome_after_rescue_and_reclaim_is_fenced_off(
    dsn: str, conn: Any
) -> None:
    post(dsn, 1)
    owner = uuid.uuid4()
    [job] = claim(conn, 1, owner)
    queue.requeue_owner(
        conn,
        daemon_id=DAEMON,
        owner=owner,
        running_job_id=job.id,
        reason="worker died: signal 9 (SIGKILL)",
    )
    # The same owner claims it again: the old claim's outcome must not land.
    [again] = claim(conn, 1, owner)
    assert again.attempt == job.attempt + 1
    assert finish(conn, owner, [job]) == []
    assert job_row(conn, job.id)["status"] == "executing"
    assert len(finish(conn, owner, [again])) == 1


def test_requeue_uses_a_try_only_for_the_running_job(
    dsn: str, conn: Any
) -> None:
    post(dsn, 3)
    owner = uuid.uuid4()
    running, *unstarted = claim(conn, 3, owner)
    requeued = queue.requeue_owner(
        conn,
        daemon_id=DAEMON,
        owner=owner,
        running_job_id=running.id,
        reason="worker died: signal 9 (SIGKILL)",
    )
    assert {r.job_id for r in requeued} == {running.id} | {
        j.id for j in unstarted
    }
    row = job_row(conn, running.id)
    assert (row["status"], row["tries_remaining"]) == ("waiting", 2)
    assert row["error"] == "worker died: signal 9 (SIGKILL)"
    for j in unstarted:
        row = job_row(conn, j.id)
        assert (row["status"], row["tries_remaining"]) == ("waiting", 3)
        assert row["error"] is None


def test_settle_finishes_a_posting_with_nothing_left(
    dsn: str, conn: Any
) -> None:
    posting = post(dsn, 2)
    owner = uuid.uuid4()
    jobs = claim(conn, 2, owner)
    recorded = finish(conn, owner, jobs)
    settled = queue.settle_postings(
        conn, {r.posting_id for r in recorded}, error_threshold=10
    )
    assert list(settled.values()) == [PostingStatus.FINISHED]
    progress = postings.posting_progress(conn, posting)
    assert progress is not None
    assert progress.status is PostingStatus.FINISHED


def test_settle_leaves_a_posting_with_work_left(dsn: str, conn: Any) -> None:
    post(dsn, 2)
    owner = uuid.uuid4()
    jobs = claim(conn, 1, owner)
    recorded = finish(conn, owner, jobs)
    assert (
        queue.settle_postings(
            conn, {r.posting_id for r in recorded}, error_threshold=10
        )
        == {}
    )


def test_posting_errors_out_at_the_threshold(dsn: str, conn: Any) -> None:
    posting = post(dsn, 6, tries=1)
    owner = uuid.uuid4()
    jobs = claim(conn, 3, owner)
    recorded = finish(conn, owner, jobs, kind="failed")
    settled = queue.settle_postings(
        conn, {r.posting_id for r in recorded}, error_threshold=3
    )
    assert list(settled.values()) == [PostingStatus.ERRORED_OUT]
    # Its remaining jobs are not started.
    assert claim(conn, 10) == []
    progress = postings.posting_progress(conn, posting)
    assert progress is not None
    assert progress.jobs[JobStatus.WAITING] == 3


def test_settling_reads_the_posting_s_jobs_not_the_table(
    dsn: str, conn: Any
) -> None:
    # Statistics taken while a large posting waited: the planner takes
    # every job for waiting, and would answer "any job left?" by a scan
    # of the whole table, which after the drain matches no row.
    post(dsn, 2000)
    conn.execute("ANALYZE pdoflowd.jobs")
    conn.execute("UPDATE pdoflowd.jobs SET status = 'done'")
    posting = post(dsn, 1)
    conn.execute("UPDATE pdoflowd.jobs SET status = 'done'")
    [(posting_id,)] = conn.execute(
        "SELECT id FROM pdoflowd.postings WHERE uuid = %s", (posting,)
    ).fetchall()
    plans = nested_plans(
        conn,
        lambda: queue.settle_postings(conn, [posting_id], error_threshold=10),
    )
    text = "\n".join(plans)
    assert "jobs_posting_status" in text, text
    assert "Seq Scan on jobs" not in text, text


def test_unsettled_postings_are_found_by_the_sweep(dsn: str, conn: Any) -> None:
    post(dsn, 1)
    owner = uuid.uuid4()
    finish(conn, owner, claim(conn, 1, owner))
    [posting_id] = queue.unsettled_postings(conn)
    queue.settle_postings(conn, [posting_id], error_threshold=10)
    assert queue.unsettled_postings(conn) == []


def test_lost_daemon_jobs_are_rescued_with_a_try_used(
    dsn: str, conn: Any
) -> None:
    post(dsn, 2)
    lost = uuid.uuid4()
    upkeep.heartbeat(
        conn, daemon_id=lost, hostname="gone", pid=1, version="0", lease_s=60
    )
    jobs = queue.claim(conn, owner=uuid.uuid4(), daemon_id=lost, limit=2)
    assert upkeep.take_back_ownerless_jobs(conn, may_declare_lost=True) == []
    conn.execute(
        "UPDATE pdoflowd.daemons SET heartbeat_at = now() - interval '2 min'"
    )
    rescued = upkeep.take_back_ownerless_jobs(conn, may_declare_lost=True)
    assert {r.job_id for r in rescued} == {j.id for j in jobs}
    row = job_row(conn, jobs[0].id)
    assert row["status"] == "waiting"
    assert row["tries_remaining"] == 2
    assert "missed its heartbeat" in row["error"]
    # The lost daemon comes back: its heartbeat says it had been lost.
    assert (
        upkeep.heartbeat(
            conn,
            daemon_id=lost,
            hostname="gone",
            pid=1,
            version="0",
            lease_s=60,
        )
        is not None
    )


def test_progress_counts_jobs_per_status(dsn: str, conn: Any) -> None:
    posting = post(dsn, 4)
    owner = uuid.uuid4()
    jobs = claim(conn, 2, owner)
    finish(conn, owner, jobs[:1])
    progress = postings.posting_progress(conn, posting)
    assert progress is not None
    assert progress.jobs == {
        JobStatus.WAITING: 2,
        JobStatus.EXECUTING: 1,
        JobStatus.DONE: 1,
        JobStatus.ERRORED_OUT: 0,
        JobStatus.HELD: 0,
    }


def test_claim_uses_the_partial_index(dsn: str, conn: Any) -> None:
    post(dsn, 200)
    conn.execute("ANALYZE pdoflowd.jobs")
    plan = claim_plan(
        nested_plans(
            conn,
            lambda: queue.claim(
                conn,
                owner=uuid.uuid4(),
                daemon_id=DAEMON,
                limit=5,
                provides=["gpu"],
            ),
        )
    )
    assert "jobs_claim" in plan
