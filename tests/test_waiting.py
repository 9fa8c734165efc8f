"""Waiting for part of a posting (``Client.wait_for``), with the jobs moved
by SQL from the test, against a real PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from pdoflowd.client import Client, PostingEnded, WaitTimeout
from pdoflowd.status import JobStatus


def set_jobs(dsn: str, *statuses: str) -> None:
    """Give the posting's jobs these statuses, in job order."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        ids = [
            r[0]
            for r in conn.execute("SELECT id FROM pdoflowd.jobs ORDER BY id")
        ]
        for job_id, status in zip(ids, statuses, strict=False):
            conn.execute(
                "UPDATE pdoflowd.jobs SET status = %s WHERE id = %s",
                (status, job_id),
            )


def later(seconds: float, action: Any) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        action()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_wait_for_returns_when_a_fraction_of_the_jobs_ended(dsn: str) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[i] for i in range(4)])
    set_jobs(dsn, "done")
    mover = later(0.3, lambda: set_jobs(dsn, "done", "errored_out"))
    state = client.wait_for(
        posting.id, fraction=0.5, timeout=10, poll_interval=0.05
    )
    mover.join()
    assert state.ended == 2
    assert state.fraction_ended == 0.5
    assert not state.finished


def test_wait_for_counts_only_the_statuses_asked_for(dsn: str) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[i] for i in range(4)])
    set_jobs(dsn, "errored_out", "errored_out", "done")
    with pytest.raises(WaitTimeout):
        client.wait_for(
            posting.id,
            status=JobStatus.DONE,
            count=2,
            timeout=0.3,
            poll_interval=0.05,
        )
    set_jobs(dsn, "errored_out", "errored_out", "done", "done")
    state = client.wait_for(
        posting.id, status=JobStatus.DONE, count=2, timeout=5
    )
    assert state.jobs[JobStatus.DONE] == 2


def test_wait_for_by_default_waits_for_every_job_to_end(dsn: str) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1], [2]])
    set_jobs(dsn, "done", "executing")
    with pytest.raises(WaitTimeout) as caught:
        client.wait_for(posting.id, timeout=0.2, poll_interval=0.05)
    assert caught.value.state.ended == 1
    set_jobs(dsn, "done", "done")
    assert client.wait_for(posting.id, timeout=5).ended == 2


def test_wait_for_can_wait_for_running_jobs(dsn: str) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1], [2]])
    set_jobs(dsn, "executing")
    state = client.wait_for(
        posting.id, status=[JobStatus.EXECUTING], count=1, timeout=5
    )
    assert state.jobs[JobStatus.EXECUTING] == 1


def test_wait_for_gives_up_once_the_posting_ended_short_of_it(
    dsn: str,
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1], [2], [3]])
    set_jobs(dsn, "done")
    client.cancel(posting.id)
    with pytest.raises(PostingEnded) as caught:
        client.wait_for(posting.id, status=JobStatus.DONE, fraction=1.0)
    assert caught.value.state.jobs[JobStatus.ERRORED_OUT] == 2


@pytest.mark.parametrize(
    "options",
    [
        {"fraction": 0.5, "count": 1},
        {"fraction": 1.5},
        {"fraction": -0.1},
        {"count": -1},
        {"count": 1.5},
        {"status": "finished"},
        {"status": []},
    ],
)
def test_wait_for_refuses_a_threshold_that_means_nothing(
    dsn: str, options: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        Client(dsn).wait_for(uuid.uuid4(), timeout=1, **options)
