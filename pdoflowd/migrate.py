"""Versioned schema migrations of the ``pdoflowd`` PostgreSQL schema.

Owns the ordered ``migrations/NNNN_name.sql`` files, the ``schema.sql``
snapshot a fresh install uses, and applying them under an advisory lock so that
several hosts may run ``pdoflowd migrate`` at once. It must not hold any other
SQL: the queue's statements live in :mod:`pdoflowd.queries`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

SCHEMA = "pdoflowd"
# Any fixed number; all pdoflowd processes agree on it.
_MIGRATION_LOCK_KEY = 0x706466_6D6967

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One step of the schema's history."""

    version: int
    name: str
    sql: str


class SchemaNotCurrent(Exception):
    """The database's schema is not the one this code was written for."""


def migrations() -> tuple[Migration, ...]:
    """Every migration shipped with the package, in order."""
    found = []
    for entry in resources.files("pdoflowd.migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(
                Migration(int(match[1]), match[2], entry.read_text("utf-8"))
            )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations are not numbered 1..n: {versions}")
    return tuple(found)


def latest_version() -> int:
    """The schema version this code needs."""
    return migrations()[-1].version


def _snapshot() -> str:
    return (resources.files("pdoflowd") / "schema.sql").read_text("utf-8")


def current_version(conn: psycopg.Connection[Any]) -> int | None:
    """The version applied in the database, or None when there is none."""
    row = conn.execute(
        "SELECT to_regclass('pdoflowd.schema_migrations') IS NOT NULL"
    ).fetchone()
    if not row or not row[0]:
        return None
    row = conn.execute(
        "SELECT max(version) FROM pdoflowd.schema_migrations"
    ).fetchone()
    return None if row is None else row[0]


def check_current(conn: psycopg.Connection[Any]) -> None:
    """Raise :class:`SchemaNotCurrent` unless the schema is exactly current."""
    have, want = current_version(conn), latest_version()
    if have is None:
        raise SchemaNotCurrent(
            "the database has no pdoflowd schema; run `pdoflowd migrate`"
        )
    if have < want:
        raise SchemaNotCurrent(
            f"the database schema is at version {have}, this pdoflowd needs "
            f"{want}; run `pdoflowd migrate`"
        )
    if have > want:
        raise SchemaNotCurrent(
            f"the database schema is at version {have}, newer than this "
            f"pdoflowd knows ({want}); upgrade pdoflowd"
        )


def upgrade(conninfo: str, *, fresh_snapshot: bool = True) -> list[int]:
    """Bring the schema to the latest version; return the versions applied.

    A database without the schema gets ``schema.sql`` in one step when
    ``fresh_snapshot`` is true, else every migration in turn (the two must
    give the same schema; a test holds them to it). Runs in one transaction
    under an advisory lock: concurrent callers wait, then find nothing to do.
    """
    with psycopg.connect(conninfo, application_name="pdoflowd-migrate") as conn:
        return upgrade_connection(conn, fresh_snapshot=fresh_snapshot)


def upgrade_connection(
    conn: psycopg.Connection[Any], *, fresh_snapshot: bool = True
) -> list[int]:
    """:func:`upgrade` on an open connection (committed on success)."""
    steps = migrations()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
        conn.execute("CREATE SCHEMA IF NOT EXISTS pdoflowd")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS pdoflowd.schema_migrations ("
            " version integer PRIMARY KEY,"
            " name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        have = current_version(conn) or 0
        if have > steps[-1].version:
            raise SchemaNotCurrent(
                f"the database schema is at version {have}, newer than this "
                f"pdoflowd knows ({steps[-1].version})"
            )
        pending = [m for m in steps if m.version > have]
        if not pending:
            return []
        if have == 0 and fresh_snapshot:
            conn.execute(_snapshot().encode())
        else:
            for step in pending:
                conn.execute(step.sql.encode())
        for step in pending:
            conn.execute(
                "INSERT INTO pdoflowd.schema_migrations (version, name)"
                " VALUES (%s, %s)",
                (step.version, step.name),
            )
        return [m.version for m in pending]
