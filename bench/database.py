"""The benchmark's own SQL: set the stage, read the results.

Owns emptying the queue between phases, loading waiting jobs and finished
history in bulk (ids ordered as pdoflowd's time-ordered UUIDs are), a COPY
of pre-rendered job rows, resuming a paused posting, and the read-only
queries the figures come from. Rows that are measured are written by
pdoflowd's own code (the client and the daemon), or, for PostgreSQL's own
limits, by pgbench and by :func:`copy_jobs`; the other helpers only prepare
and observe. Every connection made here is named ``pdoflow-bench`` so it is
never counted as the daemon's.
"""

from __future__ import annotations

import contextlib
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from pdoflowd.db import postings

APPLICATION_NAME = "pdoflow-bench"
NOOP = "bench.jobs.noop"
NAP = "bench.jobs.nap"

Connection = psycopg.Connection[Any]


def connect(dsn: str, *, autocommit: bool = True) -> Connection:
    """A session of the benchmark itself (autocommit unless told)."""
    return psycopg.connect(
        dsn, autocommit=autocommit, application_name=APPLICATION_NAME
    )


def with_options(dsn: str, settings: Mapping[str, str]) -> str:
    """``dsn`` with session settings (``-c name=value``) added to it."""
    if not settings:
        return dsn
    options = " ".join(f"-c {k}={v}" for k, v in settings.items())
    return make_conninfo(dsn, options=options)


def reset(conn: Connection) -> None:
    """Empty the queue: no postings, no jobs, no daemons."""
    conn.execute(
        "TRUNCATE pdoflowd.jobs, pdoflowd.postings, pdoflowd.daemons"
        " RESTART IDENTITY CASCADE"
    )


def settle_storage(conn: Connection) -> None:
    """VACUUM ANALYZE the queue's tables, then CHECKPOINT if allowed.

    Every timed phase starts from this state, so that neither statistics
    nor a checkpoint due from the loading lands inside one phase only.
    """
    conn.execute("VACUUM ANALYZE pdoflowd.jobs")
    conn.execute("VACUUM ANALYZE pdoflowd.postings")
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        conn.execute("CHECKPOINT")


def _ordered_uuid_sql() -> str:
    # A fresh random prefix per load, then a counter: ids of one load sort
    # together in the unique index, as pdoflowd's uuid7 ids do.
    prefix = secrets.token_hex(4)
    return (
        f"format('{prefix}-0000-7000-8000-%%s', lpad(to_hex(g), 12, '0'))::uuid"
    )


def new_posting(
    conn: Connection, *, paused: bool, entry_point: str = NOOP
) -> int:
    """Insert one posting without jobs; return its id."""
    row = conn.execute(
        "INSERT INTO pdoflowd.postings"
        " (uuid, target_function, entry_point, status)"
        " VALUES (%s, %s, %s, %s) RETURNING id",
        (
            uuid.uuid4(),
            entry_point.rsplit(".", 1)[1],
            entry_point,
            "paused" if paused else "executing",
        ),
    ).fetchone()
    assert row is not None
    posting_id: int = row[0]
    return posting_id


def load_waiting(
    conn: Connection,
    count: int,
    *,
    paused: bool,
    entry_point: str = NOOP,
    priority: int = 0,
    posargs_sql: str = "jsonb_build_array(g)",
) -> int:
    """Insert one posting of ``count`` waiting jobs; return its id."""
    with conn.transaction():
        posting_id = new_posting(conn, paused=paused, entry_point=entry_point)
        conn.execute(
            "INSERT INTO pdoflowd.jobs (uuid, posting_id, priority, posargs)"
            f" SELECT {_ordered_uuid_sql()}, %s, %s, {posargs_sql}"
            " FROM generate_series(1, %s::bigint) AS g",
            (posting_id, priority, count),
        )
    return posting_id


def load_single_job_postings(conn: Connection, count: int) -> tuple[int, int]:
    """Insert ``count`` paused postings of one waiting job each.

    Returns the lowest and highest posting id: the postings of one load
    are the ids between them (the caller resets the queue beforehand).
    """
    with conn.transaction():
        rows = conn.execute(
            "WITH made AS ("
            "  INSERT INTO pdoflowd.postings"
            "    (uuid, target_function, entry_point, status)"
            "  SELECT gen_random_uuid(), %(name)s, %(entry_point)s, 'paused'"
            "  FROM generate_series(1, %(count)s::bigint)"
            "  RETURNING id"
            ")"
            " INSERT INTO pdoflowd.jobs (uuid, posting_id, priority, posargs)"
            " SELECT gen_random_uuid(), made.id, 0, jsonb_build_array(made.id)"
            " FROM made"
            " RETURNING posting_id",
            {
                "name": NOOP.rsplit(".", 1)[1],
                "entry_point": NOOP,
                "count": count,
            },
        ).fetchall()
    ids = [int(row[0]) for row in rows]
    return min(ids), max(ids)


def copy_jobs(conn: Connection, data: bytes) -> None:
    """COPY job rows already in COPY text, in one committed transaction.

    The columns, in their order, are those of ``Client.post``'s own COPY,
    whose lines ``postings.copy_blocks`` renders.
    """
    with (
        conn.transaction(),
        conn.cursor().copy(
            "COPY pdoflowd.jobs (uuid, priority, posargs, kwargs, posting_id,"
            " tries_remaining, run_after) FROM STDIN"
        ) as copy,
    ):
        copy.write(data)


def load_history(conn: Connection, count: int) -> None:
    """Insert ``count`` finished jobs (status done) in one posting."""
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO pdoflowd.postings"
            " (uuid, target_function, entry_point, status, finished_at)"
            " VALUES (%s, 'noop', %s, 'finished', now()) RETURNING id",
            (uuid.uuid4(), NOOP),
        ).fetchone()
        assert row is not None
        conn.execute(
            "INSERT INTO pdoflowd.jobs (uuid, posting_id, posargs, status,"
            " attempt, owner, daemon_id, claimed_at, work_started_at,"
            " completed_at, exited_ok)"
            f" SELECT {_ordered_uuid_sql()}, %s, jsonb_build_array(g),"
            " 'done', 1, %s, %s, now(), now(), now(), true"
            " FROM generate_series(1, %s::bigint) AS g",
            (row[0], uuid.uuid4(), uuid.uuid4(), count),
        )


def resume(conn: Connection, posting_id: int) -> float:
    """Let a paused posting run and wake the daemons.

    Returns the database clock (epoch seconds) at the start of the
    resuming transaction: a drain timed from it includes that commit.
    """
    with conn.transaction():
        row = conn.execute(
            "UPDATE pdoflowd.postings SET status = 'executing'"
            " WHERE id = %s RETURNING extract(epoch FROM now())::float8",
            (posting_id,),
        ).fetchone()
        assert row is not None
        postings.notify(conn)
    return float(row[0])


def resume_all(conn: Connection) -> float:
    """Let every paused posting run at once and wake the daemons.

    Returns the database clock (epoch seconds) at the start of the
    resuming transaction, as :func:`resume` does.
    """
    with conn.transaction():
        row = conn.execute(
            "UPDATE pdoflowd.postings SET status = 'executing'"
            " WHERE status = 'paused'"
            " RETURNING extract(epoch FROM now())::float8"
        ).fetchone()
        assert row is not None
        postings.notify(conn)
    return float(row[0])


def wait_finished(
    conn: Connection, posting_id: int, timeout_s: float, interval: float
) -> float:
    """Wait until the posting is final; return its finished_at (epoch s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        row = conn.execute(
            "SELECT status, extract(epoch FROM finished_at)::float8"
            " FROM pdoflowd.postings WHERE id = %s",
            (posting_id,),
        ).fetchone()
        assert row is not None
        if row[0] in ("finished", "errored_out"):
            return float(row[1])
        if time.monotonic() >= deadline:
            counts = job_counts(conn)
            raise TimeoutError(
                f"posting {posting_id} still {row[0]} after {timeout_s:g} s:"
                f" {counts}"
            )
        time.sleep(interval)


def wait_all_finished(
    conn: Connection, low: int, high: int, timeout_s: float, interval: float
) -> float:
    """Wait until postings ``low``..``high`` are all final.

    Returns the last of their finished_at (epoch seconds).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        row = conn.execute(
            "SELECT count(*) FILTER"
            "  (WHERE status NOT IN ('finished', 'errored_out')),"
            " extract(epoch FROM max(finished_at))::float8"
            " FROM pdoflowd.postings WHERE id BETWEEN %s AND %s",
            (low, high),
        ).fetchone()
        assert row is not None
        left, ended = row
        if left == 0 and ended is not None:
            return float(ended)
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{left} of {high - low + 1} postings still open after"
                f" {timeout_s:g} s"
            )
        time.sleep(interval)


def job_counts(
    conn: Connection, posting_id: int | None = None
) -> dict[str, int]:
    """Jobs per status, of one posting or of all."""
    where = "" if posting_id is None else " WHERE posting_id = %s"
    params = () if posting_id is None else (posting_id,)
    rows = conn.execute(
        f"SELECT status, count(*) FROM pdoflowd.jobs{where} GROUP BY status",
        params,
    ).fetchall()
    return {status: count for status, count in rows}


@dataclass(frozen=True)
class ClaimShape:
    """How a posting's jobs were claimed: attempts, claims, their sizes."""

    jobs: int
    reruns: int
    claims: int
    largest: int

    @property
    def mean(self) -> float:
        return self.jobs / self.claims if self.claims else 0.0


def claim_shape(conn: Connection, posting_id: int) -> ClaimShape:
    """Claims are told apart by (owner, claimed_at): one claim, one now()."""
    row = conn.execute(
        "SELECT coalesce(sum(n), 0), coalesce(sum(reruns), 0), count(*),"
        " coalesce(max(n), 0)"
        " FROM (SELECT count(*) AS n, count(*) FILTER (WHERE attempt > 1)"
        "       AS reruns"
        "       FROM pdoflowd.jobs WHERE posting_id = %s"
        "       GROUP BY owner, claimed_at) AS claims",
        (posting_id,),
    ).fetchone()
    assert row is not None
    return ClaimShape(int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def daemon_connections(conn: Connection, application_name: str) -> int:
    """Sessions of this database that carry the daemon's name."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = %s",
        (application_name,),
    ).fetchone()
    assert row is not None
    return int(row[0])


def pickup_latencies(
    conn: Connection, posting_ids: list[uuid.UUID]
) -> list[float]:
    """Seconds from each posting's transaction start to its job's start.

    ``postings.created_at`` is now() of the posting's transaction, so this
    includes writing and committing the posting; ``work_started_at`` is the
    worker's clock when it called the job (one host: one clock).
    """
    rows = conn.execute(
        "SELECT extract(epoch FROM j.work_started_at - p.created_at)::float8"
        " FROM pdoflowd.postings AS p"
        " JOIN pdoflowd.jobs AS j ON j.posting_id = p.id"
        " WHERE p.uuid = ANY(%s) AND j.status = 'done'",
        (posting_ids,),
    ).fetchall()
    return [float(r[0]) for r in rows]


def commit_times(conn: Connection, xids: list[str]) -> dict[str, float] | None:
    """Commit times (epoch s) of transactions, or None if not tracked."""
    row = conn.execute(
        "SELECT current_setting('track_commit_timestamp')"
    ).fetchone()
    if row is None or row[0] != "on":
        return None
    rows = conn.execute(
        "SELECT x, extract(epoch FROM pg_xact_commit_timestamp(x::xid))::float8"
        " FROM unnest(%s::text[]) AS x",
        (xids,),
    ).fetchall()
    return {xid: float(at) for xid, at in rows}


def server_facts(conn: Connection) -> dict[str, str]:
    """The server's version and the settings that bound commit rates."""
    names = (
        "server_version",
        "fsync",
        "synchronous_commit",
        "wal_sync_method",
        "shared_buffers",
        "max_wal_size",
        "full_page_writes",
        "track_commit_timestamp",
    )
    rows = conn.execute(
        "SELECT name, current_setting(name) FROM unnest(%s::text[]) AS name",
        (list(names),),
    ).fetchall()
    facts = {name: value for name, value in rows}
    row = conn.execute("SELECT version()").fetchone()
    assert row is not None
    facts["version"] = str(row[0])
    return facts
