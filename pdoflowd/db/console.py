"""The statements only the web console needs.

Owns what ``pdoflowd web`` reads beyond what the client and the metrics
already have: the queue by priority and status, the live daemons and what
their workers run, jobs ended per minute, postings filtered and paged, a
posting's jobs paged, its failures grouped, its profile summary and the
schedule runs that made it. Every statement reads only; row-level
security limits them to what the console's role may see. Callers pass
plain values and their own connection; the console validates them first.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from pdoflowd.db.common import Connection
from pdoflowd.status import JobStatus, PostingStatus

__all__ = [
    "DaemonRow",
    "Failure",
    "MinuteCount",
    "PostingFilter",
    "PostingRow",
    "ScheduleRun",
    "WorkerRow",
    "daemons",
    "ended_per_minute",
    "failures",
    "filtered_postings",
    "jobs_by_priority",
    "posting_schedule_runs",
    "set_read_deadline",
]


def set_read_deadline(conn: Connection, seconds: float) -> None:
    """Bound every statement of this session: a page never hangs on a
    huge table or a held lock, it fails with a message."""
    millis = str(max(1, round(seconds * 1000)))
    conn.execute("SELECT set_config('statement_timeout', %s, false)", (millis,))
    conn.execute("SELECT set_config('lock_timeout', %s, false)", (millis,))


# ---------------------------------------------------------------- overview

_JOBS_BY_PRIORITY = """
SELECT j.priority, j.status, count(*)
FROM pdoflowd.jobs AS j
GROUP BY j.priority, j.status
ORDER BY j.priority DESC
"""


def jobs_by_priority(conn: Connection) -> dict[int, dict[JobStatus, int]]:
    """How many jobs are in each status, per priority (highest first)."""
    table: dict[int, dict[JobStatus, int]] = {}
    for priority, status, count in conn.execute(_JOBS_BY_PRIORITY):
        row = table.setdefault(priority, dict.fromkeys(JobStatus, 0))
        row[JobStatus(status)] = int(count)
    return table


@dataclass(frozen=True)
class WorkerRow:
    """One live worker of a daemon (its owner token) and the jobs it has
    claimed now: none means idle."""

    owner: UUID
    jobs: tuple[UUID, ...]
    entry_points: tuple[str, ...]
    since: dt.datetime | None


@dataclass(frozen=True)
class DaemonRow:
    """A daemon that has not stopped, with its workers."""

    id: UUID
    hostname: str
    pid: int
    version: str
    started_at: dt.datetime
    heartbeat_age_s: float
    lease_s: float
    provides: tuple[str, ...]
    posters: tuple[str, ...]
    workers: tuple[WorkerRow, ...]

    @property
    def alive(self) -> bool:
        return self.heartbeat_age_s <= self.lease_s


_DAEMONS = """
SELECT d.id, d.hostname, d.pid, d.version, d.started_at,
       extract(epoch FROM now() - d.heartbeat_at)::float8, d.lease_s,
       d.provides, d.posters, d.live_owners
FROM pdoflowd.daemons AS d
WHERE d.stopped_at IS NULL
ORDER BY d.hostname, d.pid
"""

_CLAIMS = """
SELECT j.daemon_id, j.owner, j.uuid, p.entry_point, j.claimed_at
FROM pdoflowd.jobs AS j
JOIN pdoflowd.postings AS p ON p.id = j.posting_id
WHERE j.status = 'executing' AND j.owner IS NOT NULL
ORDER BY j.claimed_at, j.id
"""


def daemons(conn: Connection) -> list[DaemonRow]:
    """Every daemon not stopped, each live worker and what it runs."""
    with conn.transaction():
        rows = conn.execute(_DAEMONS).fetchall()
        claims = conn.execute(_CLAIMS).fetchall()
    by_owner: dict[UUID, list[tuple[UUID, str, dt.datetime | None]]] = {}
    for _, owner, job, entry_point, claimed_at in claims:
        by_owner.setdefault(owner, []).append((job, entry_point, claimed_at))
    result = []
    for row in rows:
        workers = []
        for owner in row[9]:
            held = by_owner.get(owner, [])
            workers.append(
                WorkerRow(
                    owner=owner,
                    jobs=tuple(job for job, _, _ in held),
                    entry_points=tuple(sorted({e for _, e, _ in held})),
                    since=min((c for _, _, c in held if c), default=None),
                )
            )
        result.append(
            DaemonRow(
                id=row[0],
                hostname=row[1],
                pid=row[2],
                version=row[3],
                started_at=row[4],
                heartbeat_age_s=float(row[5]),
                lease_s=float(row[6]),
                provides=tuple(row[7]),
                posters=tuple(row[8]),
                workers=tuple(workers),
            )
        )
    return result


@dataclass(frozen=True)
class MinuteCount:
    """Jobs that ended in one minute: done, and errored out."""

    minute: dt.datetime
    done: int
    errored: int


_ENDED_PER_MINUTE = """
WITH minutes AS (
    SELECT generate_series(
        date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1),
        date_trunc('minute', now()), interval '1 minute') AS minute
), ended AS (
    SELECT date_trunc('minute', j.completed_at) AS minute,
           count(*) FILTER (WHERE j.status = 'done') AS done,
           count(*) FILTER (WHERE j.status = 'errored_out') AS errored
    FROM pdoflowd.jobs AS j
    WHERE j.status IN ('done', 'errored_out')
      AND j.completed_at >= date_trunc('minute', now())
                            - make_interval(mins => %(minutes)s - 1)
    GROUP BY 1
)
SELECT m.minute, coalesce(e.done, 0), coalesce(e.errored, 0)
FROM minutes AS m
LEFT JOIN ended AS e ON e.minute = m.minute
ORDER BY m.minute
"""


def ended_per_minute(conn: Connection, minutes: int = 60) -> list[MinuteCount]:
    """Jobs done and errored out in each of the last ``minutes`` minutes,
    oldest first (the current, unfinished minute last)."""
    rows = conn.execute(_ENDED_PER_MINUTE, {"minutes": minutes}).fetchall()
    return [MinuteCount(r[0], int(r[1]), int(r[2])) for r in rows]


# ---------------------------------------------------------------- postings


@dataclass(frozen=True)
class PostingFilter:
    """What the postings list shows: every field None or "" is no filter.
    ``target`` matches a part of the entry point, ``search`` a part of the
    entry point or the start of the posting's id; ``max_age_s`` keeps
    postings made at most that long ago."""

    status: PostingStatus | None = None
    target: str = ""
    poster: str = ""
    max_age_s: float | None = None
    search: str = ""


@dataclass(frozen=True)
class PostingRow:
    """One posting of the list, with its jobs counted by status."""

    uuid: UUID
    poster: str
    entry_point: str
    status: PostingStatus
    created_at: dt.datetime
    finished_at: dt.datetime | None
    jobs: dict[JobStatus, int]
    age_s: float

    @property
    def total(self) -> int:
        return sum(self.jobs.values())

    @property
    def ended(self) -> int:
        return self.jobs[JobStatus.DONE] + self.jobs[JobStatus.ERRORED_OUT]


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%")
    return "%" + escaped.replace("_", "\\_") + "%"


_FILTERED_POSTINGS = """
SELECT p.uuid, p.poster, p.entry_point, p.status, p.created_at,
       p.finished_at, c.waiting, c.executing, c.done, c.errored_out,
       extract(epoch FROM now() - p.created_at)::float8, c.held
FROM pdoflowd.postings AS p
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE j.status = 'held') AS held,
           count(*) FILTER (WHERE j.status = 'waiting') AS waiting,
           count(*) FILTER (WHERE j.status = 'executing') AS executing,
           count(*) FILTER (WHERE j.status = 'done') AS done,
           count(*) FILTER (WHERE j.status = 'errored_out') AS errored_out
    FROM pdoflowd.jobs AS j
    WHERE j.posting_id = p.id
) AS c
WHERE p.id IN (
    SELECT q.id FROM pdoflowd.postings AS q
    WHERE (%(status)s::text IS NULL OR q.status = %(status)s)
      AND (%(target)s::text IS NULL OR q.entry_point ILIKE %(target)s)
      AND (%(poster)s::text IS NULL OR q.poster = %(poster)s)
      AND (%(max_age_s)s::float8 IS NULL
           OR q.created_at >= now() - make_interval(secs => %(max_age_s)s))
      AND (%(search)s::text IS NULL OR q.entry_point ILIKE %(search)s
           OR q.uuid::text LIKE %(prefix)s)
    ORDER BY q.id DESC
    LIMIT %(limit)s OFFSET %(offset)s)
ORDER BY p.id DESC
"""


def filtered_postings(
    conn: Connection, where: PostingFilter, *, limit: int, offset: int
) -> list[PostingRow]:
    """The postings ``where`` admits, newest first, one page of them."""
    search = where.search.strip()
    params: dict[str, Any] = {
        "status": None if where.status is None else where.status.value,
        "target": _like(where.target) if where.target else None,
        "poster": where.poster or None,
        "max_age_s": where.max_age_s,
        "search": _like(search) if search else None,
        "prefix": search.lower().replace("%", "").replace("_", "") + "%",
        "limit": limit,
        "offset": offset,
    }
    rows = conn.execute(_FILTERED_POSTINGS, params).fetchall()
    return [
        PostingRow(
            uuid=r[0],
            poster=r[1],
            entry_point=r[2],
            status=PostingStatus(r[3]),
            created_at=r[4],
            finished_at=r[5],
            jobs={
                JobStatus.WAITING: int(r[6]),
                JobStatus.EXECUTING: int(r[7]),
                JobStatus.DONE: int(r[8]),
                JobStatus.ERRORED_OUT: int(r[9]),
                JobStatus.HELD: int(r[11]),
            },
            age_s=float(r[10]),
        )
        for r in rows
    ]


@dataclass(frozen=True)
class Failure:
    """Errored-out jobs of a posting sharing one error text."""

    kind: str
    message: str
    count: int
    example: UUID


_FAILURES = """
SELECT split_part(j.error, E'\\n', 1) AS first_line, count(*),
       (array_agg(j.uuid ORDER BY j.id))[1]
FROM pdoflowd.jobs AS j
JOIN pdoflowd.postings AS p ON p.id = j.posting_id
WHERE p.uuid = %(uuid)s AND j.status = 'errored_out'
GROUP BY first_line
ORDER BY count(*) DESC, first_line
LIMIT %(limit)s
"""


def failures(
    conn: Connection, posting_uuid: UUID, *, limit: int = 50
) -> list[Failure]:
    """A posting's errored-out jobs grouped by exception type and message
    (the error's first line, "Type: message"), the commonest first."""
    rows = conn.execute(
        _FAILURES, {"uuid": posting_uuid, "limit": limit}
    ).fetchall()
    result = []
    for text, count, example in rows:
        kind, colon, message = (text or "").partition(": ")
        if not colon or not kind.replace(".", "").isidentifier():
            kind, message = "", text or ""
        result.append(Failure(kind, message, int(count), example))
    return result


@dataclass(frozen=True)
class ScheduleRun:
    """The schedule fire time that made a posting."""

    schedule: str
    run_at: dt.datetime
    posted_at: dt.datetime | None


_SCHEDULE_RUNS = """
SELECT r.schedule, r.run_at, r.posted_at
FROM pdoflowd.schedule_runs AS r
JOIN pdoflowd.postings AS p ON p.id = r.posting_id
WHERE p.uuid = %(uuid)s
ORDER BY r.run_at
"""


def posting_schedule_runs(
    conn: Connection, posting_uuid: UUID
) -> list[ScheduleRun]:
    """The schedule runs that posted this posting (usually none or one)."""
    rows = conn.execute(_SCHEDULE_RUNS, {"uuid": posting_uuid}).fetchall()
    return [ScheduleRun(*row) for row in rows]
