"""Versioned schema migrations of the ``pdoflowd`` PostgreSQL schema.

Owns the ordered ``migrations/NNNN_name.sql`` files, the ``schema.sql``
snapshot a fresh install uses, applying them under an advisory lock so that
several hosts may run ``pdoflowd migrate`` at once, and the privileges of the
two kinds of roles (submitters, daemons), granted on request. It must not
hold any other SQL: the queue's statements live in :mod:`pdoflowd.db`.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

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
    for entry in resources.files("pdoflowd.db.migrations").iterdir():
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
    return (resources.files("pdoflowd.db") / "schema.sql").read_text("utf-8")


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
        if have:
            _grant_again(conn)
        return [m.version for m in pending]


# Roles granted a submitter's privileges (INSERT on a posting's uuid), and
# a daemon's (UPDATE on the jobs table), by name.
_GRANTED_ROLES = """
SELECT DISTINCT pg_get_userbyid(g.grantee), 'submitter'
FROM pg_attribute AS a, aclexplode(a.attacl) AS g
WHERE a.attrelid = 'pdoflowd.postings'::regclass AND a.attname = 'uuid'
  AND g.privilege_type = 'INSERT' AND g.grantee <> 0
UNION
SELECT DISTINCT pg_get_userbyid(g.grantee), 'daemon'
FROM pg_class AS c, aclexplode(c.relacl) AS g
WHERE c.oid = 'pdoflowd.jobs'::regclass AND g.privilege_type = 'UPDATE'
  AND g.grantee <> 0 AND g.grantee <> c.relowner
"""


def _grant_again(conn: psycopg.Connection[Any]) -> None:
    """Give the roles granted before an upgrade what the grants give now
    (a new version's columns, tables and functions), in the upgrade's
    transaction: their owners need not grant again after upgrading."""
    rows = conn.execute(_GRANTED_ROLES).fetchall()
    grants = Grants(
        submitters=[r[0] for r in rows if r[1] == "submitter"],
        daemons=[r[0] for r in rows if r[1] == "daemon"],
    )
    for statement in grant_statements(grants):
        conn.execute(statement)


# ---------------------------------------------------------------- roles

# What a submitter may do: read and add postings and jobs (row-level
# security shows it only its own), keep its postings' shared variables, ask
# which daemons (and hosts) run what, and steer its postings and jobs
# through the checked functions. It cannot update a job, nor choose the
# poster of a posting.
SUBMITTER_GRANTS = (
    "GRANT USAGE ON SCHEMA pdoflowd TO {role}",
    "GRANT SELECT ON pdoflowd.postings, pdoflowd.jobs,"
    " pdoflowd.shared_variables TO {role}",
    "GRANT INSERT (uuid, target_function, entry_point, status, timeout_s,"
    " requires, store_result, tries, idempotency_key, key_scope,"
    " max_running, uses)"
    " ON pdoflowd.postings TO {role}",
    "GRANT INSERT (uuid, posting_id, priority, posargs, kwargs,"
    " tries_remaining, run_after) ON pdoflowd.jobs TO {role}",
    "GRANT INSERT, UPDATE, DELETE ON pdoflowd.shared_variables TO {role}",
    "GRANT SELECT (id, hostname, pid, provides, posters, stopped_at, limits)"
    " ON pdoflowd.daemons TO {role}",
    "GRANT EXECUTE ON FUNCTION"
    " pdoflowd.control_posting(uuid, text, integer) TO {role}",
    "GRANT EXECUTE ON FUNCTION"
    " pdoflowd.control_job(uuid, text, integer) TO {role}",
    "GRANT SELECT ON pdoflowd.job_output TO {role}",
    "GRANT SELECT ON pdoflowd.posting_dependencies TO {role}",
    "GRANT EXECUTE ON FUNCTION"
    " pdoflowd.wait_for_postings(uuid, uuid[], text) TO {role}",
)

# What a daemon may do: check the schema version, claim, record, rescue and
# settle (UPDATE on postings and jobs, which also lets it see every
# posting), prune ended postings (DELETE; their jobs' profiles and their
# shared variables go by ON DELETE CASCADE), post its schedules' postings
# (as their poster, which it cannot choose) and record their runs, register
# itself, share variables with its jobs, store profiles.
DAEMON_GRANTS = (
    "GRANT USAGE ON SCHEMA pdoflowd TO {role}",
    "GRANT SELECT ON pdoflowd.schema_migrations TO {role}",
    "GRANT SELECT, UPDATE, DELETE ON pdoflowd.postings, pdoflowd.jobs"
    " TO {role}",
    "GRANT INSERT (uuid, target_function, entry_point, status, timeout_s,"
    " requires, store_result, tries, idempotency_key, key_scope,"
    " max_running, uses)"
    " ON pdoflowd.postings TO {role}",
    "GRANT INSERT (uuid, posting_id, priority, posargs, kwargs,"
    " tries_remaining, run_after) ON pdoflowd.jobs TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON pdoflowd.schedule_runs,"
    " pdoflowd.schedules TO {role}",
    "GRANT SELECT, INSERT, UPDATE ON pdoflowd.daemons TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON pdoflowd.shared_variables"
    " TO {role}",
    "GRANT SELECT, INSERT ON pdoflowd.job_profiles,"
    " pdoflowd.profile_functions, pdoflowd.profile_function_stats,"
    " pdoflowd.profile_call_map TO {role}",
    "GRANT EXECUTE ON FUNCTION"
    " pdoflowd.control_posting(uuid, text, integer) TO {role}",
    "GRANT EXECUTE ON FUNCTION"
    " pdoflowd.control_job(uuid, text, integer) TO {role}",
    "GRANT SELECT, INSERT, UPDATE ON pdoflowd.job_output TO {role}",
    "GRANT SELECT ON pdoflowd.posting_dependencies TO {role}",
)


@dataclass(frozen=True)
class Grants:
    """Roles to grant the submitter's or the daemon's privileges to."""

    submitters: Sequence[str] = ()
    daemons: Sequence[str] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Grants:
        return cls(
            tuple(getattr(args, "grant_submitter", None) or ()),
            tuple(getattr(args, "grant_daemon", None) or ()),
        )


def add_grant_arguments(parser: argparse.ArgumentParser) -> None:
    """``--grant-submitter ROLE`` and ``--grant-daemon ROLE`` (repeatable)."""
    parser.add_argument(
        "--grant-submitter",
        action="append",
        metavar="ROLE",
        help="grant ROLE what a submitter needs (repeat for more roles)",
    )
    parser.add_argument(
        "--grant-daemon",
        action="append",
        metavar="ROLE",
        help="grant ROLE what the daemon needs (repeat for more roles)",
    )


def grant_statements(grants: Grants) -> list[sql.Composed]:
    """The GRANT statements for the roles named, role names quoted."""
    statements = []
    for templates, roles in (
        (SUBMITTER_GRANTS, grants.submitters),
        (DAEMON_GRANTS, grants.daemons),
    ):
        for role in roles:
            for template in templates:
                statements.append(
                    sql.SQL(template).format(role=sql.Identifier(role))
                )
    return statements


def apply_grants(conn: psycopg.Connection[Any], grants: Grants) -> None:
    """Grant the roles their privileges, in one transaction; idempotent.

    The schema must be current; a role that does not exist is an error
    (``psycopg.errors.UndefinedObject``) and nothing is granted.
    """
    statements = grant_statements(grants)
    if not statements:
        return
    with conn.transaction():
        check_current(conn)
        for statement in statements:
            conn.execute(statement)
