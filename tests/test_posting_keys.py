"""Idempotent postings: a key its poster holds makes one posting, whoever
posts it and however many at once, enforced by the database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import clientjobs
import psycopg
import pytest
from psycopg import sql

from harness import SUBMITTER_GRANTS_AT_6, Roles, migrate_before, run_pdoflow
from pdoflowd.client import (
    Client,
    KeyScope,
    PostingError,
    PostingStateError,
    Registry,
)
from pdoflowd.db import migrate, postings
from pdoflowd.status import PostingStatus

NOOP = "jobfns.noop"


def _count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT count(*) FROM pdoflowd.{table}").fetchone()
    assert row is not None
    return int(row[0])


def _set_status(dsn: str, posting_id: uuid.UUID, status: str) -> None:
    """Ends a posting as a daemon would (no daemon runs in these tests)."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE pdoflowd.postings SET status = %s, finished_at = now()"
            " WHERE uuid = %s",
            (status, posting_id),
        )


# ------------------------------------------------------------ the client


def test_a_second_post_with_the_key_returns_the_first_and_writes_nothing(
    dsn: str,
) -> None:
    client = Client(dsn)
    first = client.post(NOOP, [[1], [2], [3]], key="nightly-2026-11-30")
    second = client.post(NOOP, [[7]], key="nightly-2026-11-30")
    assert not first.existed
    assert second.existed
    assert second.id == first.id
    assert list(second.job_ids) == list(first.job_ids)
    assert _count(dsn, "postings") == 1
    assert _count(dsn, "jobs") == 3


def test_a_paused_posting_holds_its_key(dsn: str) -> None:
    client = Client(dsn)
    first = client.post(NOOP, [[1]], key="k", paused=True)
    assert client.post(NOOP, [[1]], key="k").id == first.id


@pytest.mark.parametrize("ended", ["finished", "errored_out", "cancelled"])
def test_once_the_posting_ended_the_key_makes_a_new_one(
    dsn: str, ended: str
) -> None:
    client = Client(dsn)
    first = client.post(NOOP, [[1]], key="k")
    _set_status(dsn, first.id, ended)
    again = client.post(NOOP, [[1]], key="k")
    assert not again.existed
    assert again.id != first.id
    # The new one holds the key now.
    assert client.post(NOOP, [[1]], key="k").id == again.id


def test_a_forever_key_stays_taken_after_its_posting_ended(dsn: str) -> None:
    client = Client(dsn)
    first = client.post(NOOP, [[1]], key="once", key_scope="forever")
    _set_status(dsn, first.id, "finished")
    again = client.post(NOOP, [[1]], key="once")
    assert again.existed
    assert again.id == first.id
    assert _count(dsn, "postings") == 1


def test_posts_without_a_key_are_never_merged(dsn: str) -> None:
    client = Client(dsn)
    ids = {client.post(NOOP, [[1]]).id for _ in range(3)}
    assert len(ids) == 3


def test_a_cancel_then_retry_cannot_make_two_postings_hold_one_key(
    dsn: str,
) -> None:
    client = Client(dsn)
    first = client.post(NOOP, [[1]], key="k")
    client.cancel(first.id)
    second = client.post(NOOP, [[1]], key="k")
    assert second.id != first.id
    # Retrying the first would make two active postings with one key.
    with pytest.raises(PostingStateError, match="holds the key now"):
        client.retry(first.id)
    errored = client.post(NOOP, [[1]], key="e")
    _set_status(dsn, errored.id, "errored_out")
    client.post(NOOP, [[1]], key="e")
    with pytest.raises(PostingStateError, match="holds the key now"):
        client.resume(errored.id)
    assert client.status(first.id).status is PostingStatus.CANCELLED


def test_post_work_takes_a_key(dsn: str) -> None:
    definition = Registry[clientjobs.add]
    first, jobs = definition.post_work([[1], [2]], dsn=dsn, key="pw")
    again, again_jobs = definition.post_work([[1], [2]], dsn=dsn, key="pw")
    assert again == first
    assert list(again_jobs) == list(jobs)


def test_a_keyed_post_rolled_back_by_its_caller_leaves_the_key_free(
    dsn: str,
) -> None:
    client = Client(dsn)
    with (
        psycopg.connect(dsn) as conn,
        pytest.raises(RuntimeError),
        conn.transaction(),
    ):
        client.post(NOOP, [[1]], key="k", conn=conn)
        raise RuntimeError("the caller changes its mind")
    assert _count(dsn, "postings") == 0
    assert not client.post(NOOP, [[1]], key="k").existed


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("", "non-empty"),
        ("x" * 201, "at most 200"),
        ("line\nbreak", "printable"),
        ("nul\x00", "NUL"),
        ("\ud800", "Unicode"),
        (42, "non-empty string"),
    ],
)
def test_bad_keys_are_refused_before_anything_is_written(
    dsn: str, key: object, problem: str
) -> None:
    with pytest.raises(PostingError, match=problem):
        Client(dsn).post(NOOP, [[1]], key=key)  # type: ignore[arg-type]
    assert _count(dsn, "postings") == 0


def test_a_bad_key_scope_is_refused(dsn: str) -> None:
    with pytest.raises(PostingError, match="'active', 'forever'"):
        Client(dsn).post(NOOP, [[1]], key="k", key_scope="always")
    assert _count(dsn, "postings") == 0


# ------------------------------------------------------------ concurrency


def test_concurrent_posts_of_one_key_make_one_posting(dsn: str) -> None:
    """Twelve posters in threads, each on its own connection, released at
    once: one posting, and every poster gets its id."""
    barrier = threading.Barrier(12)
    results: list[tuple[uuid.UUID, bool]] = []
    failures: list[BaseException] = []

    def post() -> None:
        client = Client(dsn)
        barrier.wait()
        try:
            made = client.post(NOOP, [[i] for i in range(50)], key="race")
            results.append((made.id, made.existed))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=post) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len({posting for posting, _ in results}) == 1
    assert sorted(existed for _, existed in results) == [False] + [True] * 11
    assert _count(dsn, "postings") == 1
    assert _count(dsn, "jobs") == 50


def test_a_post_waits_for_a_concurrent_holder_then_returns_its_posting(
    dsn: str,
) -> None:
    """A poster whose transaction holds the key uncommitted: the second
    post waits for it, and after its commit returns that posting."""
    client = Client(dsn)
    holder = psycopg.connect(dsn)
    try:
        holder.execute("BEGIN")
        held = client.post(NOOP, [[1]], key="held", conn=holder)
        outcome: list[uuid.UUID] = []
        second = threading.Thread(
            target=lambda: outcome.append(
                client.post(NOOP, [[2]], key="held").id
            )
        )
        second.start()
        second.join(timeout=1.0)
        assert second.is_alive(), "the second post did not wait"
        holder.commit()
        second.join(timeout=30)
        assert outcome == [held.id]
    finally:
        holder.close()
    assert _count(dsn, "postings") == 1


def test_a_post_waiting_on_a_holder_that_rolls_back_makes_the_posting(
    dsn: str,
) -> None:
    client = Client(dsn)
    holder = psycopg.connect(dsn)
    try:
        holder.execute("BEGIN")
        client.post(NOOP, [[1]], key="dropped", conn=holder)
        outcome: list[tuple[uuid.UUID, bool]] = []

        def post() -> None:
            made = client.post(NOOP, [[2], [3]], key="dropped")
            outcome.append((made.id, made.existed))

        second = threading.Thread(target=post)
        second.start()
        second.join(timeout=1.0)
        assert second.is_alive()
        holder.rollback()
        second.join(timeout=30)
    finally:
        holder.close()
    assert len(outcome) == 1 and outcome[0][1] is False
    assert _count(dsn, "postings") == 1
    assert _count(dsn, "jobs") == 2


def test_concurrent_pdoflow_submits_with_one_key_print_one_posting(
    dsn: str, tmp_path: Path
) -> None:
    """Eight `pdoflow submit --key` processes at once."""
    env = dict(os.environ, PDOFLOWD_DSN=dsn)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pdoflowd.cli",
                "--dsn",
                dsn,
                "submit",
                NOOP,
                "--key",
                "cron-job",
                "--json",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        for _ in range(8)
    ]
    outputs = [p.communicate("[1]\n[2]\n", timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8
    printed = [json.loads(out) for out, _ in outputs]
    assert len({p["id"] for p in printed}) == 1
    assert sorted(p["existed"] for p in printed) == [False] + [True] * 7
    notices = [err for _, err in outputs if "holds the key" in err]
    assert len(notices) == 7
    assert _count(dsn, "jobs") == 2


# ------------------------------------------------------------ posters


def test_one_key_of_two_posters_makes_two_postings_each_seeing_its_own(
    submitters: tuple[str, str],
) -> None:
    alice, bob = (Client(d) for d in submitters)
    a = alice.post(NOOP, [[1]], key="shared-name")
    b = bob.post(NOOP, [[1]], key="shared-name")
    assert not a.existed and not b.existed
    assert a.id != b.id
    assert alice.post(NOOP, [[1]], key="shared-name").id == a.id
    assert bob.post(NOOP, [[1]], key="shared-name").id == b.id


def test_a_submitter_granted_before_version_7_may_post_with_a_key(
    empty_dsn: str, empty_roles: Roles
) -> None:
    role = empty_roles.make()
    with psycopg.connect(empty_dsn) as conn:
        pending = migrate_before(conn, "idempotency_key")
        for template in SUBMITTER_GRANTS_AT_6:
            conn.execute(sql.SQL(template).format(role=sql.Identifier(role)))
    assert migrate.upgrade(empty_dsn) == pending
    client = Client(empty_roles.dsn_of(role))
    first = client.post(NOOP, [[1]], key="after-upgrade")
    assert client.post(NOOP, [[1]], key="after-upgrade").id == first.id


def test_the_key_scope_names_are_the_schemas(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        for scope in KeyScope:
            posting = postings.insert_posting(
                conn,
                posting_uuid=uuid.uuid4(),
                target_function="noop",
                entry_point=NOOP,
                jobs=[],
                tries=1,
                key=f"scope-{scope.value}",
                key_scope=scope,
            )
            assert not posting.existed


def test_pdoflow_submit_refuses_a_bad_key_with_a_usage_error(
    dsn: str,
) -> None:
    done = run_pdoflow(
        dsn, "submit", NOOP, "--key", "two\nlines", stdin="[1]\n"
    )
    assert done.returncode == 64
    assert "--key" in done.stderr and "printable" in done.stderr
    assert _count(dsn, "postings") == 0


def test_pdoflow_submit_says_on_stderr_that_the_posting_existed(
    dsn: str,
) -> None:
    def submit() -> subprocess.CompletedProcess[str]:
        return run_pdoflow(
            dsn,
            "submit",
            NOOP,
            "--key",
            "k",
            "--key-scope",
            "forever",
            stdin="[1]\n",
        )

    first, second = submit(), submit()
    assert (first.returncode, second.returncode) == (0, 0)
    assert first.stdout == second.stdout
    assert first.stderr == ""
    assert "holds the key 'k' already" in second.stderr


def test_posting_status_shows_the_key_and_its_scope(dsn: str) -> None:
    client = Client(dsn)
    keyed = client.post(NOOP, [[1]], key="shown", key_scope="forever")
    plain = client.post(NOOP, [[1]])
    shape = json.loads(
        pdoflow_out(dsn, "posting-status", str(keyed.id), "--json")
    )
    assert (shape["key"], shape["key_scope"]) == ("shown", "forever")
    shape = json.loads(
        pdoflow_out(dsn, "posting-status", str(plain.id), "--json")
    )
    assert (shape["key"], shape["key_scope"]) == (None, None)
    lines = pdoflow_out(dsn, "posting-status", str(keyed.id)).splitlines()
    assert ["key", "'shown'", "(held", "forever)"] in [
        line.split() for line in lines
    ]


def pdoflow_out(dsn: str, *args: str) -> str:
    done = run_pdoflow(dsn, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout
