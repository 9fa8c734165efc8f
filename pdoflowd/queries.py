"""Every statement of the queue, parameterised, and nothing else.

Owns the SQL for posting, claiming, recording outcomes (fenced by the claim's
owner token and attempt), rescuing, heartbeats and progress counts, and the
small typed rows these return. It knows nothing of processes, signals or
configuration: callers pass plain values and their own connection.
Schema changes belong to :mod:`pdoflowd.migrate`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg

from pdoflowd.status import JobStatus, PostingStatus

NOTIFY_CHANNEL = "pdoflowd_jobs"

Connection = psycopg.Connection[Any]


# ---------------------------------------------------------------- posting


@dataclass(frozen=True)
class NewJob:
    """One row to enqueue: arguments already encoded as JSON text."""

    uuid: UUID
    priority: int
    posargs_json: str
    kwargs_json: str


_INSERT_POSTING = """
INSERT INTO pdoflowd.postings
    (uuid, target_function, entry_point, status, timeout_s)
VALUES (%(uuid)s, %(target_function)s, %(entry_point)s, %(status)s,
        %(timeout_s)s)
RETURNING id
"""

_COPY_JOBS = """
COPY pdoflowd.jobs
    (uuid, posting_id, priority, posargs, kwargs, tries_remaining, run_after)
FROM STDIN
"""


def insert_posting(
    conn: Connection,
    *,
    posting_uuid: UUID,
    target_function: str,
    entry_point: str,
    jobs: Iterable[NewJob],
    tries: int,
    paused: bool = False,
    timeout_s: float | None = None,
    run_after: dt.datetime | None = None,
) -> int:
    """Insert a posting and its jobs (one COPY) and NOTIFY the daemons.

    Runs in the caller's transaction: nothing is visible, and nobody is
    woken, until the caller commits. Returns the posting's internal id.
    """
    status = PostingStatus.PAUSED if paused else PostingStatus.EXECUTING
    row = conn.execute(
        _INSERT_POSTING,
        {
            "uuid": posting_uuid,
            "target_function": target_function,
            "entry_point": entry_point,
            "status": status.value,
            "timeout_s": timeout_s,
        },
    ).fetchone()
    assert row is not None
    posting_id: int = row[0]
    with conn.cursor().copy(_COPY_JOBS) as copy:
        for new in jobs:
            copy.write_row(
                (
                    new.uuid,
                    posting_id,
                    new.priority,
                    new.posargs_json,
                    new.kwargs_json,
                    tries,
                    run_after,
                )
            )
    notify(conn)
    return posting_id


def notify(conn: Connection) -> None:
    """Tell listening daemons that runnable jobs may have appeared."""
    conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))


# ---------------------------------------------------------------- claiming


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker now owns, with what it needs to run it."""

    id: int
    uuid: UUID
    posting_id: int
    posting_uuid: UUID
    entry_point: str
    priority: int
    attempt: int
    tries_remaining: int
    posargs: list[Any]
    kwargs: dict[str, Any]
    timeout_s: float | None
    created_at: dt.datetime
    runnable_since: dt.datetime


_CLAIM = """
WITH candidate AS (
    SELECT j.id
    FROM pdoflowd.jobs AS j
    WHERE j.status = 'waiting'
      AND (j.run_after IS NULL OR j.run_after <= now())
      AND EXISTS (
          SELECT FROM pdoflowd.postings AS p
          WHERE p.id = j.posting_id AND p.status = 'executing')
    ORDER BY j.priority DESC, j.id
    LIMIT %(limit)s
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE pdoflowd.jobs AS j
SET status = 'executing',
    owner = %(owner)s,
    daemon_id = %(daemon_id)s,
    attempt = j.attempt + 1,
    claimed_at = now()
FROM candidate, pdoflowd.postings AS p
WHERE j.id = candidate.id AND p.id = j.posting_id
RETURNING j.id, j.uuid, j.posting_id, p.uuid, p.entry_point, j.priority,
          j.attempt, j.tries_remaining, j.posargs, j.kwargs, p.timeout_s,
          j.created_at, coalesce(j.run_after, j.created_at)
"""


def claim(
    conn: Connection, *, owner: UUID, daemon_id: UUID, limit: int
) -> list[ClaimedJob]:
    """Claim up to ``limit`` runnable jobs, best first; commits at once."""
    with conn.transaction():
        rows = conn.execute(
            _CLAIM, {"owner": owner, "daemon_id": daemon_id, "limit": limit}
        ).fetchall()
    jobs = [ClaimedJob(*row) for row in rows]
    jobs.sort(key=lambda j: (-j.priority, j.id))
    return jobs


# ---------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Outcome:
    """What became of one claimed job, to be written under its fence.

    ``kind`` is ``done``, ``failed`` or ``timeout`` (uses a try; waits again
    while tries remain), ``refused`` (errored out at once, no retry) or
    ``released`` (never started: back to waiting, no try used).
    """

    job_id: int
    attempt: int
    kind: str
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    error: str | None = None
    traceback: str | None = None
    retry_at: dt.datetime | None = None


@dataclass(frozen=True)
class RecordedOutcome:
    """An outcome the database accepted, and the job's resulting status."""

    job_id: int
    posting_id: int
    kind: str
    status: JobStatus


_RECORD_OUTCOMES = """
WITH o AS (
    SELECT * FROM unnest(
        %(ids)s::bigint[], %(attempts)s::integer[], %(kinds)s::text[],
        %(started)s::timestamptz[], %(completed)s::timestamptz[],
        %(errors)s::text[], %(tracebacks)s::text[], %(retry_at)s::timestamptz[]
    ) AS o(id, attempt, kind, started_at, completed_at, error, traceback,
           retry_at)
)
UPDATE pdoflowd.jobs AS j
SET status = CASE
        WHEN o.kind = 'done' THEN 'done'
        WHEN o.kind = 'released' THEN 'waiting'
        WHEN o.kind IN ('failed', 'timeout') AND j.tries_remaining > 1
            THEN 'waiting'
        ELSE 'errored_out' END,
    tries_remaining = CASE
        WHEN o.kind IN ('done', 'released') THEN j.tries_remaining
        WHEN o.kind = 'refused' THEN 0
        ELSE greatest(j.tries_remaining - 1, 0) END,
    owner = CASE WHEN o.kind = 'done' THEN j.owner END,
    run_after = CASE WHEN o.kind IN ('failed', 'timeout') THEN o.retry_at
                     ELSE j.run_after END,
    work_started_at = coalesce(o.started_at, j.work_started_at),
    completed_at = CASE WHEN o.kind = 'released' THEN j.completed_at
                        ELSE o.completed_at END,
    exited_ok = CASE WHEN o.kind = 'released' THEN j.exited_ok
                     ELSE o.kind = 'done' END,
    error = CASE WHEN o.kind = 'released' THEN j.error ELSE o.error END,
    traceback = CASE WHEN o.kind = 'released' THEN j.traceback
                     ELSE o.traceback END
FROM o
WHERE j.id = o.id
  AND j.attempt = o.attempt
  AND j.owner = %(owner)s
  AND j.status = 'executing'
RETURNING j.id, j.posting_id, o.kind, j.status
"""


def record_outcomes(
    conn: Connection, *, owner: UUID, outcomes: Sequence[Outcome]
) -> list[RecordedOutcome]:
    """Write outcomes in one fenced statement; commits at once.

    An outcome whose job is no longer ``executing`` under this owner and
    attempt (it was rescued after its owner was declared dead) changes
    nothing and is absent from the result.
    """
    if not outcomes:
        return []
    params = {
        "owner": owner,
        "ids": [o.job_id for o in outcomes],
        "attempts": [o.attempt for o in outcomes],
        "kinds": [o.kind for o in outcomes],
        "started": [o.started_at for o in outcomes],
        "completed": [o.completed_at for o in outcomes],
        "errors": [o.error for o in outcomes],
        "tracebacks": [o.traceback for o in outcomes],
        "retry_at": [o.retry_at for o in outcomes],
    }
    with conn.transaction():
        rows = conn.execute(_RECORD_OUTCOMES, params).fetchall()
    return [
        RecordedOutcome(job_id, posting_id, kind, JobStatus(status))
        for job_id, posting_id, kind, status in rows
    ]


_REQUEUE_OWNER = """
UPDATE pdoflowd.jobs AS j
SET status = CASE
        WHEN j.id = %(running)s AND j.tries_remaining <= 1 THEN 'errored_out'
        ELSE 'waiting' END,
    tries_remaining = CASE
        WHEN j.id = %(running)s THEN greatest(j.tries_remaining - 1, 0)
        ELSE j.tries_remaining END,
    error = CASE WHEN j.id = %(running)s THEN %(reason)s ELSE j.error END,
    traceback = CASE WHEN j.id = %(running)s THEN NULL ELSE j.traceback END,
    exited_ok = CASE WHEN j.id = %(running)s THEN false ELSE j.exited_ok END,
    completed_at = CASE WHEN j.id = %(running)s THEN now()
                        ELSE j.completed_at END,
    owner = NULL
WHERE j.daemon_id = %(daemon_id)s
  AND j.owner = %(owner)s
  AND j.status = 'executing'
RETURNING j.id, j.posting_id, j.id = %(running)s, j.status
"""


@dataclass(frozen=True)
class RequeuedJob:
    """A job taken back from a worker that is gone."""

    job_id: int
    posting_id: int
    was_running: bool
    status: JobStatus


def requeue_owner(
    conn: Connection,
    *,
    daemon_id: UUID,
    owner: UUID,
    running_job_id: int | None,
    reason: str,
) -> list[RequeuedJob]:
    """Take back every job a dead worker held, in one statement.

    The job it was running uses a try and records ``reason``; jobs it had
    claimed but not started go back to waiting as they were.
    """
    with conn.transaction():
        rows = conn.execute(
            _REQUEUE_OWNER,
            {
                "daemon_id": daemon_id,
                "owner": owner,
                "running": running_job_id,
                "reason": reason,
            },
        ).fetchall()
    return [RequeuedJob(r[0], r[1], bool(r[2]), JobStatus(r[3])) for r in rows]


# ---------------------------------------------------------------- postings


_SETTLE_POSTINGS = """
WITH candidate AS (
    SELECT p.id,
           EXISTS (
               SELECT FROM pdoflowd.jobs AS j
               WHERE j.posting_id = p.id
                 AND j.status IN ('waiting', 'executing')) AS active,
           (SELECT count(*) FROM pdoflowd.jobs AS j
            WHERE j.posting_id = p.id AND j.status = 'errored_out') AS errored
    FROM pdoflowd.postings AS p
    WHERE p.id = ANY(%(ids)s) AND p.status = 'executing'
)
UPDATE pdoflowd.postings AS p
SET status = CASE WHEN c.errored >= %(threshold)s THEN 'errored_out'
                  ELSE 'finished' END,
    finished_at = now()
FROM candidate AS c
WHERE p.id = c.id
  AND p.status = 'executing'
  AND (c.errored >= %(threshold)s OR NOT c.active)
RETURNING p.id, p.status
"""


def settle_postings(
    conn: Connection, posting_ids: Iterable[int], *, error_threshold: int
) -> dict[int, PostingStatus]:
    """Finish or error out postings whose jobs now allow it.

    Must run after the outcomes that prompted it have committed: the last
    writer then sees every other writer's work, so no posting is left
    executing with nothing left to run.
    """
    ids = sorted(set(posting_ids))
    if not ids:
        return {}
    with conn.transaction():
        rows = conn.execute(
            _SETTLE_POSTINGS, {"ids": ids, "threshold": error_threshold}
        ).fetchall()
    return {pid: PostingStatus(status) for pid, status in rows}


_UNSETTLED_POSTINGS = """
SELECT p.id FROM pdoflowd.postings AS p
WHERE p.status = 'executing'
  AND NOT EXISTS (
      SELECT FROM pdoflowd.jobs AS j
      WHERE j.posting_id = p.id AND j.status IN ('waiting', 'executing'))
LIMIT 1000
"""


def unsettled_postings(conn: Connection) -> list[int]:
    """Executing postings with nothing left to run (a settle was missed)."""
    with conn.transaction():
        return [r[0] for r in conn.execute(_UNSETTLED_POSTINGS).fetchall()]


@dataclass(frozen=True)
class PostingProgress:
    """A posting's status and how many of its jobs are in each status."""

    uuid: UUID
    status: PostingStatus
    jobs: dict[JobStatus, int]

    @property
    def total(self) -> int:
        return sum(self.jobs.values())


_POSTING_PROGRESS = """
SELECT p.status, j.status, count(j.id)
FROM pdoflowd.postings AS p
LEFT JOIN pdoflowd.jobs AS j ON j.posting_id = p.id
WHERE p.uuid = %(uuid)s
GROUP BY p.status, j.status
"""


def posting_progress(
    conn: Connection, posting_uuid: UUID
) -> PostingProgress | None:
    """A posting's progress, or None when no posting has that id."""
    rows = conn.execute(_POSTING_PROGRESS, {"uuid": posting_uuid}).fetchall()
    if not rows:
        return None
    counts = dict.fromkeys(JobStatus, 0)
    for _, job_status, count in rows:
        if job_status is not None:
            counts[JobStatus(job_status)] = count
    return PostingProgress(posting_uuid, PostingStatus(rows[0][0]), counts)


# ---------------------------------------------------------------- daemons


_HEARTBEAT = """
WITH previous AS (
    -- Read in the statement's snapshot: the row as it was before the upsert.
    SELECT stopped_at FROM pdoflowd.daemons WHERE id = %(id)s
)
INSERT INTO pdoflowd.daemons (id, hostname, pid, version)
VALUES (%(id)s, %(hostname)s, %(pid)s, %(version)s)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL
RETURNING (SELECT stopped_at FROM previous)
"""


def heartbeat(
    conn: Connection,
    *,
    daemon_id: UUID,
    hostname: str,
    pid: int,
    version: str,
) -> dt.datetime | None:
    """Register a daemon or renew its heartbeat.

    Returns when it had been declared lost (its jobs were then rescued by
    another daemon), else None.
    """
    with conn.transaction():
        row = conn.execute(
            _HEARTBEAT,
            {
                "id": daemon_id,
                "hostname": hostname,
                "pid": pid,
                "version": version,
            },
        ).fetchone()
    return None if row is None else row[0]


def mark_daemon_stopped(conn: Connection, daemon_id: UUID) -> None:
    """Record a clean stop, so nobody mistakes the daemon for a lost host."""
    with conn.transaction():
        conn.execute(
            "UPDATE pdoflowd.daemons SET stopped_at = now() WHERE id = %s",
            (daemon_id,),
        )


_RESCUE_LOST_DAEMONS = """
WITH lost AS (
    UPDATE pdoflowd.daemons AS d
    SET stopped_at = now()
    WHERE d.stopped_at IS NULL
      AND d.heartbeat_at < now() - make_interval(secs => %(lease_s)s)
    RETURNING d.id, d.hostname
)
UPDATE pdoflowd.jobs AS j
SET status = CASE WHEN j.tries_remaining <= 1 THEN 'errored_out'
                  ELSE 'waiting' END,
    tries_remaining = greatest(j.tries_remaining - 1, 0),
    error = format('host lost: daemon %%s on %%s missed its heartbeat',
                   lost.id, lost.hostname),
    traceback = NULL,
    exited_ok = false,
    completed_at = now(),
    owner = NULL
FROM lost
WHERE j.status = 'executing' AND j.daemon_id = lost.id
RETURNING j.id, j.posting_id, j.status
"""


def rescue_lost_daemons(
    conn: Connection, *, lease_s: float
) -> list[RequeuedJob]:
    """Declare daemons without a heartbeat for ``lease_s`` lost; requeue.

    Every job such a daemon held uses a try (which of them were running is
    not known). A daemon that was only cut off finds its row stopped at its
    next heartbeat, and its late outcome writes are fenced off.
    """
    with conn.transaction():
        rows = conn.execute(
            _RESCUE_LOST_DAEMONS, {"lease_s": lease_s}
        ).fetchall()
    return [RequeuedJob(r[0], r[1], True, JobStatus(r[2])) for r in rows]
