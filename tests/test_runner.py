"""The job runner and the outcome buffer (pdoflowd.daemon.runner).

The runner is driven in this process with job functions of a module
written for the test; the buffer writes to a real PostgreSQL.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from pdoflowd import policy
from pdoflowd.client import Client
from pdoflowd.config import Config, JobsConfig
from pdoflowd.daemon.runner import (
    RECORD_OUTCOMES,
    Interrupted,
    JobRunner,
    OutcomeBuffer,
    RunResult,
)
from pdoflowd.db import queue
from pdoflowd.status import JobStatus, OutcomeKind, PostingStatus

T = TypeVar("T")

JOBS = """
from pdoflowd import job
from pdoflowd.daemon.runner import JobTimeout

@job(store_result=True)
def add(a, b):
    return a + b

@job()
def fail(text):
    raise ValueError(text)

@job()
def overrun():
    raise JobTimeout

@job()
def interrupted():
    raise KeyboardInterrupt

def unmarked():
    return 1
"""


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"runnerjobs_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(JOBS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def make_runner(
    module: str,
    on_start: Callable[[queue.ClaimedJob, float], None] | None = None,
    **jobs: Any,
) -> JobRunner:
    config = Config(jobs=JobsConfig(allowed_modules=(module,), **jobs))
    return JobRunner(
        config, None, _no_connection, on_start=on_start or _not_watched
    )


def _no_connection() -> psycopg.Connection[Any]:
    raise AssertionError("no profile is sampled: nothing connects")


def _not_watched(job: queue.ClaimedJob, began: float) -> None:
    pass


def claimed(
    entry_point: str,
    *args: Any,
    attempt: int = 1,
    timeout_s: float | None = None,
    store_result: bool = False,
) -> queue.ClaimedJob:
    return queue.ClaimedJob(
        id=7,
        uuid=uuid.uuid4(),
        posting_id=3,
        posting_uuid=uuid.uuid4(),
        entry_point=entry_point,
        priority=0,
        attempt=attempt,
        tries_remaining=3,
        posargs_json=json.dumps(list(args)),
        kwargs_json="{}",
        timeout_s=timeout_s,
        runnable_since=time.time() - 2,
        store_result=store_result,
    )


# ------------------------------------------------------------ one job


def test_a_job_that_returns_is_done_with_its_result(module: str) -> None:
    result = make_runner(module).run(
        claimed(f"{module}.add", 2, 3, store_result=True), uuid.uuid4()
    )
    assert type(result) is RunResult
    outcome = result.outcome
    assert (outcome.kind, outcome.result, outcome.error) == (
        OutcomeKind.DONE,
        "5",
        None,
    )
    assert outcome.started is not None and outcome.completed is not None
    assert outcome.started <= outcome.completed
    assert result.waited_s >= 2
    assert not result.timed_out


def test_a_job_that_raises_fails_with_the_policy_retry_delay(
    module: str,
) -> None:
    runner = make_runner(module, retry_delay_s=1.5, retry_delay_max_s=60)
    result = runner.run(
        claimed(f"{module}.fail", "bad", attempt=3), uuid.uuid4()
    )
    outcome = result.outcome
    assert outcome.kind is OutcomeKind.FAILED
    assert outcome.error == "ValueError: bad"
    assert outcome.traceback is not None and "ValueError: bad" in (
        outcome.traceback
    )
    assert outcome.retry_delay_s == policy.retry_delay(3, 1.5, 60)


def test_a_job_past_its_deadline_times_out(module: str) -> None:
    result = make_runner(module).run(
        claimed(f"{module}.overrun", timeout_s=2.5), uuid.uuid4()
    )
    assert result.outcome.kind is OutcomeKind.TIMEOUT
    assert result.outcome.error == "timeout after 2.5 s"
    assert result.timed_out


def test_an_entry_point_outside_the_rule_is_refused(module: str) -> None:
    runner = make_runner(module)
    result = runner.run(claimed(f"{module}.unmarked"), uuid.uuid4())
    assert result.outcome.kind is OutcomeKind.REFUSED
    assert (result.outcome.error or "").startswith("refused: ")


def test_ctrl_c_is_told_apart_from_a_failure(module: str) -> None:
    result = make_runner(module).run(
        claimed(f"{module}.interrupted", attempt=2), uuid.uuid4()
    )
    assert isinstance(result, Interrupted)
    # What a worker records: a failure, like any other exception.
    assert result.outcome.kind is OutcomeKind.FAILED
    assert (result.outcome.error or "").startswith("KeyboardInterrupt")
    # What a run by hand records: the job back, no try used.
    assert result.given_back == queue.Outcome(7, 2, OutcomeKind.RELEASED)


def test_the_deadline_is_set_while_the_job_runs_and_cleared_after(
    module: str,
) -> None:
    seen: list[tuple[int, float, float]] = []
    runner: JobRunner

    def on_start(job: queue.ClaimedJob, began: float) -> None:
        seen.append((job.id, began, runner.deadline))

    runner = make_runner(module, on_start=on_start, timeout_s=30)
    runner.run(claimed(f"{module}.add", 1, 1), uuid.uuid4())
    [(job_id, began, deadline)] = seen
    assert job_id == 7
    assert deadline == began + 30
    assert runner.deadline == 0.0
    runner.run(claimed(f"{module}.add", 1, 1, timeout_s=4), uuid.uuid4())
    assert seen[1][2] == seen[1][1] + 4, "the posting's timeout comes first"


def test_an_entry_point_is_resolved_once_per_process(module: str) -> None:
    runner = make_runner(module)
    function = runner.resolve(f"{module}.add")
    assert runner.resolve(f"{module}.add") is function
    assert f"{module}.add" in runner.functions


# ------------------------------------------------------------ the buffer


class Session:
    """A Database for the buffer: one connection, every operation noted."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.operations: list[str] = []

    def connect(self) -> psycopg.Connection[Any]:
        return self.conn

    def with_database(self, what: str, action: Callable[[], T]) -> T:
        self.operations.append(what)
        return action()


@pytest.fixture
def session(dsn: str) -> Iterator[Session]:
    db = Session(dsn)
    yield db
    db.conn.close()


def claim_all(buffer: OutcomeBuffer, session: Session) -> list[Any]:
    return queue.claim(
        session.conn,
        owner=buffer.new_claim(),
        daemon_id=uuid.uuid4(),
        limit=100,
    )


def status_of(session: Session, job_id: int) -> tuple[str, Any]:
    row = session.conn.execute(
        "SELECT status, owner FROM pdoflowd.jobs WHERE id = %s", (job_id,)
    ).fetchone()
    assert row is not None
    return row[0], row[1]


def test_a_flush_writes_under_the_claims_token_and_settles_later(
    dsn: str, session: Session
) -> None:
    posting = Client(dsn).post("jobfns.noop", [[1], [2]])
    events: list[Any] = []
    buffer = OutcomeBuffer(
        session,
        flush_window_s=0.0,
        error_threshold=10,
        on_flush=lambda: events.append("flushing"),
        on_recorded=events.append,
    )
    jobs = claim_all(buffer, session)
    for job in jobs:
        buffer.add(queue.Outcome(job.id, job.attempt, OutcomeKind.DONE))
    assert buffer.flush_due()
    buffer.flush()
    assert events[0] == "flushing"
    recorded = events[1]
    assert {(r.job_id, r.kind, r.status) for r in recorded} == {
        (job.id, OutcomeKind.DONE, JobStatus.DONE) for job in jobs
    }
    assert session.operations == [RECORD_OUTCOMES]
    assert Client(dsn).status(posting.id).status is PostingStatus.EXECUTING
    buffer.settle()
    assert Client(dsn).status(posting.id).status is PostingStatus.FINISHED


def test_a_new_claim_keeps_the_last_claims_token_for_its_outcomes(
    session: Session,
) -> None:
    buffer = OutcomeBuffer(session, flush_window_s=0.0, error_threshold=10)
    first = buffer.new_claim()
    buffer.add(queue.Outcome(1, 1, OutcomeKind.DONE))
    second = buffer.new_claim()
    assert (buffer.claim_token(), buffer.writing_token()) == (second, first)
    assert buffer.finishing == first
    with pytest.raises(AssertionError):
        buffer.add(queue.Outcome(2, 1, OutcomeKind.DONE))
    # A claim begun again (its reply was lost) still writes them as first's.
    third = buffer.new_claim()
    assert (buffer.claim_token(), buffer.finishing) == (third, first)


def claim_with_outcomes(
    dsn: str, session: Session, events: list[Any]
) -> tuple[OutcomeBuffer, list[queue.ClaimedJob], uuid.UUID]:
    """A buffer holding the outcome of one claimed job, done, and a new
    claim begun."""
    Client(dsn).post("jobfns.noop", [[1], [2], [3]])
    buffer = OutcomeBuffer(
        session,
        flush_window_s=1.0,
        error_threshold=10,
        on_recorded=events.append,
    )
    first = buffer.new_claim()
    jobs = queue.claim(
        session.conn, owner=first, daemon_id=uuid.uuid4(), limit=1
    )
    return buffer, jobs, first


def record_and_claim(session: Session, buffer: OutcomeBuffer) -> Any:
    owner = buffer.claim_token()
    return lambda finishing, outcomes: queue.record_and_claim(
        session.conn,
        finishing=finishing,
        outcomes=outcomes,
        owner=owner,
        daemon_id=uuid.uuid4(),
        limit=5,
    )


def test_the_next_claim_writes_the_kept_outcomes_in_its_statement(
    dsn: str, session: Session
) -> None:
    events: list[Any] = []
    buffer, [ran], first = claim_with_outcomes(dsn, session, events)
    buffer.add(queue.Outcome(ran.id, ran.attempt, OutcomeKind.DONE))
    second = buffer.new_claim()
    jobs = buffer.claim_with(record_and_claim(session, buffer))
    assert session.operations == [], "no statement of its own"
    assert [(r.job_id, r.status) for r in events[0]] == [
        (ran.id, JobStatus.DONE)
    ]
    assert not buffer.pending and buffer.finishing is None
    assert buffer.unsettled == {ran.posting_id}
    assert len(jobs) == 2
    for job in jobs:
        assert status_of(session, job.id) == ("executing", second)
    assert status_of(session, ran.id) == ("done", first)


def test_an_outcome_the_database_refuses_is_written_alone_then_the_claim(
    dsn: str, session: Session
) -> None:
    events: list[Any] = []
    buffer, [ran], _ = claim_with_outcomes(dsn, session, events)
    buffer.add(queue.Outcome(ran.id, ran.attempt, OutcomeKind.DONE, result="{"))
    second = buffer.new_claim()
    jobs = buffer.claim_with(record_and_claim(session, buffer))
    # Errored out, its posting is settled at once.
    assert session.operations == [RECORD_OUTCOMES, "settle postings"]
    assert status_of(session, ran.id)[0] == "errored_out"
    assert len(jobs) == 2
    for job in jobs:
        assert status_of(session, job.id) == ("executing", second)


def test_a_lost_claim_keeps_the_outcomes_for_the_next_try(
    dsn: str, session: Session
) -> None:
    events: list[Any] = []
    buffer, [ran], first = claim_with_outcomes(dsn, session, events)
    outcome = queue.Outcome(ran.id, ran.attempt, OutcomeKind.DONE)
    buffer.add(outcome)
    buffer.new_claim()

    def lost(finishing: Any, outcomes: Any) -> Any:
        raise psycopg.OperationalError("the reply was lost")

    with pytest.raises(psycopg.OperationalError):
        buffer.claim_with(lost)
    assert buffer.pending == [outcome] and buffer.finishing == first
    buffer.new_claim()
    buffer.claim_with(record_and_claim(session, buffer))
    assert status_of(session, ran.id) == ("done", first)


def test_an_outcome_fenced_off_gives_its_claim_up(
    dsn: str, session: Session
) -> None:
    posting = Client(dsn).post("jobfns.noop", [[1], [2]])
    buffer = OutcomeBuffer(session, flush_window_s=1.0, error_threshold=10)
    jobs = claim_all(buffer, session)
    Client(dsn).cancel(posting.id)
    for job in jobs:
        buffer.add(queue.Outcome(job.id, job.attempt, OutcomeKind.DONE))
    assert not buffer.flush_due(), "the window has not passed"
    buffer.flush()
    for job in jobs:
        assert status_of(session, job.id) == ("errored_out", None)
    assert session.operations == [RECORD_OUTCOMES, RECORD_OUTCOMES]


def test_lost_claims_are_given_up_and_must_not_start(
    dsn: str, session: Session
) -> None:
    posting = Client(dsn).post("jobfns.noop", [[1], [2]])
    other = Client(dsn).post("jobfns.noop", [[3]])
    buffer = OutcomeBuffer(session, flush_window_s=0.0, error_threshold=10)
    jobs = claim_all(buffer, session)
    Client(dsn).cancel(posting.id)
    lost = buffer.drop_lost_claims(jobs)
    assert lost == {j.id for j in jobs if j.posting_uuid == posting.id}
    assert len(lost) == 2
    for job in jobs:
        status, owner = status_of(session, job.id)
        if job.id in lost:
            assert (status, owner) == ("errored_out", None)
        else:
            assert (status, owner) == ("executing", buffer.claim_token())
    assert Client(dsn).status(other.id).status is PostingStatus.EXECUTING


def test_released_jobs_wait_again_without_using_a_try(
    dsn: str, session: Session
) -> None:
    Client(dsn).post("jobfns.noop", [[1]], tries=2)
    buffer = OutcomeBuffer(session, flush_window_s=0.0, error_threshold=10)
    [job] = claim_all(buffer, session)
    buffer.release([job])
    buffer.flush()
    row = session.conn.execute(
        "SELECT status, tries_remaining FROM pdoflowd.jobs WHERE id = %s",
        (job.id,),
    ).fetchone()
    assert row == ("waiting", 2)
