"""Postings that wait for postings, in the database: held jobs, release
and cancel in the transaction that ends an upstream posting, the review
that repairs a race, controls, and refusals under row-level security.

No daemon runs here: postings are ended the way a daemon ends them (its
outcome statements and ``settle_postings``), so each step is exact.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from harness import migrate_before, run_pdoflow
from pdoflowd.client import Client, PostingError, PostingStateError
from pdoflowd.db import dependencies, migrate, queue
from pdoflowd.status import JobStatus, PostingStatus

NOOP = "jobfns.noop"
DAEMON = uuid.uuid4()


@pytest.fixture
def conn(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


def _statuses(conn: Any, posting: uuid.UUID) -> dict[str, int]:
    rows = conn.execute(
        "SELECT j.status, count(*) FROM pdoflowd.jobs AS j"
        " JOIN pdoflowd.postings AS p ON p.id = j.posting_id"
        " WHERE p.uuid = %s GROUP BY j.status",
        (posting,),
    ).fetchall()
    return dict(rows)


def _posting(conn: Any, posting: uuid.UUID) -> tuple[str, bool, str | None]:
    row = conn.execute(
        "SELECT status, held, cancel_reason FROM pdoflowd.postings"
        " WHERE uuid = %s",
        (posting,),
    ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def _internal_id(conn: Any, posting: uuid.UUID) -> int:
    row = conn.execute(
        "SELECT id FROM pdoflowd.postings WHERE uuid = %s", (posting,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def _end(
    conn: Any,
    owner: uuid.UUID,
    jobs: list[queue.ClaimedJob],
    kind: Callable[[queue.ClaimedJob], queue.OutcomeKind],
) -> dict[int, PostingStatus]:
    """Record each claimed job's outcome (``kind`` of it) and settle their
    postings: what a daemon does after a batch."""
    queue.record_and_claim(
        conn,
        finishing=owner,
        outcomes=[queue.Outcome(j.id, j.attempt, kind(j)) for j in jobs],
        owner=owner,
        daemon_id=DAEMON,
        limit=0,
    )
    return queue.settle_postings(
        conn, {j.posting_id for j in jobs}, error_threshold=1
    )


def _run_all(conn: Any, *, fail: bool = False) -> dict[int, PostingStatus]:
    """Claim every runnable job and end it done (or failed, no tries
    left), then settle their postings."""
    owner = uuid.uuid4()
    jobs = queue.claim(conn, owner=owner, daemon_id=DAEMON, limit=10_000)
    kind = queue.OutcomeKind.REFUSED if fail else queue.OutcomeKind.DONE
    return _end(conn, owner, jobs, lambda _: kind)


def test_a_posting_after_another_is_held_out_of_the_claim(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    upstream = client.post(NOOP, [[1], [2]])
    downstream = client.post(NOOP, [[3]] * 5, after=[upstream])
    assert _statuses(conn, downstream.id) == {"held": 5}
    assert _posting(conn, downstream.id)[:2] == ("executing", True)
    assert client.status(downstream.id).waiting_for == (upstream.id,)
    claimed = queue.claim(conn, owner=uuid.uuid4(), daemon_id=DAEMON, limit=100)
    assert {j.posting_uuid for j in claimed} == {upstream.id}
    # Held jobs are not in the claim's partial index at all.
    row = conn.execute(
        "SELECT count(*) FROM pdoflowd.jobs WHERE status = 'waiting'"
    ).fetchone()
    assert row == (0,)


def test_finishing_the_upstream_releases_in_the_same_transaction(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    upstream = client.post(NOOP, [[1], [2]])
    downstream = client.post(NOOP, [[3]] * 3, after=[upstream.id])
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pdoflowd_jobs")
        settled = _run_all(conn)
        assert set(settled.values()) == {PostingStatus.FINISHED}
        # Released by the settle's own statement, and the daemons woken.
        assert _statuses(conn, downstream.id) == {"waiting": 3}
        assert _posting(conn, downstream.id)[:2] == ("executing", False)
        assert list(listener.notifies(timeout=5, stop_after=1))
    assert client.status(downstream.id).waiting_for == ()
    assert set(_run_all(conn).values()) == {PostingStatus.FINISHED}


def test_a_three_level_chain_runs_level_by_level(dsn: str, conn: Any) -> None:
    client = Client(dsn)
    first = client.post(NOOP, [[1]])
    second = client.post(NOOP, [[2], [2]], after=[first])
    third = client.post(NOOP, [[3]], after=[second])
    order = []
    for _ in range(3):
        owner = uuid.uuid4()
        jobs = queue.claim(conn, owner=owner, daemon_id=DAEMON, limit=100)
        order.append({j.posting_uuid for j in jobs})
        _end(conn, owner, jobs, lambda _: queue.OutcomeKind.DONE)
    assert order == [{first.id}, {second.id}, {third.id}]
    assert client.status(third.id).status is PostingStatus.FINISHED


def test_a_failed_upstream_cancels_its_dependents_and_theirs(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    upstream = client.post(NOOP, [[1]])
    middle = client.post(NOOP, [[2]] * 2, after=[upstream])
    last = client.post(NOOP, [[3]], after=[middle])
    unrelated = client.post(NOOP, [[4]])
    settled = _run_all(conn, fail=True)
    assert settled[_internal_id(conn, upstream.id)] is PostingStatus.ERRORED_OUT
    status, held, reason = _posting(conn, middle.id)
    assert (status, held) == ("cancelled", False)
    assert reason == f"upstream posting {upstream.id} errored out"
    assert _statuses(conn, middle.id) == {"errored_out": 2}
    status, held, reason = _posting(conn, last.id)
    assert (status, reason) == (
        "cancelled",
        f"upstream posting {middle.id} cancelled",
    )
    # Unrelated postings are not touched: it failed too (fail=True ran
    # it), but nothing waited for it.
    assert _posting(conn, unrelated.id)[0] == "errored_out"


def test_on_failure_run_waits_for_every_upstream_to_end(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    failing = client.post(NOOP, [[1]])
    slow = client.post(NOOP, [[2]], paused=True)
    cleanup = client.post(NOOP, [[3]], after=[failing, slow], on_failure="run")
    _run_all(conn, fail=True)
    assert _posting(conn, failing.id)[0] == "errored_out"
    # One upstream failed, one has not ended: still held.
    assert _statuses(conn, cleanup.id) == {"held": 1}
    assert client.status(cleanup.id).waiting_for == (slow.id,)
    client.cancel(slow.id)
    assert _statuses(conn, cleanup.id) == {"waiting": 1}
    assert _posting(conn, cleanup.id)[:2] == ("executing", False)


def test_an_upstream_that_ended_already_decides_at_once(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    done = client.post(NOOP, [[1]])
    failed = client.post(NOOP, [[2]])
    owner = uuid.uuid4()
    jobs = queue.claim(conn, owner=owner, daemon_id=DAEMON, limit=10)
    _end(
        conn,
        owner,
        jobs,
        lambda j: (
            queue.OutcomeKind.DONE
            if j.posting_uuid == done.id
            else queue.OutcomeKind.REFUSED
        ),
    )
    runs = client.post(NOOP, [[3]], after=[done])
    assert _statuses(conn, runs.id) == {"waiting": 1}
    assert not _posting(conn, runs.id)[1]
    doomed = client.post(NOOP, [[4]], after=[done, failed])
    assert _posting(conn, doomed.id) == (
        "cancelled",
        False,
        f"upstream posting {failed.id} errored out",
    )
    assert client.status(doomed.id).status is PostingStatus.CANCELLED


def test_unknown_upstreams_are_refused_before_anything_is_written(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    real = client.post(NOOP, [[1]])
    before = conn.execute("SELECT count(*) FROM pdoflowd.jobs").fetchone()
    ghost = uuid.uuid4()
    with pytest.raises(PostingError, match=f"no posting {ghost} to wait for"):
        client.post(NOOP, [[2]], after=[real, ghost])
    with pytest.raises(PostingError, match="is not a posting id"):
        client.post(NOOP, [[2]], after=["not-a-uuid"])
    with pytest.raises(PostingError, match="on_failure must be one of"):
        client.post(NOOP, [[2]], after=[real], on_failure="ignore")
    after = conn.execute("SELECT count(*) FROM pdoflowd.jobs").fetchone()
    assert before == after
    row = conn.execute("SELECT count(*) FROM pdoflowd.postings").fetchone()
    assert row == (1,)


def test_another_posters_posting_cannot_be_waited_for(
    submitters: tuple[str, str],
) -> None:
    alice, bob = submitters
    bobs = Client(bob).post(NOOP, [[1]])
    with pytest.raises(PostingError, match=f"no posting {bobs.id}"):
        Client(alice).post(NOOP, [[2]], after=[bobs])
    # Nor by calling the function past the client: her own posting, made
    # by hand, cannot be made to wait for his.
    mine = uuid.uuid4()
    with psycopg.connect(alice) as conn:
        conn.execute(
            "INSERT INTO pdoflowd.postings (uuid, target_function,"
            " entry_point) VALUES (%s, 'noop', %s)",
            (mine, NOOP),
        )
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            dependencies.wait_for_postings(conn, mine, [bobs.id], "cancel")
    with psycopg.connect(alice) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pdoflowd.posting_dependencies"
        ).fetchone()
        assert row == (0,)
    # And nobody else's posting can be made to wait.
    with (
        psycopg.connect(alice) as conn,
        pytest.raises(psycopg.errors.NoDataFound),
    ):
        dependencies.wait_for_postings(conn, bobs.id, [], "cancel")


def test_a_cycle_cannot_be_written(dsn: str, conn: Any) -> None:
    client = Client(dsn)
    first = client.post(NOOP, [[1]])
    second = client.post(NOOP, [[2]], after=[first])
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "INSERT INTO pdoflowd.posting_dependencies VALUES (%s, %s)",
            (_internal_id(conn, first.id), _internal_id(conn, second.id)),
        )
    with pytest.raises(PostingError):
        # Waiting for itself: the posting does not exist yet when posted.
        client.post(NOOP, [[3]], after=[uuid.uuid4()])


def test_cancelling_an_upstream_cancels_its_dependents(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    upstream = client.post(NOOP, [[1]])
    downstream = client.post(NOOP, [[2]] * 2, after=[upstream])
    client.cancel(upstream.id)
    assert _posting(conn, downstream.id) == (
        "cancelled",
        False,
        f"upstream posting {upstream.id} cancelled",
    )
    assert _statuses(conn, downstream.id) == {"errored_out": 2}


def test_a_held_posting_cancelled_ends_its_held_jobs(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    upstream = client.post(NOOP, [[1]])
    downstream = client.post(NOOP, [[2]] * 2, after=[upstream])
    assert client.cancel(downstream.id).jobs_changed == 2
    assert _statuses(conn, downstream.id) == {"errored_out": 2}
    assert _posting(conn, downstream.id)[:2] == ("cancelled", False)
    # The upstream's end later changes nothing of it.
    _run_all(conn)
    assert _posting(conn, downstream.id)[0] == "cancelled"


def test_a_dependent_is_retried_only_after_its_failed_upstream(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    upstream = client.post(NOOP, [[1]])
    downstream = client.post(NOOP, [[2]], after=[upstream])
    _run_all(conn, fail=True)
    assert _posting(conn, downstream.id)[0] == "cancelled"
    with pytest.raises(PostingStateError, match="retry that one first"):
        client.retry(downstream.id)
    with pytest.raises(PostingStateError, match="retry the posting"):
        client.retry_job(downstream.job_ids[0])
    client.retry(upstream.id)
    # Its upstream runs again: retried now, the dependent is held again.
    client.retry(downstream.id)
    assert _statuses(conn, downstream.id) == {"held": 1}
    assert _posting(conn, downstream.id) == ("executing", True, None)
    _run_all(conn)
    assert _statuses(conn, downstream.id) == {"waiting": 1}


def test_a_paused_dependent_is_released_but_stays_paused(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    upstream = client.post(NOOP, [[1]])
    downstream = client.post(NOOP, [[2]], after=[upstream], paused=True)
    _run_all(conn)
    assert _statuses(conn, downstream.id) == {"waiting": 1}
    assert _posting(conn, downstream.id)[0] == "paused"
    assert _run_all(conn) == {}
    client.resume(downstream.id)
    assert set(_run_all(conn).values()) == {PostingStatus.FINISHED}


def test_a_dependent_posted_while_its_upstream_settles_is_reviewed(
    dsn: str, conn: Any
) -> None:
    """The race: the settle that ends the upstream cannot see a dependent
    whose transaction has not committed; the review finds it."""
    client = Client(dsn)
    upstream = client.post(NOOP, [[1]])
    with psycopg.connect(dsn) as poster:
        downstream = client.post(NOOP, [[2]], after=[upstream], conn=poster)
        _run_all(conn)
        assert _posting(conn, upstream.id)[0] == "finished"
        poster.commit()
    assert _statuses(conn, downstream.id) == {"held": 1}
    assert dependencies.review_holds(conn) == 1
    assert _statuses(conn, downstream.id) == {"waiting": 1}
    assert dependencies.review_holds(conn) == 0


def test_a_dependent_locked_while_its_upstream_settles_is_reviewed(
    dsn: str, conn: Any
) -> None:
    """The settle skips a dependent another transaction holds (never waits
    for it); the review comes back to it."""
    client = Client(dsn)
    upstream = client.post(NOOP, [[1]])
    downstream = client.post(NOOP, [[2]], after=[upstream])
    with psycopg.connect(dsn) as holder:
        holder.execute(
            "SELECT 1 FROM pdoflowd.postings WHERE uuid = %s FOR UPDATE",
            (downstream.id,),
        )
        _run_all(conn)
        assert _statuses(conn, downstream.id) == {"held": 1}
        # Held by that transaction: the review skips it too.
        assert dependencies.review_holds(conn) == 0
    assert dependencies.review_holds(conn) == 1
    assert _statuses(conn, downstream.id) == {"waiting": 1}


def test_a_held_posting_is_never_settled_as_finished(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    upstream = client.post(NOOP, [[1]], paused=True)
    downstream = client.post(NOOP, [[2]], after=[upstream])
    internal = _internal_id(conn, downstream.id)
    assert queue.settle_postings(conn, [internal], error_threshold=1) == {}
    assert internal not in queue.unsettled_postings(conn)
    assert _posting(conn, downstream.id)[0] == "executing"


def test_upstream_results_in_order_for_a_fan_in(dsn: str, conn: Any) -> None:
    client = Client(dsn)
    first = client.post("flowjobs.square", [[1], [2], [3]])
    second = client.post("flowjobs.square", [[10]])
    owner = uuid.uuid4()
    jobs = queue.claim(conn, owner=owner, daemon_id=DAEMON, limit=10)
    conn.execute(
        "UPDATE pdoflowd.jobs SET result = to_jsonb(id) WHERE uuid = ANY(%s)",
        ([j.uuid for j in jobs],),
    )
    _ = jobs
    fan_in = client.post("flowjobs.total", [[]], after=[second, first])
    rows = dependencies.upstream_results(conn, fan_in.id)
    assert [r.posting_uuid for r in rows] == [first.id] * 3 + [second.id]
    assert all(r.status is JobStatus.EXECUTING for r in rows)


def test_pdoflow_submit_after_status_and_graph(dsn: str) -> None:
    root = run_pdoflow(dsn, "submit", NOOP, stdin="[1]\n")
    assert root.returncode == 0, root.stderr
    root_id = root.stdout.strip()
    mid = run_pdoflow(dsn, "submit", NOOP, "--after", root_id, stdin="[2]\n")
    mid_id = mid.stdout.strip()
    other = run_pdoflow(dsn, "submit", NOOP, stdin="[3]\n").stdout.strip()
    top = run_pdoflow(
        dsn,
        "submit",
        NOOP,
        "--after",
        mid_id,
        "--after",
        other,
        "--on-failure",
        "run",
        stdin="[4]\n",
    )
    top_id = top.stdout.strip()
    status = run_pdoflow(dsn, "status", top_id)
    assert f"waiting for {mid_id}, {other}" in status.stdout
    assert "held" in status.stdout
    shape = json.loads(run_pdoflow(dsn, "status", top_id, "--json").stdout)
    assert shape["waiting_for"] == [mid_id, other]
    assert shape["jobs"]["held"] == 1
    detail = json.loads(
        run_pdoflow(dsn, "posting-status", top_id, "--json").stdout
    )
    assert (detail["after"], detail["on_failure"]) == ([mid_id, other], "run")
    graph = run_pdoflow(dsn, "graph", top_id)
    assert graph.returncode == 0, graph.stderr
    lines = graph.stdout.splitlines()
    assert lines[0].startswith(f"{top_id}  executing, jobs held")
    assert lines[1].startswith(f"├─ {mid_id}  executing, jobs held")
    assert lines[2].startswith(f"│  └─ {root_id}  executing  ")
    assert lines[3].startswith(f"└─ {other}  executing  ")
    assert len(lines) == 4
    nodes = json.loads(run_pdoflow(dsn, "graph", top_id, "--json").stdout)[
        "nodes"
    ]
    assert [(n["id"], n["parent"], n["depth"]) for n in nodes] == [
        (top_id, None, 0),
        (mid_id, top_id, 1),
        (root_id, mid_id, 2),
        (other, top_id, 1),
    ]
    below = run_pdoflow(dsn, "graph", root_id)
    assert below.stdout.splitlines()[-2:] == [
        "waited for by",
        f"  {mid_id}  executing  noop",
    ]
    shape = json.loads(run_pdoflow(dsn, "graph", mid_id, "--json").stdout)
    assert shape["waited_for_by"] == [
        {"id": top_id, "status": "executing", "target_function": "noop"}
    ]
    bad = run_pdoflow(dsn, "submit", NOOP, "--after", "nope", stdin="[1]\n")
    assert bad.returncode != 0
    assert "not a posting id" in bad.stderr


def test_a_job_cancelled_alone_and_retried_is_held_again(
    dsn: str, conn: Any
) -> None:
    client = Client(dsn)
    upstream = client.post(NOOP, [[1]])
    downstream = client.post(NOOP, [[2], [3]], after=[upstream])
    first = downstream.job_ids[0]
    client.cancel_job(first)
    assert client.job(first).status is JobStatus.ERRORED_OUT
    client.retry_job(first)
    assert client.job(first).status is JobStatus.HELD
    _run_all(conn)
    assert _statuses(conn, downstream.id) == {"waiting": 2}


def test_a_submitter_granted_before_dependencies_may_use_them(
    empty_dsn: str, empty_roles: Any
) -> None:
    """A role granted a submitter's privileges at schema version 11 posts
    with ``after`` once upgraded, without a new grant."""
    role = empty_roles.make()
    with psycopg.connect(empty_dsn) as conn:
        assert migrate_before(conn, "posting_dependencies")[0] == 12
        for template in migrate.SUBMITTER_GRANTS:
            if "posting_dependencies" in template:
                continue
            if "wait_for_postings" in template:
                continue
            # The columns of later versions (concurrency caps).
            template = template.replace(",\n max_running, uses", "")
            template = template.replace(", max_running, uses", "")
            template = template.replace(", limits)", ")")
            conn.execute(sql.SQL(template).format(role=sql.Identifier(role)))
    migrate.upgrade(empty_dsn)
    client = Client(empty_roles.dsn_of(role))
    upstream = client.post(NOOP, [[1]])
    downstream = client.post(NOOP, [[2]], after=[upstream])
    assert client.status(downstream.id).waiting_for == (upstream.id,)
    assert client.graph(downstream.id)[1].uuid == upstream.id
