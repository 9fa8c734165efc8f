"""The statements about one named job, outside the queue's hot path.

Owns what ``pdoflow execute-job`` reads and claims of the job it was given
(by the same claim columns and ownership as the worker's claim, in
:mod:`~pdoflowd.db.queue`), and the progress a running job reports. Callers
pass plain values and their own connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from pdoflowd.db.common import Connection, one_statement
from pdoflowd.db.queue import CLAIMED_COLUMNS, TAKE_OWNERSHIP, ClaimedJob
from pdoflowd.status import JobStatus

# ---------------------------------------------------------------- one job


@dataclass(frozen=True)
class JobTarget:
    """What a job would run, and where it stands."""

    entry_point: str
    status: JobStatus


_JOB_TARGET = """
SELECT p.entry_point, j.status
FROM pdoflowd.jobs AS j JOIN pdoflowd.postings AS p ON p.id = j.posting_id
WHERE j.uuid = %(uuid)s
"""


def job_target(conn: Connection, job_uuid: UUID) -> JobTarget | None:
    """A job's entry point and status, or None when there is no such job."""
    row = conn.execute(_JOB_TARGET, {"uuid": job_uuid}).fetchone()
    return None if row is None else JobTarget(row[0], JobStatus(row[1]))


_CLAIM_JOB = (
    """
UPDATE pdoflowd.jobs AS j
"""
    + TAKE_OWNERSHIP
    + """
FROM pdoflowd.postings AS p
WHERE j.uuid = %(uuid)s AND p.id = j.posting_id AND j.status <> 'executing'
  AND NOT EXISTS (
      SELECT FROM pdoflowd.daemons AS d
      WHERE d.id = %(daemon_id)s AND d.stopped_at IS NOT NULL)
"""
    + CLAIMED_COLUMNS
)


def claim_job(
    conn: Connection, *, job_uuid: UUID, owner: UUID, daemon_id: UUID
) -> ClaimedJob | None:
    """Claim one job by its id, whatever its posting's status, unless it is
    executing already (then None); commits at once. For running a job by
    hand: the claim is fenced like any other."""
    with one_statement(conn):
        row = conn.execute(
            _CLAIM_JOB,
            {"uuid": job_uuid, "owner": owner, "daemon_id": daemon_id},
        ).fetchone()
    return None if row is None else ClaimedJob(*row)


_SET_PROGRESS = """
UPDATE pdoflowd.jobs
SET progress = %(progress)s, progress_note = %(note)s, progress_at = now()
WHERE id = %(id)s AND owner = %(owner)s AND attempt = %(attempt)s
  AND status = 'executing'
"""


def set_progress(
    conn: Connection,
    *,
    job_id: int,
    owner: UUID,
    attempt: int,
    progress: float,
    note: str | None,
) -> bool:
    """Record a running job's progress (0 to 1) under its claim's fence.

    False when the job is no longer this claim's (cancelled, rescued).
    """
    with one_statement(conn):
        cursor = conn.execute(
            _SET_PROGRESS,
            {
                "id": job_id,
                "owner": owner,
                "attempt": attempt,
                "progress": progress,
                "note": note,
            },
        )
    return cursor.rowcount == 1
