"""Posting dependencies in the real daemon: a chain runs level by level, a
failing upstream cancels what waits for it, a fan-in job reads what its
upstream postings returned, and the maintenance releases a dependent whose
release a race left undone."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import flowjobs
import psycopg
import pytest

from harness import Daemon, create_effects_table, daemon_config, wait_until
from pdoflowd.client import Client
from pdoflowd.status import JobStatus, PostingStatus

assert flowjobs.square  # its @job definition (stores results) is known


@pytest.fixture(scope="module")
def database(pg_server: Any, pdoflowd_template: str) -> Iterator[str]:
    name = "t_flows_" + uuid.uuid4().hex[:10]
    dsn = pg_server.create_database(name, template=pdoflowd_template)
    try:
        yield dsn
    finally:
        pg_server.drop_database(name)


@pytest.fixture(scope="module")
def daemon(
    database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    create_effects_table(database)
    config = daemon_config(
        database,
        workers={"count": 2, "batch_size": 5},
        # One errored job errors its posting out (what "failed" means to
        # the postings that wait for it).
        jobs={
            "allowed_modules": ["jobfns", "flowjobs"],
            "posting_error_threshold": 1,
        },
    )
    started = Daemon(
        tmp_path_factory.mktemp("flows"), config, effects_dsn=database
    )
    try:
        yield started.start().wait_ready()
        assert started.stop() == 0
    finally:
        started.close()


@pytest.fixture
def client(database: str, daemon: Daemon) -> Client:
    return Client(database)


def _ended(client: Client, posting: uuid.UUID) -> PostingStatus | None:
    status = client.status(posting).status
    return status if status.is_final else None


def test_a_three_level_chain_finishes_in_order(
    client: Client, database: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    first = client.post("jobfns.record", [[f"{tag}-1-{i}"] for i in range(6)])
    second = client.post(
        "jobfns.record", [[f"{tag}-2-{i}"] for i in range(4)], after=[first]
    )
    third = client.post("jobfns.record", [[f"{tag}-3-0"]], after=[second])
    assert client.wait(third.id, timeout=60).status is PostingStatus.FINISHED
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT key FROM effects WHERE key LIKE %s ORDER BY id",
            (f"{tag}-%",),
        ).fetchall()
    levels = [int(key.split("-")[1]) for (key,) in rows]
    assert len(levels) == 11
    assert levels == sorted(levels)
    for posting in (first, second, third):
        assert client.status(posting.id).status is PostingStatus.FINISHED


def test_a_failing_upstream_cancels_its_dependents(
    client: Client, database: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    upstream = client.post("jobfns.fail", [["no"]], tries=1)
    middle = client.post("jobfns.record", [[f"{tag}-m"]] * 3, after=[upstream])
    last = client.post("jobfns.record", [[f"{tag}-l"]], after=[middle])
    assert wait_until(lambda: _ended(client, last.id), timeout=60) is (
        PostingStatus.CANCELLED
    )
    assert client.status(upstream.id).status is PostingStatus.ERRORED_OUT
    middle_summary = client.summary(middle.id)
    assert middle_summary.status is PostingStatus.CANCELLED
    assert middle_summary.cancel_reason == (
        f"upstream posting {upstream.id} errored out"
    )
    assert middle_summary.jobs[JobStatus.ERRORED_OUT] == 3
    assert client.summary(last.id).cancel_reason == (
        f"upstream posting {middle.id} cancelled"
    )
    with psycopg.connect(database) as conn:
        row = conn.execute(
            "SELECT count(*) FROM effects WHERE key LIKE %s", (f"{tag}-%",)
        ).fetchone()
    assert row == (0,)


def test_a_fan_in_job_reads_its_upstream_results(client: Client) -> None:
    squares = client.post("flowjobs.square", [[i] for i in range(1, 11)])
    more = client.post("flowjobs.square", [[100]])
    fan_in = client.post("flowjobs.total", [[]], after=[squares, more])
    assert client.wait(fan_in.id, timeout=60).status is (PostingStatus.FINISHED)
    (result,) = client.results(fan_in.id)
    assert result.value == {str(squares.id): 385, str(more.id): 10_000}


def test_a_fan_in_over_a_posting_without_results_fails_clearly(
    client: Client,
) -> None:
    plain = client.post("jobfns.noop", [[1]])
    reader = client.post(
        "flowjobs.read_upstreams", [[]], after=[plain], tries=1
    )
    assert client.wait(reader.id, timeout=60).status is (
        PostingStatus.ERRORED_OUT
    )
    info = client.job(reader.job_ids[0])
    assert info.error is not None
    assert "does not store its jobs' results" in info.error


def test_the_maintenance_releases_what_a_race_left_held(
    client: Client, database: str
) -> None:
    """A dependent committed after its upstream's settle looked for
    dependents: the daemon's maintenance releases it within a pass."""
    upstream = client.post("jobfns.noop", [[1]])
    with psycopg.connect(database) as poster:
        downstream = client.post(
            "jobfns.noop", [[2]], after=[upstream], conn=poster
        )
        wait_until(lambda: _ended(client, upstream.id), timeout=60)
        poster.commit()
    assert client.wait(downstream.id, timeout=30).status is (
        PostingStatus.FINISHED
    )


def test_dependents_posted_while_their_upstream_drains_all_run(
    client: Client,
) -> None:
    """Dependents posted from several threads before, during and after
    their upstream posting's settle: none is left held."""
    upstream = client.post("jobfns.noop", [[i] for i in range(300)])
    made: list[uuid.UUID] = []

    def post_some() -> None:
        for _ in range(6):
            posting = client.post("jobfns.noop", [[1]], after=[upstream])
            made.append(posting.id)
            time.sleep(0.02)

    threads = [threading.Thread(target=post_some) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 24
    for posting in made:
        assert client.wait(posting, timeout=30).status is (
            PostingStatus.FINISHED
        )
