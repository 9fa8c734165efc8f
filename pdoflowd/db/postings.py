"""The postings' statements: writing a posting, reading and controlling it.

Owns the SQL a submitter's session runs: inserting a posting and its jobs
(COPY text, or INSERTs where row-level security refuses COPY), a posting's
progress, the summaries, job lists, priority counts and stored results that
``pdoflow`` and :class:`pdoflowd.client.Client` read, and the checked posting
controls. Callers pass plain values and their own connection.
"""

from __future__ import annotations

import datetime as dt
import enum
import itertools
import selectors
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from uuid import UUID

import psycopg

from pdoflowd.db import dependencies
from pdoflowd.db.common import (
    NOTIFY_CHANNEL,
    Connection,
    one_statement,
)
from pdoflowd.status import JobStatus, PostingStatus

# ---------------------------------------------------------------- posting


# One job to enqueue, as the client hands it over: its id (the canonical
# text of a UUID), its priority, and its positional and keyword arguments
# already encoded as JSON text.
NewJob = tuple[str, int, str, str]

# The poster is never sent: the column defaults to the session user. A
# posting whose key its poster holds already (postings_idempotency_key:
# the same condition here, so the index is the arbiter) is not inserted;
# the insert waits for a concurrent poster of the key to commit or roll
# back first.
_INSERT_POSTING = """
INSERT INTO pdoflowd.postings
    (uuid, target_function, entry_point, status, timeout_s, requires,
     store_result, tries, idempotency_key, key_scope, max_running, uses)
VALUES (%(uuid)s, %(target_function)s, %(entry_point)s, %(status)s,
        %(timeout_s)s, %(requires)s::text[], %(store_result)s, %(tries)s,
        %(key)s, %(key_scope)s, %(max_running)s, %(uses)s::text[])
ON CONFLICT (poster, idempotency_key)
    WHERE idempotency_key IS NOT NULL
          AND (key_scope = 'forever' OR status IN ('paused', 'executing'))
    DO NOTHING
RETURNING id, row_security_active('pdoflowd.jobs'),
          now() + make_interval(secs => %(delay_s)s)
"""

# The posting that holds a key of this poster's, as the index sees it.
_KEYED_POSTING = """
SELECT id, uuid FROM pdoflowd.postings
WHERE poster = session_user AND idempotency_key = %(key)s
  AND (key_scope = 'forever' OR status IN ('paused', 'executing'))
"""
# How often an insert that met a key retries when the posting holding it
# ended before it could be read: each time, another post took it again.
_KEY_ATTEMPTS = 5

# COPY is refused where row-level security applies (a submitter role), so
# such a session inserts the same rows with INSERTs over arrays, a chunk of
# jobs at a time.
_INSERT_JOBS = """
INSERT INTO pdoflowd.jobs
    (uuid, posting_id, priority, posargs, kwargs, tries_remaining, run_after)
SELECT t.uuid, %(posting_id)s, t.priority, t.posargs::jsonb, t.kwargs::jsonb,
       %(tries)s, %(run_after)s
FROM unnest(%(uuids)s::uuid[], %(priorities)s::integer[], %(posargs)s::text[],
            %(kwargs)s::text[]) WITH ORDINALITY
     AS t(uuid, priority, posargs, kwargs, n)
ORDER BY t.n
"""
_INSERT_CHUNK_JOBS = 10_000

# The columns that differ from job to job come first; the rest of each
# line is the same for every job of the posting.
_COPY_JOBS = """
COPY pdoflowd.jobs
    (uuid, priority, posargs, kwargs, posting_id, tries_remaining, run_after)
FROM STDIN
"""
# COPY text is sent in blocks of about this many characters: few calls,
# and memory that does not grow with the posting.
_COPY_BLOCK_CHARS = 64 * 1024


def copy_field(text: str) -> str:
    """``text`` as one field of COPY's text format.

    Backslash, tab, newline and carriage return are escaped (backslash
    first); everything else stands for itself.
    """
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        return (
            text.replace("\\", "\\\\")
            .replace("\t", "\\t")
            .replace("\n", "\\n")
            .replace("\r", "\\r")
        )
    return text


def copy_tail(
    posting_id: int, tries: int, run_after: dt.datetime | None
) -> str:
    """The end of every line of a posting's COPY: what all its jobs share.

    A time is written as psycopg writes one, ISO 8601, which PostgreSQL
    reads whatever its DateStyle.
    """
    when = "\\N" if run_after is None else copy_field(str(run_after))
    return f"\t{posting_id:d}\t{tries:d}\t{when}\n"


def copy_blocks(jobs: Iterable[NewJob], tail: str) -> Iterator[str]:
    """The jobs as lines of COPY text (``_COPY_JOBS``'s columns), in blocks.

    ``tail`` ends every line (:func:`copy_tail`).
    """
    lines: list[str] = []
    size = 0
    for job_id, priority, posargs_json, kwargs_json in jobs:
        line = (
            f"{job_id}\t{priority:d}\t{copy_field(posargs_json)}"
            f"\t{copy_field(kwargs_json)}{tail}"
        )
        lines.append(line)
        size += len(line)
        if size >= _COPY_BLOCK_CHARS:
            yield "".join(lines)
            lines = []
            size = 0
    if lines:
        yield "".join(lines)


class KeyScope(str, enum.Enum):
    """How long a posting's key stays taken: while the posting has not
    ended (``active``), or for as long as its row exists (``forever``)."""

    ACTIVE = "active"
    FOREVER = "forever"


class InsertedPosting(NamedTuple):
    """What :func:`insert_posting` did: the posting's internal id and
    uuid, and whether it existed already (its key was taken)."""

    id: int
    uuid: UUID
    existed: bool


class UnknownUpstream(LookupError):
    """A posting to wait for is none this poster may see."""


class KeyBusy(Exception):
    """A keyed insert found the key taken, but the posting holding it
    ended before it could be read, again and again."""


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
    delay_s: float | None = None,
    requires: Sequence[str] = (),
    store_result: bool = False,
    key: str | None = None,
    key_scope: KeyScope = KeyScope.ACTIVE,
    after: Sequence[UUID] = (),
    on_failure: str = "cancel",
    max_running: int | None = None,
    uses: Sequence[str] = (),
) -> InsertedPosting:
    """Insert a posting and its jobs (one COPY) and NOTIFY the daemons.

    Runs in the caller's transaction: nothing is visible, and nobody is
    woken, until the caller commits. The jobs may run from ``run_after``,
    or ``delay_s`` seconds after the database's time now.

    With a ``key``, nothing is written when a posting of this poster holds
    the key already (one that has not ended, or one posted with
    ``key_scope`` forever): that posting is returned, ``existed`` true,
    and ``jobs`` is not read. A concurrent post of the same key waits for
    the other to commit or roll back, so one posting is made.

    ``jobs`` is read as the rows are sent, so a posting is never held in
    memory whole. An exception from it stops the write half-way, the
    posting and some of its jobs written: run this in a transaction or a
    savepoint that the exception rolls back.

    With ``after``, the posting waits for those postings (see
    :mod:`pdoflowd.db.dependencies`); one this poster cannot see is
    :class:`UnknownUpstream`, raised before anything is written.

    ``max_running`` bounds how many of its jobs execute at once across all
    hosts, and ``uses`` names the resources (each bounded by the daemons'
    jobs.limits) its jobs use.
    """
    if after:
        missing = dependencies.missing_postings(conn, after)
        if missing:
            raise UnknownUpstream(
                "no posting "
                + ", ".join(str(m) for m in missing)
                + " to wait for"
            )
    status = PostingStatus.PAUSED if paused else PostingStatus.EXECUTING
    params = {
        "uuid": posting_uuid,
        "target_function": target_function,
        "entry_point": entry_point,
        "status": status.value,
        "timeout_s": timeout_s,
        "requires": list(requires),
        "store_result": store_result,
        "tries": tries,
        "delay_s": delay_s,
        "key": key,
        "key_scope": key_scope.value,
        "max_running": max_running,
        "uses": list(uses),
    }
    for _ in range(_KEY_ATTEMPTS):
        row = conn.execute(_INSERT_POSTING, params).fetchone()
        if row is not None or key is None:
            break
        held = conn.execute(_KEYED_POSTING, {"key": key}).fetchone()
        if held is not None:
            return InsertedPosting(held[0], held[1], existed=True)
    if row is None:
        raise KeyBusy(
            f"the key {key!r} was taken and released {_KEY_ATTEMPTS} times"
            " while this posting waited for it"
        )
    posting_id: int = row[0]
    restricted: bool = row[1]
    if run_after is None:
        run_after = row[2]
    if restricted:
        _insert_jobs(conn, jobs, posting_id, tries, run_after)
    else:
        tail = copy_tail(posting_id, tries, run_after)
        _copy_jobs(conn, copy_blocks(jobs, tail))
    if after:
        dependencies.wait_for_postings(conn, posting_uuid, after, on_failure)
    notify(conn)
    return InsertedPosting(posting_id, posting_uuid, existed=False)


_POSTING_JOB_UUIDS = """
SELECT uuid FROM pdoflowd.jobs WHERE posting_id = %(posting_id)s ORDER BY id
"""


def posting_job_uuids(conn: Connection, posting_id: int) -> list[UUID]:
    """The ids of a posting's jobs, in the order they were given."""
    rows = conn.execute(
        _POSTING_JOB_UUIDS, {"posting_id": posting_id}
    ).fetchall()
    return [row[0] for row in rows]


class _Abandoned(Exception):
    """Ends a COPY whose rows could not all be made."""


def _copy_jobs(conn: Connection, blocks: Iterator[str]) -> None:
    """Send the blocks of COPY text in one COPY of the jobs.

    When making a block fails, the COPY is abandoned and that failure is
    raised, not what psycopg reports of the abandoned COPY (psycopg 3.1
    raises the server's QueryCanceled instead). The server hears only that
    the client gave up, never the failure's text.
    """
    failure: Exception | None = None
    try:
        with conn.cursor().copy(_COPY_JOBS) as copy:
            while True:
                try:
                    block = next(blocks, None)
                except Exception as exc:
                    failure = exc
                    raise _Abandoned("the client gave up the posting") from None
                if block is None:
                    break
                copy.write(block)
                _flush(conn)
    except (_Abandoned, psycopg.Error):
        if failure is None:
            raise
        raise failure from None


def _flush(conn: Connection) -> None:
    """Wait until libpq has handed all it holds to the kernel.

    Rows are made faster than the server reads them, and psycopg 3.1 lets
    libpq's output buffer grow with the COPY meanwhile; waiting here keeps
    what is in flight to a block and the socket's buffers.
    """
    pgconn = conn.pgconn
    if not pgconn.flush():
        return
    with selectors.DefaultSelector() as selector:
        selector.register(pgconn.socket, selectors.EVENT_WRITE)
        while pgconn.flush():
            selector.select()


def _insert_jobs(
    conn: Connection,
    jobs: Iterable[NewJob],
    posting_id: int,
    tries: int,
    run_after: dt.datetime | None,
) -> None:
    """The posting's jobs by INSERTs over arrays, in chunks, in order."""
    remaining = iter(jobs)
    while chunk := list(itertools.islice(remaining, _INSERT_CHUNK_JOBS)):
        conn.execute(
            _INSERT_JOBS,
            {
                "posting_id": posting_id,
                "tries": tries,
                "run_after": run_after,
                "uuids": [job[0] for job in chunk],
                "priorities": [job[1] for job in chunk],
                "posargs": [job[2] for job in chunk],
                "kwargs": [job[3] for job in chunk],
            },
        )


def notify(conn: Connection) -> None:
    """Tell listening daemons that runnable jobs may have appeared."""
    conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))


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


# ---------------------------------------------------------------- controls


_CONTROL_POSTING = """
SELECT new_status, jobs_changed
FROM pdoflowd.control_posting(%(uuid)s, %(action)s, %(tries)s)
"""

CONTROL_ACTIONS = ("pause", "resume", "cancel", "retry", "finished")


def control_posting(
    conn: Connection,
    posting_uuid: UUID,
    action: str,
    *,
    tries: int | None = None,
) -> tuple[PostingStatus, int]:
    """Pause, resume, cancel, retry or mark a posting; commits at once.

    ``action`` is one of :data:`CONTROL_ACTIONS` or ``errored_out``. The
    database function checks that the session user posted it (or may
    update jobs) and that its status allows the action; it raises
    ``psycopg.errors.NoDataFound`` or ``ObjectNotInPrerequisiteState``
    otherwise. Returns the posting's new status and how many jobs changed.
    """
    with one_statement(conn):
        row = conn.execute(
            _CONTROL_POSTING,
            {"uuid": posting_uuid, "action": action, "tries": tries},
        ).fetchone()
    assert row is not None
    return PostingStatus(row[0]), int(row[1])


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class PostingSummary:
    """A posting as ``pdoflow posting-status`` and ``list-postings`` show it.

    ``delayed`` counts waiting jobs whose run-after time lies ahead;
    ``mean_progress`` is over executing jobs that reported progress;
    ``claimable_by`` counts running daemons that provide its requirements
    and take work of its poster.
    """

    uuid: UUID
    poster: str
    target_function: str
    entry_point: str
    status: PostingStatus
    created_at: dt.datetime
    finished_at: dt.datetime | None
    requires: list[str]
    store_result: bool
    tries: int
    timeout_s: float | None
    jobs: dict[JobStatus, int]
    delayed: int
    mean_progress: float | None
    claimable_by: int
    # The poster's key (None: posted without one) and how long it holds.
    key: str | None = None
    key_scope: str = "active"
    # The postings it waits for (all, and those that have not ended yet),
    # what their failure does to it, and why it was cancelled when that
    # was no one's command (an upstream posting that failed).
    on_failure: str = "cancel"
    cancel_reason: str | None = None
    after: list[UUID] = field(default_factory=list)
    waiting_for: list[UUID] = field(default_factory=list)
    # Its concurrency caps: most jobs executing at once (None: no cap of
    # its own), and the resources its jobs use (jobs.limits).
    max_running: int | None = None
    uses: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(self.jobs.values())


_POSTING_SUMMARIES = """
SELECT p.uuid, p.poster, p.target_function, p.entry_point, p.status,
       p.created_at, p.finished_at, p.requires, p.store_result, p.tries,
       p.timeout_s, c.waiting, c.executing, c.done, c.errored_out, c.delayed,
       c.progress,
       (SELECT count(*) FROM pdoflowd.daemons AS d
        WHERE d.stopped_at IS NULL AND p.requires <@ d.provides
          AND (cardinality(d.posters) = 0 OR p.poster = ANY(d.posters))
          AND p.uses <@ ARRAY(SELECT jsonb_object_keys(d.limits))),
       p.idempotency_key, p.key_scope, c.held, p.on_failure,
       p.cancel_reason,
       ARRAY(SELECT u.uuid
             FROM pdoflowd.posting_dependencies AS d
             JOIN pdoflowd.postings AS u ON u.id = d.upstream_id
             WHERE d.posting_id = p.id
             ORDER BY u.id) AS after,
       ARRAY(SELECT u.uuid
             FROM pdoflowd.posting_dependencies AS d
             JOIN pdoflowd.postings AS u ON u.id = d.upstream_id
             WHERE d.posting_id = p.id
               AND u.status NOT IN ('finished', 'errored_out', 'cancelled')
             ORDER BY u.id) AS waiting_for,
       p.max_running, p.uses
FROM pdoflowd.postings AS p
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE j.status = 'held') AS held,
           count(*) FILTER (WHERE j.status = 'waiting') AS waiting,
           count(*) FILTER (WHERE j.status = 'executing') AS executing,
           count(*) FILTER (WHERE j.status = 'done') AS done,
           count(*) FILTER (WHERE j.status = 'errored_out') AS errored_out,
           count(*) FILTER (WHERE j.status = 'waiting'
                            AND j.run_after > now()) AS delayed,
           avg(j.progress) FILTER (WHERE j.status = 'executing') AS progress
    FROM pdoflowd.jobs AS j
    WHERE j.posting_id = p.id
) AS c
"""

_POSTING_SUMMARY = _POSTING_SUMMARIES + "WHERE p.uuid = %(uuid)s"

_LIST_POSTINGS = (
    _POSTING_SUMMARIES
    + """WHERE p.id IN (
    SELECT id FROM pdoflowd.postings
    WHERE %(status)s::text IS NULL OR status = %(status)s
    ORDER BY id DESC
    LIMIT %(limit)s)
ORDER BY p.id DESC
"""
)


def _summary(row: Sequence[Any]) -> PostingSummary:
    counts = {
        JobStatus.HELD: int(row[20]),
        JobStatus.WAITING: int(row[11]),
        JobStatus.EXECUTING: int(row[12]),
        JobStatus.DONE: int(row[13]),
        JobStatus.ERRORED_OUT: int(row[14]),
    }
    return PostingSummary(
        uuid=row[0],
        poster=row[1],
        target_function=row[2],
        entry_point=row[3],
        status=PostingStatus(row[4]),
        created_at=row[5],
        finished_at=row[6],
        requires=list(row[7]),
        store_result=row[8],
        tries=row[9],
        timeout_s=row[10],
        jobs=counts,
        delayed=int(row[15]),
        mean_progress=None if row[16] is None else float(row[16]),
        claimable_by=int(row[17]),
        key=row[18],
        key_scope=row[19],
        on_failure=row[21],
        cancel_reason=row[22],
        after=list(row[23]),
        waiting_for=list(row[24]),
        max_running=row[25],
        uses=tuple(row[26]),
    )


def posting_summary(
    conn: Connection, posting_uuid: UUID
) -> PostingSummary | None:
    """One posting in full, or None when no posting has that id."""
    row = conn.execute(_POSTING_SUMMARY, {"uuid": posting_uuid}).fetchone()
    return None if row is None else _summary(row)


def list_postings(
    conn: Connection, *, limit: int, status: PostingStatus | None = None
) -> list[PostingSummary]:
    """The newest ``limit`` postings (of one status, if given)."""
    rows = conn.execute(
        _LIST_POSTINGS,
        {"limit": limit, "status": None if status is None else status.value},
    ).fetchall()
    return [_summary(row) for row in rows]


@dataclass(frozen=True)
class JobRow:
    """One job of a posting, as ``posting-status --show-jobs`` lists it."""

    uuid: UUID
    status: JobStatus
    priority: int
    attempt: int
    tries_remaining: int
    run_after: dt.datetime | None
    progress: float | None
    progress_note: str | None
    error: str | None
    completed_at: dt.datetime | None


_POSTING_JOBS = """
SELECT j.uuid, j.status, j.priority, j.attempt, j.tries_remaining,
       j.run_after, j.progress, j.progress_note, j.error, j.completed_at
FROM pdoflowd.jobs AS j
JOIN pdoflowd.postings AS p ON p.id = j.posting_id
WHERE p.uuid = %(uuid)s
  AND (%(status)s::text IS NULL OR j.status = %(status)s)
ORDER BY j.id
LIMIT %(limit)s OFFSET %(offset)s
"""


def posting_jobs(
    conn: Connection,
    posting_uuid: UUID,
    *,
    limit: int,
    offset: int = 0,
    status: JobStatus | None = None,
) -> list[JobRow]:
    """``limit`` jobs of a posting (of one status, if given) from
    ``offset``, in the order they were given."""
    rows = conn.execute(
        _POSTING_JOBS,
        {
            "uuid": posting_uuid,
            "limit": limit,
            "offset": offset,
            "status": None if status is None else status.value,
        },
    ).fetchall()
    return [
        JobRow(
            uuid=r[0],
            status=JobStatus(r[1]),
            priority=r[2],
            attempt=r[3],
            tries_remaining=r[4],
            run_after=r[5],
            progress=None if r[6] is None else float(r[6]),
            progress_note=r[7],
            error=r[8],
            completed_at=r[9],
        )
        for r in rows
    ]


@dataclass(frozen=True)
class PriorityCount:
    """Unfinished jobs of one priority."""

    priority: int
    waiting: int
    runnable: int
    executing: int


_PRIORITY_STATS = """
SELECT j.priority,
       count(*) FILTER (WHERE j.status = 'waiting'),
       count(*) FILTER (WHERE j.status = 'waiting' AND p.status = 'executing'
                        AND (j.run_after IS NULL OR j.run_after <= now())),
       count(*) FILTER (WHERE j.status = 'executing')
FROM pdoflowd.jobs AS j
JOIN pdoflowd.postings AS p ON p.id = j.posting_id
WHERE j.status IN ('waiting', 'executing')
GROUP BY j.priority
ORDER BY j.priority DESC
"""


def priority_stats(conn: Connection) -> list[PriorityCount]:
    """Waiting (and of those, runnable now) and executing jobs by priority."""
    return [
        PriorityCount(*(int(v) for v in row))
        for row in conn.execute(_PRIORITY_STATS).fetchall()
    ]


@dataclass(frozen=True)
class StoredResult:
    """A job's end and its return value (decoded JSON, still tagged);
    ``stored`` is False when no value was kept (not done, or not asked)."""

    job_uuid: UUID
    status: JobStatus
    stored: bool
    value: Any
    error: str | None


_POSTING_EXISTS = "SELECT 1 FROM pdoflowd.postings WHERE uuid = %(uuid)s"

_POSTING_RESULTS = """
SELECT j.uuid, j.status, j.result IS NOT NULL, j.result, j.error
FROM pdoflowd.jobs AS j
JOIN pdoflowd.postings AS p ON p.id = j.posting_id
WHERE p.uuid = %(uuid)s
ORDER BY j.id
"""

_JOB_RESULT = """
SELECT j.uuid, j.status, j.result IS NOT NULL, j.result, j.error
FROM pdoflowd.jobs AS j
WHERE j.uuid = %(uuid)s
"""


def posting_results(
    conn: Connection, posting_uuid: UUID
) -> list[StoredResult] | None:
    """Every job's result, in order; None when no posting has that id."""
    with conn.transaction():
        if conn.execute(_POSTING_EXISTS, {"uuid": posting_uuid}).fetchone():
            rows = conn.execute(
                _POSTING_RESULTS, {"uuid": posting_uuid}
            ).fetchall()
        else:
            return None
    return [StoredResult(r[0], JobStatus(r[1]), *r[2:]) for r in rows]


def job_result(conn: Connection, job_uuid: UUID) -> StoredResult | None:
    """One job's result, or None when no job has that id."""
    row = conn.execute(_JOB_RESULT, {"uuid": job_uuid}).fetchone()
    if row is None:
        return None
    return StoredResult(row[0], JobStatus(row[1]), *row[2:])
