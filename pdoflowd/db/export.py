"""Exporting a posting: its row, shared variables and jobs as JSON lines.

Owns the statements that render a posting, its shared variables and each
of its jobs (arguments, outcome, stored result) as one JSON object per
line, written by PostgreSQL so that stored JSON passes through unchanged,
and read through a server-side cursor in one transaction: one snapshot,
and a posting of a million jobs never held in memory. Row-level security
applies: a submitter exports only its own postings. It must not decode
arguments or results (they stay in the stored encoding, see
:mod:`pdoflowd.arguments`) nor write files: its caller does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

from pdoflowd.db.common import Connection

__all__ = ["ExportCount", "export_posting"]

_FETCH_ROWS = 1000

_POSTING_LINE = """
SELECT p.id, json_build_object(
    'kind', 'posting',
    'id', p.uuid,
    'poster', p.poster,
    'target_function', p.target_function,
    'entry_point', p.entry_point,
    'status', p.status,
    'created_at', p.created_at,
    'finished_at', p.finished_at,
    'requires', p.requires,
    'store_result', p.store_result,
    'tries', p.tries,
    'timeout_s', p.timeout_s,
    'idempotency_key', p.idempotency_key,
    'exported_at', now())::text
FROM pdoflowd.postings AS p
WHERE p.uuid = %(uuid)s
"""

_SHARED_LINES = """
SELECT json_build_object(
    'kind', 'shared_variable',
    'name', s.name,
    'value', s.value,
    'updated_at', s.updated_at)::text
FROM pdoflowd.shared_variables AS s
WHERE s.posting_id = %(id)s
ORDER BY s.name
"""

_JOB_LINES = """
SELECT json_build_object(
    'kind', 'job',
    'id', j.uuid,
    'priority', j.priority,
    'args', j.posargs,
    'kwargs', j.kwargs,
    'status', j.status,
    'attempt', j.attempt,
    'tries_remaining', j.tries_remaining,
    'created_at', j.created_at,
    'run_after', j.run_after,
    'claimed_at', j.claimed_at,
    'work_started_at', j.work_started_at,
    'completed_at', j.completed_at,
    'exited_ok', j.exited_ok,
    'error', j.error,
    'traceback', j.traceback,
    'result_stored', j.result IS NOT NULL,
    'result', j.result,
    'progress', j.progress,
    'progress_note', j.progress_note)::text
FROM pdoflowd.jobs AS j
WHERE j.posting_id = %(id)s
ORDER BY j.id
"""


@dataclass(frozen=True)
class ExportCount:
    """What an export wrote: the posting's line, and these."""

    shared_variables: int
    jobs: int


def export_posting(
    conn: Connection, posting_uuid: UUID, write: Callable[[str], object]
) -> ExportCount | None:
    """Pass ``write`` each line (a JSON object, no newline) of the posting,
    its shared variables, then its jobs in the order they were given; None
    (nothing written) when no posting with that id is visible."""
    with conn.transaction():
        conn.execute(
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
        )
        row = conn.execute(_POSTING_LINE, {"uuid": posting_uuid}).fetchone()
        if row is None:
            return None
        posting_id, line = row
        write(line)
        shared = 0
        for (line,) in conn.execute(_SHARED_LINES, {"id": posting_id}):
            write(line)
            shared += 1
        jobs = 0
        with conn.cursor(name="pdoflowd_export") as cursor:
            cursor.itersize = _FETCH_ROWS
            cursor.execute(_JOB_LINES, {"id": posting_id})
            for (line,) in cursor:
                write(line)
                jobs += 1
    return ExportCount(shared, jobs)
