"""Schema migrations: fresh equals migrated, concurrency, version checks."""

from __future__ import annotations

import subprocess
import threading
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from devtools.devcluster import find_bin_dir
from pdoflowd.db import migrate


def schema_dump(dsn: str) -> str:
    """The pdoflowd schema as pg_dump prints it, without volatile lines."""
    params = conninfo_to_dict(dsn)
    out = subprocess.run(
        [
            str(find_bin_dir() / "pg_dump"),
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--schema=pdoflowd",
            "--exclude-table-data=pdoflowd.schema_migrations",
            f"--host={params.get('host', '')}",
            f"--port={params.get('port', '')}",
            f"--username={params.get('user', '')}",
            str(params["dbname"]),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return "\n".join(
        line
        for line in out.splitlines()
        if line and not line.startswith(("--", "\\restrict", "\\unrestrict"))
    )


def test_fresh_schema_equals_the_migrated_one(
    pg_server: Any, empty_dsn: str
) -> None:
    other = pg_server.create_database("t_migrated_" + empty_dsn[-8:])
    try:
        assert migrate.upgrade(empty_dsn, fresh_snapshot=True)
        assert migrate.upgrade(other, fresh_snapshot=False)
        assert schema_dump(empty_dsn) == schema_dump(other)
    finally:
        pg_server.drop_database("t_migrated_" + empty_dsn[-8:])


def test_migrations_are_numbered_from_one() -> None:
    versions = [m.version for m in migrate.migrations()]
    assert versions == list(range(1, len(versions) + 1))
    assert migrate.latest_version() == versions[-1]


def test_upgrade_applies_every_version_once(empty_dsn: str) -> None:
    applied = migrate.upgrade(empty_dsn)
    assert applied == [m.version for m in migrate.migrations()]
    assert migrate.upgrade(empty_dsn) == []
    with psycopg.connect(empty_dsn) as conn:
        assert migrate.current_version(conn) == migrate.latest_version()
        migrate.check_current(conn)


def test_concurrent_migrations_apply_the_schema_once(empty_dsn: str) -> None:
    results: list[list[int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        barrier.wait()
        try:
            results.append(migrate.upgrade(empty_dsn))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    every = [m.version for m in migrate.migrations()]
    assert sorted(results, key=len) == [[], [], [], every]


def test_check_current_refuses_a_database_without_schema(
    empty_dsn: str,
) -> None:
    with (
        psycopg.connect(empty_dsn) as conn,
        pytest.raises(migrate.SchemaNotCurrent, match="pdoflowd migrate"),
    ):
        migrate.check_current(conn)


def test_check_current_refuses_a_schema_behind_the_code(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "DELETE FROM pdoflowd.schema_migrations WHERE version = %s",
            (migrate.latest_version(),),
        )
        with pytest.raises(migrate.SchemaNotCurrent, match="pdoflowd migrate"):
            migrate.check_current(conn)


def test_check_current_refuses_a_schema_ahead_of_the_code(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pdoflowd.schema_migrations (version, name)"
            " VALUES (%s, 'future')",
            (migrate.latest_version() + 1,),
        )
        with pytest.raises(migrate.SchemaNotCurrent, match="newer"):
            migrate.check_current(conn)
