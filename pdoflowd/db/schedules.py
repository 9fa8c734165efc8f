"""The schedules' statements: publishing them, claiming a fire time with
its posting, reading the runs, pruning them.

Owns the SQL of ``pdoflowd.schedules`` (what each daemon runs, for
``pdoflow schedules``) and ``pdoflowd.schedule_runs`` (each fire time
posted once: its primary key is the claim). A fire time is claimed in the
transaction that inserts its posting, so a daemon that loses the race, or
fails half-way, leaves nothing behind. Callers pass plain values and their
own connection (the database session's, in autocommit mode).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple
from uuid import UUID

from pdoflowd.db.common import Connection
from pdoflowd.db.postings import InsertedPosting, KeyScope, insert_posting
from pdoflowd.ids import uuid7

__all__ = [
    "PublishedSchedule",
    "ScheduleListing",
    "claim_run",
    "list_schedules",
    "newest_runs",
    "prune_runs",
    "publish",
]


class PublishedSchedule(NamedTuple):
    """A schedule as a daemon publishes it (args and kwargs as JSON text)."""

    name: str
    entry_point: str
    cron: str | None
    every_s: int | None
    timezone: str
    priority: int
    backfill: int
    key_template: str
    args_json: str
    kwargs_json: str


_UNPUBLISH = "DELETE FROM pdoflowd.schedules WHERE daemon_id = %s"
_PUBLISH = """
INSERT INTO pdoflowd.schedules
    (daemon_id, name, entry_point, cron, every_s, timezone, priority,
     backfill, key_template, args, kwargs)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb)
"""


def publish(
    conn: Connection, daemon_id: UUID, schedules: Iterable[PublishedSchedule]
) -> dt.datetime:
    """Replace the daemon's published schedules with these (its row in
    pdoflowd.daemons must exist); return the database's time."""
    with conn.transaction():
        conn.execute(_UNPUBLISH, (daemon_id,))
        rows = [(daemon_id, *schedule) for schedule in schedules]
        if rows:
            with conn.cursor() as cur:
                cur.executemany(_PUBLISH, rows)
        row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    now: dt.datetime = row[0]
    return now


_NEWEST_RUNS = """
SELECT now(), n.name, r.run_at
FROM unnest(%s::text[]) AS n(name)
LEFT JOIN LATERAL (
    SELECT run_at FROM pdoflowd.schedule_runs
    WHERE schedule = n.name
    ORDER BY run_at DESC
    LIMIT 1
) AS r ON true
"""


def newest_runs(
    conn: Connection, names: Sequence[str]
) -> tuple[dt.datetime, dict[str, dt.datetime | None]]:
    """The database's time, and each schedule's newest fire time posted
    by any daemon (None: never)."""
    if not names:
        row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        return row[0], {}
    rows = conn.execute(_NEWEST_RUNS, (list(names),)).fetchall()
    return rows[0][0], {name: run_at for _, name, run_at in rows}


# The claim: nothing when the fire time is taken, or when a later one is
# recorded (so rows older than the newest may be pruned safely). The
# insert waits for a concurrent claim of the same fire time to commit or
# roll back.
_CLAIM = """
INSERT INTO pdoflowd.schedule_runs (schedule, run_at, daemon_id)
SELECT %(schedule)s, %(run_at)s, %(daemon_id)s
WHERE NOT EXISTS (
    SELECT FROM pdoflowd.schedule_runs
    WHERE schedule = %(schedule)s AND run_at >= %(run_at)s)
ON CONFLICT (schedule, run_at) DO NOTHING
RETURNING true
"""
_RECORD_POSTING = """
UPDATE pdoflowd.schedule_runs SET posting_id = %(posting_id)s
WHERE schedule = %(schedule)s AND run_at = %(run_at)s
"""


def claim_run(
    conn: Connection,
    *,
    schedule: str,
    run_at: dt.datetime,
    daemon_id: UUID,
    entry_point: str,
    target_function: str,
    args_json: str,
    kwargs_json: str,
    priority: int,
    tries: int,
    key: str | None,
) -> InsertedPosting | None:
    """Claim ``schedule``'s fire time ``run_at`` and post its one job, in
    one transaction; None when it was claimed already (by anyone).

    The posting carries ``key`` (scope forever): when a posting of this
    role holds it already, that one is the run's posting and nothing new
    is made (``existed`` true).
    """
    params: dict[str, Any] = {
        "schedule": schedule,
        "run_at": run_at,
        "daemon_id": daemon_id,
    }
    with conn.transaction():
        if conn.execute(_CLAIM, params).fetchone() is None:
            return None
        job_id = str(uuid7())
        posting = insert_posting(
            conn,
            posting_uuid=uuid7(),
            target_function=target_function,
            entry_point=entry_point,
            jobs=[(job_id, priority, args_json, kwargs_json)],
            tries=tries,
            key=key,
            key_scope=KeyScope.FOREVER,
        )
        conn.execute(_RECORD_POSTING, {**params, "posting_id": posting.id})
    return posting


# Every schedule's rows older than the cutoff, except its newest.
_PRUNE = """
DELETE FROM pdoflowd.schedule_runs AS r
WHERE r.run_at < now() - make_interval(secs => %s)
  AND EXISTS (
      SELECT FROM pdoflowd.schedule_runs AS n
      WHERE n.schedule = r.schedule AND n.run_at > r.run_at)
"""


def prune_runs(conn: Connection, older_than_s: float) -> int:
    """Forget the runs older than ``older_than_s`` (each schedule's newest
    is kept); return how many were deleted."""
    cur = conn.execute(_PRUNE, (older_than_s,))
    return cur.rowcount


class ScheduleListing(NamedTuple):
    """One schedule as live daemons publish it, with its newest run.

    ``hosts`` are the live daemons' host names that run this definition;
    the run's posting is None once retention deleted it (or never made).
    """

    name: str
    entry_point: str
    cron: str | None
    every_s: int | None
    timezone: str
    priority: int
    backfill: int
    key_template: str
    args: Any
    kwargs: Any
    hosts: tuple[str, ...]
    last_run_at: dt.datetime | None
    last_posted_at: dt.datetime | None
    last_posting: UUID | None
    last_posting_status: str | None


# Live daemons: not stopped, and their lease not run out. A definition
# published by several daemons is one row, with each daemon's host.
_LIST = """
WITH live AS (
    SELECT s.*, d.hostname
    FROM pdoflowd.schedules AS s
    JOIN pdoflowd.daemons AS d ON d.id = s.daemon_id
    WHERE d.stopped_at IS NULL
      AND d.heartbeat_at + make_interval(secs => d.lease_s) > now()
), defined AS (
    SELECT name, entry_point, cron, every_s, timezone, priority, backfill,
           key_template, args, kwargs,
           array_agg(DISTINCT hostname ORDER BY hostname) AS hosts
    FROM live
    GROUP BY name, entry_point, cron, every_s, timezone, priority, backfill,
             key_template, args, kwargs
)
SELECT now(), d.name, d.entry_point, d.cron, d.every_s, d.timezone,
       d.priority, d.backfill, d.key_template, d.args, d.kwargs, d.hosts,
       r.run_at, r.posted_at, p.uuid, p.status
FROM defined AS d
LEFT JOIN LATERAL (
    SELECT run_at, posted_at, posting_id FROM pdoflowd.schedule_runs
    WHERE schedule = d.name
    ORDER BY run_at DESC
    LIMIT 1
) AS r ON true
LEFT JOIN pdoflowd.postings AS p ON p.id = r.posting_id
ORDER BY d.name, d.hosts
"""


def list_schedules(
    conn: Connection,
) -> tuple[dt.datetime, list[ScheduleListing]]:
    """The database's time and the schedules of the live daemons, by name."""
    rows = conn.execute(_LIST).fetchall()
    if not rows:
        row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        return row[0], []
    listings = [
        ScheduleListing(
            name=row[1],
            entry_point=row[2],
            cron=row[3],
            every_s=row[4],
            timezone=row[5],
            priority=row[6],
            backfill=row[7],
            key_template=row[8],
            args=row[9],
            kwargs=row[10],
            hosts=tuple(row[11]),
            last_run_at=row[12],
            last_posted_at=row[13],
            last_posting=row[14],
            last_posting_status=row[15],
        )
        for row in rows
    ]
    return rows[0][0], listings
