"""Least privilege in PostgreSQL, with real roles: what the submitter and
daemon grants allow, row-level security between posters, and role names
that are quoted wherever they reach SQL."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors

from harness import (
    Daemon,
    Roles,
    create_effects_table,
    daemon_config,
    grant,
    write_config,
)
from pdoflowd.client import Client, PostingError
from pdoflowd.db import migrate, postings
from pdoflowd.status import JobStatus, PostingStatus


def test_grant_statements_quote_role_names(dsn: str) -> None:
    hostile = 'x"; DROP TABLE pdoflowd.jobs; --'
    with psycopg.connect(dsn) as conn:
        texts = [
            s.as_string(conn)
            for s in migrate.grant_statements(migrate.Grants([hostile], []))
        ]
    assert texts[0] == (
        'GRANT USAGE ON SCHEMA pdoflowd TO "x""; DROP TABLE pdoflowd.jobs; --"'
    )
    assert len(texts) == len(migrate.SUBMITTER_GRANTS)


def test_grants_to_a_role_with_a_hostile_name_apply_and_repeat(
    dsn: str, roles: Roles
) -> None:
    role = roles.make('we"ird; role --')
    grant(dsn, submitters=[role], daemons=[role])
    grant(dsn, submitters=[role], daemons=[role])
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT has_table_privilege(%s, 'pdoflowd.jobs', 'UPDATE'),"
            " to_regclass('pdoflowd.jobs') IS NOT NULL",
            (role,),
        ).fetchone()
    assert row == (True, True)


def test_granting_to_a_missing_role_grants_nothing(
    dsn: str, roles: Roles
) -> None:
    role = roles.make()
    with pytest.raises(errors.UndefinedObject):
        grant(dsn, submitters=[role, "no_such_role_" + uuid.uuid4().hex])
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT has_schema_privilege(%s, 'pdoflowd', 'USAGE')", (role,)
        ).fetchone()
    assert row == (False,)


def test_a_submitter_posts_and_follows_its_own_posting(
    dsn: str, submitters: tuple[str, str], roles: Roles
) -> None:
    alice_dsn, _ = submitters
    client = Client(alice_dsn)
    posting = client.post("jobfns.noop", [[1], [2]], priority=[1, 2])
    state = client.status(posting.id)
    assert state.jobs[JobStatus.WAITING] == 2
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT poster FROM pdoflowd.postings").fetchone()
        jobs = conn.execute(
            "SELECT uuid, priority FROM pdoflowd.jobs ORDER BY id"
        ).fetchall()
    assert row == (roles.made[0],)
    assert jobs == [(posting.job_ids[0], 1), (posting.job_ids[1], 2)]
    assert client.pause(posting.id).status is PostingStatus.PAUSED
    assert client.cancel(posting.id).jobs_changed == 2
    assert client.retry(posting.id).jobs_changed == 2
    shared = client.shared(posting.id)
    assert shared.update("n", lambda n: n + 1, default=0) == 1
    assert [p.uuid for p in client.postings()] == [posting.id]


def test_a_submitter_posts_in_chunks_in_order_and_all_or_nothing(
    dsn: str, submitters: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Row-level security refuses COPY: the jobs go by INSERTs of a chunk.
    monkeypatch.setattr(postings, "_INSERT_CHUNK_JOBS", 3)
    alice_dsn, _ = submitters
    client = Client(alice_dsn)
    posting = client.post(
        "jobfns.noop", [[i, "a\\b\tc"] for i in range(8)], priority=range(8)
    )
    with psycopg.connect(dsn) as conn:
        jobs = conn.execute(
            "SELECT uuid, priority, posargs FROM pdoflowd.jobs ORDER BY id"
        ).fetchall()
    assert jobs == [
        (job_id, i, [i, "a\\b\tc"]) for i, job_id in enumerate(posting.job_ids)
    ]
    posargs: list[list[Any]] = [[i] for i in range(8)]
    posargs[5] = [{1}]
    with pytest.raises(PostingError, match=r"^job 5: posargs\[0\]: set"):
        client.post("jobfns.noop", posargs)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM pdoflowd.postings),"
            " (SELECT count(*) FROM pdoflowd.jobs)"
        ).fetchone()
    assert row == (1, 8)


def test_a_submitter_cannot_update_jobs_not_even_its_own(
    submitters: tuple[str, str],
) -> None:
    alice_dsn, _ = submitters
    Client(alice_dsn).post("jobfns.noop", [[1]])
    with (
        psycopg.connect(alice_dsn) as conn,
        pytest.raises(errors.InsufficientPrivilege),
    ):
        conn.execute("UPDATE pdoflowd.jobs SET status = 'done'")


def test_a_submitter_cannot_claim_a_posting_of_someone_else(
    submitters: tuple[str, str],
) -> None:
    alice_dsn, _ = submitters
    with (
        psycopg.connect(alice_dsn) as conn,
        pytest.raises(errors.InsufficientPrivilege),
    ):
        conn.execute(
            "INSERT INTO pdoflowd.postings (uuid, poster, target_function,"
            " entry_point) VALUES (gen_random_uuid(), 'bob', 'f', 'a.f')"
        )


def test_a_submitter_sees_nothing_of_another_posters_work(
    dsn: str, submitters: tuple[str, str]
) -> None:
    alice_dsn, bob_dsn = submitters
    alices = Client(alice_dsn).post("jobfns.noop", [[1]])
    bob = Client(bob_dsn)
    mine = bob.post("jobfns.noop", [[2]])
    with pytest.raises(KeyError, match="no posting"):
        bob.status(alices.id)
    with pytest.raises(KeyError, match="no posting"):
        bob.cancel(alices.id)
    with pytest.raises(KeyError, match="no posting"):
        bob.shared(alices.id).set("x", 1)
    assert [p.uuid for p in bob.postings()] == [mine.id]
    with psycopg.connect(bob_dsn) as conn:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM pdoflowd.postings),"
            " (SELECT count(*) FROM pdoflowd.jobs)"
        ).fetchone()
    assert counts == (1, 1)
    assert Client(dsn).status(alices.id).status is PostingStatus.EXECUTING


def test_a_submitter_cannot_add_jobs_to_another_posters_posting(
    dsn: str, submitters: tuple[str, str]
) -> None:
    alice_dsn, bob_dsn = submitters
    Client(alice_dsn).post("jobfns.noop", [[1]])
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT id FROM pdoflowd.postings").fetchone()
    assert row is not None
    with (
        psycopg.connect(bob_dsn) as conn,
        pytest.raises(errors.InsufficientPrivilege, match="row-level"),
    ):
        conn.execute(
            "INSERT INTO pdoflowd.jobs (uuid, posting_id)"
            " VALUES (gen_random_uuid(), %s)",
            (row[0],),
        )


def test_a_role_without_grants_cannot_reach_the_queue(
    dsn: str, roles: Roles
) -> None:
    stranger = roles.make()
    with pytest.raises(errors.InsufficientPrivilege):
        Client(roles.dsn_of(stranger)).post("jobfns.noop", [[1]])


def test_the_daemon_runs_as_a_daemon_role_with_only_its_grants(
    dsn: str, roles: Roles, tmp_path: Path
) -> None:
    worker_role, poster = roles.make(), roles.make()
    grant(dsn, submitters=[poster], daemons=[worker_role])
    create_effects_table(dsn)
    config = daemon_config(
        roles.dsn_of(worker_role),
        jobs={
            "allowed_modules": ["jobfns", "featurejobs"],
            "profile_sample_rate": 1.0,
        },
    )
    daemon = Daemon(tmp_path, config, effects_dsn=dsn)
    try:
        daemon.start().wait_ready()
        client = Client(roles.dsn_of(poster))
        posting = client.post(
            "featurejobs.count_up", [[2], [3]], store_result=True
        )
        state = client.wait(posting.id, timeout=30, poll_interval=0.05)
        assert state.status is PostingStatus.FINISHED, daemon.log()
        assert sorted(r.value for r in client.results(posting.id))[-1] == 5
        assert client.shared(posting.id).get("counter") == 5
        assert daemon.stop() == 0
    finally:
        daemon.close()
    assert "not stored" not in daemon.log()
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pdoflowd.job_profiles"
        ).fetchone()
    assert row == (2,)


def pdoflowd_migrate(config: Path, *options: str) -> Any:
    return subprocess.run(
        [
            *(sys.executable, "-m", "pdoflowd", "migrate"),
            *("--config", str(config), *options),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_pdoflowd_migrate_grants_named_roles_and_repeats_harmlessly(
    empty_dsn: str, empty_roles: Roles, tmp_path: Path
) -> None:
    poster, worker = (
        empty_roles.make(),
        empty_roles.make(f"pdoflowd daemon {uuid.uuid4().hex[:6]}"),
    )
    config = write_config(tmp_path / "d.toml", daemon_config(empty_dsn))
    for _ in range(2):
        done = pdoflowd_migrate(
            config, "--grant-submitter", poster, "--grant-daemon", worker
        )
        assert done.returncode == 0, done.stderr
    with psycopg.connect(empty_dsn) as conn:
        rows = conn.execute(
            "SELECT r, has_table_privilege(r, 'pdoflowd.jobs', 'UPDATE'),"
            " has_table_privilege(r, 'pdoflowd.jobs', 'SELECT'),"
            " has_column_privilege(r, 'pdoflowd.postings', 'poster',"
            "  'INSERT')"
            " FROM unnest(%s::text[]) AS r ORDER BY r",
            ([poster, worker],),
        ).fetchall()
    assert rows == sorted(
        [(poster, False, True, False), (worker, True, True, False)]
    )


def test_pdoflowd_migrate_names_a_missing_role_and_fails(
    empty_dsn: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "d.toml", daemon_config(empty_dsn))
    missing = "no_such_role_" + uuid.uuid4().hex[:8]
    done = pdoflowd_migrate(config, "--grant-submitter", missing)
    assert done.returncode == 69
    assert f'role "{missing}" does not exist' in done.stderr
