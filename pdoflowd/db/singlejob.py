"""One job's statements: reading it whole, and the checked job controls.

Owns the SQL behind ``pdoflow job``, ``cancel-job`` and ``retry-job`` and
their :class:`pdoflowd.client.Client` methods: a job with its posting, its
timings and the daemon that claimed it, and ``pdoflowd.control_job``,
which checks the poster as ``control_posting`` does. Row-level security
shows a submitter only its own jobs. Callers pass plain values and their
own connection.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from pdoflowd.db.common import Connection, one_statement
from pdoflowd.status import JobStatus, PostingStatus

__all__ = ["JOB_ACTIONS", "JobDetails", "control_job", "job_details"]


@dataclass(frozen=True)
class JobDetails:
    """A job as ``pdoflow job`` shows it. ``posargs``, ``kwargs`` and
    ``result`` are as stored (JSON values, tagged where JSON has no type of
    its own); ``daemon_host`` and ``daemon_pid`` name the daemon that
    claimed it last (None: never claimed, or its row is gone)."""

    uuid: UUID
    posting_uuid: UUID
    target_function: str
    entry_point: str
    status: JobStatus
    posting_status: PostingStatus
    priority: int
    attempt: int
    tries_remaining: int
    posargs: Any
    kwargs: Any
    error: str | None
    traceback: str | None
    result_stored: bool
    result: Any
    progress: float | None
    progress_note: str | None
    created_at: dt.datetime
    run_after: dt.datetime | None
    claimed_at: dt.datetime | None
    work_started_at: dt.datetime | None
    completed_at: dt.datetime | None
    daemon_host: str | None
    daemon_pid: int | None


_JOB_DETAILS = """
SELECT j.uuid, p.uuid, p.target_function, p.entry_point, j.status, p.status,
       j.priority, j.attempt, j.tries_remaining, j.posargs, j.kwargs,
       j.error, j.traceback, j.result IS NOT NULL, j.result, j.progress,
       j.progress_note, j.created_at, j.run_after, j.claimed_at,
       j.work_started_at, j.completed_at, d.hostname, d.pid
FROM pdoflowd.jobs AS j
JOIN pdoflowd.postings AS p ON p.id = j.posting_id
LEFT JOIN pdoflowd.daemons AS d ON d.id = j.daemon_id
WHERE j.uuid = %(uuid)s
"""


def job_details(conn: Connection, job_uuid: UUID) -> JobDetails | None:
    """The job with that id, or None when there is none (or it is not the
    session user's to see)."""
    with one_statement(conn):
        row = conn.execute(_JOB_DETAILS, {"uuid": job_uuid}).fetchone()
    if row is None:
        return None
    return JobDetails(
        uuid=row[0],
        posting_uuid=row[1],
        target_function=row[2],
        entry_point=row[3],
        status=JobStatus(row[4]),
        posting_status=PostingStatus(row[5]),
        priority=row[6],
        attempt=row[7],
        tries_remaining=row[8],
        posargs=row[9],
        kwargs=row[10],
        error=row[11],
        traceback=row[12],
        result_stored=row[13],
        result=row[14],
        progress=None if row[15] is None else float(row[15]),
        progress_note=row[16],
        created_at=row[17],
        run_after=row[18],
        claimed_at=row[19],
        work_started_at=row[20],
        completed_at=row[21],
        daemon_host=row[22],
        daemon_pid=row[23],
    )


_CONTROL_JOB = """
SELECT new_status, posting_status
FROM pdoflowd.control_job(%(uuid)s, %(action)s, %(tries)s)
"""

JOB_ACTIONS = ("cancel", "retry")


def control_job(
    conn: Connection,
    job_uuid: UUID,
    action: str,
    *,
    tries: int | None = None,
) -> tuple[JobStatus, PostingStatus]:
    """Cancel or retry one job (:data:`JOB_ACTIONS`); commits at once.

    The database function checks that the session user posted the job's
    posting (or may update jobs) and that the job's status allows the
    action; it raises ``psycopg.errors.NoDataFound`` or
    ``ObjectNotInPrerequisiteState`` otherwise. Returns the job's and its
    posting's new status.
    """
    with one_statement(conn):
        row = conn.execute(
            _CONTROL_JOB, {"uuid": job_uuid, "action": action, "tries": tries}
        ).fetchone()
    assert row is not None
    return JobStatus(row[0]), PostingStatus(row[1])
