"""One job's statements: reading it whole, its controls, its output.

Owns the SQL behind ``pdoflow job``, ``cancel-job``, ``retry-job`` and
``logs`` and their :class:`pdoflowd.client.Client` methods: a job with its
posting, its timings and the daemon that claimed it;
``pdoflowd.control_job``, which checks the poster as ``control_posting``
does; and the output each attempt wrote, which a worker stores. Row-level
security shows a submitter only its own jobs. Callers pass plain values
and their own connection.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from pdoflowd.db.common import Connection, one_statement
from pdoflowd.status import JobStatus, PostingStatus

__all__ = [
    "JOB_ACTIONS",
    "AttemptOutput",
    "JobDetails",
    "control_job",
    "job_details",
    "job_output",
    "store_output",
]


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


# ---------------------------------------------------------------- output

_STORE_OUTPUT = """
INSERT INTO pdoflowd.job_output (job_id, attempt, output, total_bytes)
VALUES (%(job_id)s, %(attempt)s, %(output)s, %(total_bytes)s)
ON CONFLICT (job_id, attempt) DO UPDATE
SET output = excluded.output, total_bytes = excluded.total_bytes,
    written_at = now()
"""


def store_output(
    conn: Connection, *, job_id: int, attempt: int, output: str, total: int
) -> None:
    """Keep the end of what one attempt of a job wrote (``output``, text
    PostgreSQL can store) and how many bytes it wrote in all."""
    with one_statement(conn):
        conn.execute(
            _STORE_OUTPUT,
            {
                "job_id": job_id,
                "attempt": attempt,
                "output": output,
                "total_bytes": total,
            },
        )


@dataclass(frozen=True)
class AttemptOutput:
    """What one attempt of a job wrote: the end of it, and how many bytes
    in all (more than the text holds: its beginning was not kept)."""

    attempt: int
    output: str
    total_bytes: int
    written_at: dt.datetime


_JOB_OUTPUT = """
SELECT o.attempt, o.output, o.total_bytes, o.written_at
FROM pdoflowd.jobs AS j
JOIN pdoflowd.job_output AS o ON o.job_id = j.id
WHERE j.uuid = %(uuid)s
ORDER BY o.attempt
"""


def job_output(conn: Connection, job_uuid: UUID) -> list[AttemptOutput]:
    """The stored output of each attempt of the job that wrote any."""
    with one_statement(conn):
        rows = conn.execute(_JOB_OUTPUT, {"uuid": job_uuid}).fetchall()
    return [AttemptOutput(*row) for row in rows]
