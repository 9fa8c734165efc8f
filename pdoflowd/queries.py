"""Every statement of the queue, parameterised, and nothing else.

Owns the SQL for posting (and the COPY text a posting's jobs are sent as),
claiming, recording outcomes (fenced by the claim's owner token and
attempt), rescuing, heartbeats, progress counts, posting controls, shared
variables, results and profiles, and the small typed rows these return. It
knows nothing of processes, signals or configuration: callers pass plain
values and their own connection.
Schema changes belong to :mod:`pdoflowd.migrate`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import selectors
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from psycopg.pq import TransactionStatus

from pdoflowd.status import JobStatus, PostingStatus

NOTIFY_CHANNEL = "pdoflowd_jobs"
# Sent when a posting is cancelled (the posting's internal id as payload):
# its claimed jobs must not start, and their runs must stop.
CANCEL_CHANNEL = "pdoflowd_cancel"

Connection = psycopg.Connection[Any]


@contextlib.contextmanager
def _one_statement(conn: Connection) -> Iterator[None]:
    """Make one statement its own committed transaction.

    On a connection in autocommit mode outside any transaction the
    statement already is one: sending it alone saves the round trips of
    BEGIN and COMMIT. Anywhere else it runs in a transaction block (or a
    savepoint of the caller's) that commits, or releases, when it ends.
    """
    idle = conn.info.transaction_status == TransactionStatus.IDLE
    if conn.autocommit and idle:
        yield
    else:
        with conn.transaction():
            yield


# ---------------------------------------------------------------- posting


# One job to enqueue, as the client hands it over: its id (the canonical
# text of a UUID), its priority, and its positional and keyword arguments
# already encoded as JSON text.
NewJob = tuple[str, int, str, str]

# The poster is never sent: the column defaults to the session user.
_INSERT_POSTING = """
INSERT INTO pdoflowd.postings
    (uuid, target_function, entry_point, status, timeout_s, requires,
     store_result, tries)
VALUES (%(uuid)s, %(target_function)s, %(entry_point)s, %(status)s,
        %(timeout_s)s, %(requires)s::text[], %(store_result)s, %(tries)s)
RETURNING id, row_security_active('pdoflowd.jobs'),
          now() + make_interval(secs => %(delay_s)s)
"""

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
) -> int:
    """Insert a posting and its jobs (one COPY) and NOTIFY the daemons.

    Runs in the caller's transaction: nothing is visible, and nobody is
    woken, until the caller commits. The jobs may run from ``run_after``,
    or ``delay_s`` seconds after the database's time now. Returns the
    posting's internal id.

    ``jobs`` is read as the rows are sent, so a posting is never held in
    memory whole. An exception from it stops the write half-way, the
    posting and some of its jobs written: run this in a transaction or a
    savepoint that the exception rolls back.
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
            "requires": list(requires),
            "store_result": store_result,
            "tries": tries,
            "delay_s": delay_s,
        },
    ).fetchone()
    assert row is not None
    posting_id: int = row[0]
    restricted: bool = row[1]
    if run_after is None:
        run_after = row[2]
    if restricted:
        _insert_jobs(conn, jobs, posting_id, tries, run_after)
    else:
        tail = copy_tail(posting_id, tries, run_after)
        _copy_jobs(conn, copy_blocks(jobs, tail))
    notify(conn)
    return posting_id


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
    # The arguments as stored (jsonb as text), for arguments.decode_job.
    posargs_json: str
    kwargs_json: str
    timeout_s: float | None
    created_at: dt.datetime
    runnable_since: dt.datetime
    store_result: bool = False


# A posting's requirements must be among what this daemon provides, and
# with posters configured, its poster among them (empty: everyone's).
# OFFSET 0 keeps the EXISTS a check per candidate row: turned into a join,
# the planner may expect few matching postings and sort every waiting job
# instead of walking jobs_claim in order and stopping at the limit.
# What a claim sets on a job it takes, and what it returns: shared by the
# worker's claim and ``execute-job``'s, so the two cannot drift apart.
_TAKE_OWNERSHIP = """
SET status = 'executing',
    owner = %(owner)s,
    daemon_id = %(daemon_id)s,
    attempt = j.attempt + 1,
    claimed_at = now(),
    progress = NULL,
    progress_note = NULL,
    progress_at = NULL
"""
_CLAIMED_COLUMNS = """
RETURNING j.id, j.uuid, j.posting_id, p.uuid, p.entry_point, j.priority,
          j.attempt, j.tries_remaining, j.posargs::text, j.kwargs::text,
          p.timeout_s, j.created_at, coalesce(j.run_after, j.created_at),
          p.store_result
"""

_CLAIM = (
    """
WITH candidate AS (
    SELECT j.id
    FROM pdoflowd.jobs AS j
    WHERE j.status = 'waiting'
      AND (j.run_after IS NULL OR j.run_after <= now())
      AND NOT EXISTS (
          SELECT FROM pdoflowd.daemons AS d
          WHERE d.id = %(daemon_id)s AND d.stopped_at IS NOT NULL)
      AND EXISTS (
          SELECT FROM pdoflowd.postings AS p
          WHERE p.id = j.posting_id AND p.status = 'executing'
            AND p.requires <@ %(provides)s::text[]
            AND (cardinality(%(posters)s::text[]) = 0
                 OR p.poster = ANY(%(posters)s::text[]))
          OFFSET 0)
    ORDER BY j.priority DESC, j.id
    LIMIT %(limit)s
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE pdoflowd.jobs AS j
"""
    + _TAKE_OWNERSHIP
    + """
FROM candidate, pdoflowd.postings AS p
WHERE j.id = candidate.id AND p.id = j.posting_id
"""
    + _CLAIMED_COLUMNS
)


def claim(
    conn: Connection,
    *,
    owner: UUID,
    daemon_id: UUID,
    limit: int,
    provides: Sequence[str] = (),
    posters: Sequence[str] = (),
) -> list[ClaimedJob]:
    """Claim up to ``limit`` runnable jobs, best first; commits at once.

    Only jobs of postings whose requirements are among ``provides`` are
    taken, and with ``posters`` given, only postings of these posters.
    Nothing is taken for a daemon that stopped or was declared lost: its
    workers, cut off from it, claim nothing they could not be rescued from.
    """
    params = {
        "owner": owner,
        "daemon_id": daemon_id,
        "limit": limit,
        "provides": list(provides),
        "posters": list(posters),
    }
    with _one_statement(conn):
        rows = conn.execute(_CLAIM, params).fetchall()
    jobs = [ClaimedJob(*row) for row in rows]
    jobs.sort(key=lambda j: (-j.priority, j.id))
    return jobs


# ---------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Outcome:
    """What became of one claimed job, to be written under its fence.

    ``kind`` is ``done``, ``failed`` or ``timeout`` (uses a try; waits again
    while tries remain), ``refused`` (errored out at once, no retry) or
    ``released`` (never started: back to waiting, no try used). ``result``
    is the JSON text of a done job's return value, when its posting keeps
    results. A job that waits again may run ``retry_delay_s`` seconds after
    the database's time when the outcome is written, not the worker's.
    """

    job_id: int
    attempt: int
    kind: str
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    error: str | None = None
    traceback: str | None = None
    retry_delay_s: float | None = None
    result: str | None = None

    def as_refused(self, problem: str) -> Outcome:
        """This outcome as it can still be written after the database
        refused it as it was (``problem`` says why): without its result or
        traceback, with an error that says so. A done job ends errored out
        (its return value is lost); any other keeps its kind, so a run still
        uses its try and a job never started still uses none.
        """
        if self.kind == "done":
            kind = "refused"
            what = "the return value" if self.result is not None else "it"
            error = f"done, but {what} could not be stored: {problem}"
        else:
            kind = self.kind
            original = (self.error or self.kind)[:_REFUSED_ERROR_CHARS]
            error = (
                f"{original} (stored without its details, which the"
                f" database refused: {problem})"
            )
        return Outcome(
            self.job_id,
            self.attempt,
            kind,
            self.started_at,
            self.completed_at,
            # Spelt in ASCII, which a database in any encoding stores.
            error=error.encode("ascii", "backslashreplace").decode("ascii"),
            retry_delay_s=self.retry_delay_s,
        )


# How much of the original error an outcome the database refused keeps.
_REFUSED_ERROR_CHARS = 2000


@dataclass(frozen=True)
class RecordedOutcome:
    """An outcome the database accepted, and the job's resulting status."""

    job_id: int
    posting_id: int
    kind: str
    status: JobStatus


def _claim_ends(
    kind: str,
    error: str,
    *,
    live: str | None = None,
    posting_status: str = "p.status",
) -> str:
    """SET clauses of status, tries and error for claims that end as
    ``kind`` with ``error`` (SQL expressions), by the one retry rule,
    pdoflowd.end_job. Where the SQL condition ``live`` is false, a cancel
    had ended the claim already: they stay as the cancel left them.
    """
    call = (
        f"pdoflowd.end_job({kind}, j.tries_remaining, {posting_status},"
        f" {error})"
    )
    clauses = []
    for column in ("status", "tries_remaining", "error"):
        value = f"({call}).{column}"
        if live is not None:
            value = f"CASE WHEN {live} THEN {value} ELSE j.{column} END"
        clauses.append(f"{column} = {value}")
    return ",\n    ".join(clauses)


# The outcomes arrive as one JSON array of objects (times in seconds since
# the epoch; absent keys are NULL): one parameter to send and to parse,
# where an array per column cost both sides several times as much.
# The posting's status is not read (a join per outcome on the hot path): a
# job executing under a live claim never belongs to a cancelled posting, as
# a cancel ends every claim of its posting in its own transaction, and a
# claim it ended is no longer executing, so fenced off here (see
# give_up_claims).
_RECORD_OUTCOMES = (
    """
UPDATE pdoflowd.jobs AS j
SET """
    + _claim_ends(
        "o.kind",
        "CASE WHEN o.kind = 'released' THEN j.error ELSE o.error END",
        posting_status="NULL",
    )
    + """,
    owner = CASE WHEN o.kind = 'done' THEN j.owner END,
    run_after = CASE WHEN o.kind IN ('failed', 'timeout')
                     THEN now() + make_interval(secs => o.retry_delay)
                     ELSE j.run_after END,
    work_started_at = coalesce(to_timestamp(o.started), j.work_started_at),
    completed_at = CASE WHEN o.kind = 'released' THEN j.completed_at
                        ELSE to_timestamp(o.completed) END,
    exited_ok = CASE WHEN o.kind = 'released' THEN j.exited_ok
                     ELSE o.kind = 'done' END,
    traceback = CASE WHEN o.kind = 'released' THEN j.traceback
                     ELSE o.traceback END,
    result = CASE WHEN o.kind = 'released' THEN j.result
                  ELSE o.result::jsonb END
FROM json_to_recordset(%(outcomes)s::json) AS o(
    id bigint, attempt integer, kind text, started float8, completed float8,
    error text, traceback text, retry_delay float8, result text)
WHERE j.id = o.id
  AND j.attempt = o.attempt
  AND j.owner = %(owner)s
  AND j.status = 'executing'
RETURNING j.id, j.posting_id, o.kind, j.status
"""
)

_JSON_ENCODER = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":")
)


def storable_text(text: str) -> str:
    """``text`` as PostgreSQL can store it: NUL and lone surrogates (from
    undecodable bytes) spelt out as backslash escapes instead of refused."""
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\x00", "\\x00")


def _outcome_json(o: Outcome) -> dict[str, Any]:
    row: dict[str, Any] = {"id": o.job_id, "attempt": o.attempt, "kind": o.kind}
    if o.started_at is not None:
        row["started"] = o.started_at.timestamp()
    if o.completed_at is not None:
        row["completed"] = o.completed_at.timestamp()
    if o.error is not None:
        row["error"] = storable_text(o.error)
    if o.traceback is not None:
        row["traceback"] = storable_text(o.traceback)
    if o.retry_delay_s is not None:
        row["retry_delay"] = o.retry_delay_s
    if o.result is not None:
        row["result"] = o.result
    return row


def record_outcomes(
    conn: Connection, *, owner: UUID, outcomes: Sequence[Outcome]
) -> list[RecordedOutcome]:
    """Write outcomes in one fenced statement; commits at once.

    An outcome whose job is no longer ``executing`` under this owner and
    attempt (it was rescued after its owner was declared dead, or its
    posting was cancelled) changes nothing and is absent from the result;
    give its claim up (:func:`give_up_claims`). Error texts are stored as
    :func:`storable_text` makes them. A value the database refuses (a
    result jsonb cannot hold) fails the whole statement; write the outcomes
    one by one then, each refused one :meth:`Outcome.as_refused`.
    """
    if not outcomes:
        return []
    params = {
        "owner": owner,
        "outcomes": _JSON_ENCODER.encode([_outcome_json(o) for o in outcomes]),
    }
    with _one_statement(conn):
        rows = conn.execute(_RECORD_OUTCOMES, params).fetchall()
    return [
        RecordedOutcome(job_id, posting_id, kind, JobStatus(status))
        for job_id, posting_id, kind, status in rows
    ]


_HELD_CLAIMS = """
SELECT j.id
FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS c(id, attempt)
JOIN pdoflowd.jobs AS j ON j.id = c.id AND j.attempt = c.attempt
WHERE j.owner = %(owner)s AND j.status = 'executing'
"""


def held_claims(
    conn: Connection, *, owner: UUID, jobs: Iterable[ClaimedJob]
) -> set[int]:
    """Which of these claimed jobs are still this owner's to run.

    The others were cancelled or taken back since they were claimed: they
    must not start. Give their claims up (:func:`give_up_claims`).
    """
    claimed = list(jobs)
    if not claimed:
        return set()
    with _one_statement(conn):
        rows = conn.execute(
            _HELD_CLAIMS,
            {
                "owner": owner,
                "ids": [j.id for j in claimed],
                "attempts": [j.attempt for j in claimed],
            },
        ).fetchall()
    return {r[0] for r in rows}


# A claim still live goes back as released (its outcome, if there was one,
# was not recorded: a retry gave the job back to this claim after the
# outcome was fenced off); a claim a cancel ended only loses its owner.
_GIVE_UP_CLAIMS = (
    """
UPDATE pdoflowd.jobs AS j
SET """
    + _claim_ends("'released'", "j.error", live="j.status = 'executing'")
    + """,
    owner = NULL
FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS c(id, attempt),
     pdoflowd.postings AS p
WHERE j.id = c.id
  AND j.attempt = c.attempt
  AND j.owner = %(owner)s
  AND (j.status = 'executing'
       OR (j.status = 'errored_out' AND j.owner IS NOT NULL))
  AND p.id = j.posting_id
"""
)


def give_up_claims(
    conn: Connection, *, owner: UUID, claims: Iterable[tuple[int, int]]
) -> int:
    """End claims (job id, attempt) whose run this owner has ended or will
    not start; commits at once. Returns how many were still this owner's.

    Called for outcomes that were fenced off and for claimed jobs found no
    longer held: a cancel keeps the owner of the jobs it ends, as their run
    may still be going, until this says it is over; a retry before that
    gives such a job back to its claim rather than to the queue.
    """
    pairs = sorted(set(claims))
    if not pairs:
        return 0
    with _one_statement(conn):
        cursor = conn.execute(
            _GIVE_UP_CLAIMS,
            {
                "owner": owner,
                "ids": [job_id for job_id, _ in pairs],
                "attempts": [attempt for _, attempt in pairs],
            },
        )
    return cursor.rowcount


# The owner's claims are locked first, and whether each was still live is
# read under the lock: a claim a cancel ended only loses its owner (its run
# is over), and is not counted as taken back. A job of a cancelled posting
# is never requeued: it ends as cancelled.
_REQUEUE_OWNER = (
    """
WITH claim AS (
    SELECT j.id, j.status = 'executing' AS live
    FROM pdoflowd.jobs AS j
    WHERE j.daemon_id = %(daemon_id)s
      AND j.owner = %(owner)s
      AND (j.status = 'executing'
           OR (j.status = 'errored_out' AND j.owner IS NOT NULL))
    FOR NO KEY UPDATE
), taken AS (
    UPDATE pdoflowd.jobs AS j
    SET """
    + _claim_ends(
        "CASE WHEN j.id = %(running)s THEN 'failed' ELSE 'released' END",
        "CASE WHEN j.id = %(running)s THEN %(reason)s ELSE j.error END",
        live="c.live",
    )
    + """,
    traceback = CASE WHEN c.live AND (j.id = %(running)s
                                      OR p.status = 'cancelled')
                     THEN NULL ELSE j.traceback END,
    exited_ok = CASE WHEN c.live AND (j.id = %(running)s
                                      OR p.status = 'cancelled')
                     THEN false ELSE j.exited_ok END,
    completed_at = CASE WHEN c.live AND (j.id = %(running)s
                                         OR p.status = 'cancelled')
                        THEN now() ELSE j.completed_at END,
    owner = NULL
    FROM claim AS c, pdoflowd.postings AS p
    WHERE j.id = c.id AND p.id = j.posting_id
    RETURNING j.id, j.posting_id, j.id = %(running)s AS was_running,
              j.status, c.live
)
SELECT id, posting_id, was_running, status FROM taken WHERE live
"""
)


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
    claimed but not started go back to waiting as they were. Jobs of a
    cancelled posting end errored out as ``cancelled`` instead. Claims of
    its that a cancel had ended are over with it (they lose their owner)
    and are not among the jobs returned.
    """
    with _one_statement(conn):
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


# The decision is made under the postings' row locks, with the jobs counted
# after they were taken (see pdoflowd.settle_postings in the schema).
_SETTLE_POSTINGS = """
SELECT posting, new_status
FROM pdoflowd.settle_postings(%(ids)s::bigint[], %(threshold)s)
"""


def settle_postings(
    conn: Connection, posting_ids: Iterable[int], *, error_threshold: int
) -> dict[int, PostingStatus]:
    """Finish or error out postings whose jobs now allow it.

    Must run after the outcomes that prompted it have committed: the last
    writer then sees every other writer's work, so no posting is left
    executing with nothing left to run. A posting is decided under its row
    lock, so one a retry makes runnable again meanwhile is never finished.
    """
    ids = sorted(set(posting_ids))
    if not ids:
        return {}
    with _one_statement(conn):
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
    with _one_statement(conn):
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
INSERT INTO pdoflowd.daemons (id, hostname, pid, version, provides, posters,
                              lease_s, live_owners)
VALUES (%(id)s, %(hostname)s, %(pid)s, %(version)s, %(provides)s::text[],
        %(posters)s::text[], %(lease_s)s, %(live_owners)s::uuid[])
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL,
    previous_heartbeat_at = pdoflowd.daemons.heartbeat_at,
    provides = EXCLUDED.provides, posters = EXCLUDED.posters,
    lease_s = EXCLUDED.lease_s, live_owners = EXCLUDED.live_owners
RETURNING (SELECT stopped_at FROM previous)
"""


def heartbeat(
    conn: Connection,
    *,
    daemon_id: UUID,
    hostname: str,
    pid: int,
    version: str,
    lease_s: float,
    live_owners: Sequence[UUID] = (),
    provides: Sequence[str] = (),
    posters: Sequence[str] = (),
) -> dt.datetime | None:
    """Register a daemon or renew its heartbeat.

    ``lease_s`` is how long others wait for its next heartbeat before they
    declare it lost. ``live_owners`` are the owner tokens its live workers
    hold, read before this statement is sent: a job claimed under another
    token of this daemon before its previous heartbeat has no live owner
    (see :func:`take_back_ownerless_jobs`). ``provides`` and ``posters``
    record what it claims, so that a posting no running daemon would claim
    can be shown as such. Returns when it had been declared lost (its jobs
    were then rescued by another daemon), else None.
    """
    with _one_statement(conn):
        row = conn.execute(
            _HEARTBEAT,
            {
                "id": daemon_id,
                "hostname": hostname,
                "pid": pid,
                "version": version,
                "lease_s": lease_s,
                "live_owners": list(live_owners),
                "provides": list(provides),
                "posters": list(posters),
            },
        ).fetchone()
    return None if row is None else row[0]


def set_session_deadlines(
    conn: Connection, *, statement_timeout_s: float, lock_timeout_s: float
) -> None:
    """Bound every later statement of this session, and its lock waits."""
    conn.execute(
        "SELECT set_config('statement_timeout', %(statement)s, false),"
        " set_config('lock_timeout', %(lock)s, false)",
        {
            "statement": f"{max(1, round(statement_timeout_s * 1000))}ms",
            "lock": f"{max(1, round(lock_timeout_s * 1000))}ms",
        },
    )


def mark_daemon_stopped(conn: Connection, daemon_id: UUID) -> None:
    """Record a clean stop, so nobody mistakes the daemon for a lost host."""
    with _one_statement(conn):
        conn.execute(
            "UPDATE pdoflowd.daemons SET stopped_at = now() WHERE id = %s",
            (daemon_id,),
        )


# Every executing job has a live owner: a worker that some live daemon
# knows it runs. Taken back here, as _REQUEUE_OWNER takes back a dead
# worker's, in one statement: the claims of daemons whose heartbeat is
# older than the lease they declared (declared lost now, when the caller
# may judge that), of daemons stopped or gone, and of owner tokens a live
# daemon's heartbeat no longer lists although the job was claimed before
# its previous heartbeat (so the token was in its scoreboard before that
# heartbeat read it): a claim whose reply was lost, one that committed
# after its worker was taken back, one a failover restored. Rows another
# session holds are left for a later sweep.
_TAKE_BACK_OWNERLESS = (
    """
WITH lost AS (
    UPDATE pdoflowd.daemons AS d
    SET stopped_at = now()
    WHERE %(may_declare_lost)s
      AND d.stopped_at IS NULL
      AND d.heartbeat_at < now() - make_interval(secs => d.lease_s)
    RETURNING d.id, d.hostname
), claim AS (
    SELECT j.id, j.status = 'executing' AS live,
           CASE WHEN lost.id IS NULL THEN 'released' ELSE 'failed' END
               AS kind,
           CASE WHEN lost.id IS NOT NULL
                THEN format('host lost: daemon %%s on %%s missed its '
                            'heartbeat', lost.id, lost.hostname)
                WHEN d.id IS NULL OR d.stopped_at IS NOT NULL
                THEN format('owner lost: daemon %%s had stopped',
                            j.daemon_id)
                ELSE format('owner lost: no worker of daemon %%s holds '
                            'its claim', j.daemon_id) END AS reason
    FROM pdoflowd.jobs AS j
    LEFT JOIN pdoflowd.daemons AS d ON d.id = j.daemon_id
    LEFT JOIN lost ON lost.id = j.daemon_id
    WHERE (j.status = 'executing'
           OR (j.status = 'errored_out' AND j.owner IS NOT NULL))
      AND (lost.id IS NOT NULL
           OR d.id IS NULL
           OR d.stopped_at IS NOT NULL
           OR (j.claimed_at < d.previous_heartbeat_at
               AND NOT j.owner = ANY(d.live_owners)))
    FOR NO KEY UPDATE OF j SKIP LOCKED
), rescued AS (
    UPDATE pdoflowd.jobs AS j
    SET """
    + _claim_ends("c.kind", "c.reason", live="c.live")
    + """,
    traceback = CASE WHEN c.live AND c.kind = 'failed' THEN NULL
                     ELSE j.traceback END,
    exited_ok = CASE WHEN c.live AND c.kind = 'failed' THEN false
                     ELSE j.exited_ok END,
    completed_at = CASE WHEN c.live AND c.kind = 'failed' THEN now()
                        ELSE j.completed_at END,
    owner = NULL
    FROM claim AS c, pdoflowd.postings AS p
    WHERE j.id = c.id AND p.id = j.posting_id
    RETURNING j.id, j.posting_id, j.status, c.live, c.kind
)
SELECT id, posting_id, kind = 'failed', status FROM rescued WHERE live
"""
)


def take_back_ownerless_jobs(
    conn: Connection, *, may_declare_lost: bool
) -> list[RequeuedJob]:
    """Take back every claim without a live owner; one statement.

    With ``may_declare_lost``, daemons whose heartbeat is older than their
    own lease are declared lost first (pass it only once the caller has
    itself been connected for a lease, see policy.may_rescue). A lost
    daemon's jobs use a try each (whether they ran is not known; those
    come back with ``was_running``). The other claims without a live owner
    were never started by anyone (a claim whose reply was lost, one that
    committed after its worker or its daemon had been stopped) or were
    restored by a failover; they go back as released, without a try. A
    daemon that was only cut off finds its row stopped at its next
    heartbeat and its late outcome writes fenced off; its workers claim
    nothing meanwhile.
    """
    with _one_statement(conn):
        rows = conn.execute(
            _TAKE_BACK_OWNERLESS, {"may_declare_lost": may_declare_lost}
        ).fetchall()
    return [RequeuedJob(r[0], r[1], bool(r[2]), JobStatus(r[3])) for r in rows]


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
    with _one_statement(conn):
        row = conn.execute(
            _CONTROL_POSTING,
            {"uuid": posting_uuid, "action": action, "tries": tries},
        ).fetchone()
    assert row is not None
    return PostingStatus(row[0]), int(row[1])


_CANCELLED_AMONG = """
SELECT j.id
FROM pdoflowd.jobs AS j
JOIN pdoflowd.postings AS p ON p.id = j.posting_id
WHERE j.id = ANY(%(ids)s::bigint[]) AND p.status = 'cancelled'
"""


def cancelled_among(conn: Connection, job_ids: Iterable[int]) -> set[int]:
    """Which of these (running) jobs belong to a cancelled posting."""
    ids = sorted(set(job_ids))
    if not ids:
        return set()
    with _one_statement(conn):
        rows = conn.execute(_CANCELLED_AMONG, {"ids": ids}).fetchall()
    return {r[0] for r in rows}


_CANCELLED_CLAIM_OWNERS = """
SELECT DISTINCT j.owner FROM pdoflowd.jobs AS j
WHERE j.daemon_id = %(daemon_id)s
  AND j.status = 'errored_out' AND j.owner IS NOT NULL
"""


def cancelled_claim_owners(conn: Connection, *, daemon_id: UUID) -> set[UUID]:
    """Owners of this daemon's claims that a cancel ended while their run
    may still be going or be about to start (until the owner gives them up
    or its jobs are taken back)."""
    with _one_statement(conn):
        rows = conn.execute(
            _CANCELLED_CLAIM_OWNERS, {"daemon_id": daemon_id}
        ).fetchall()
    return {r[0] for r in rows}


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
    + _TAKE_OWNERSHIP
    + """
FROM pdoflowd.postings AS p
WHERE j.uuid = %(uuid)s AND p.id = j.posting_id AND j.status <> 'executing'
  AND NOT EXISTS (
      SELECT FROM pdoflowd.daemons AS d
      WHERE d.id = %(daemon_id)s AND d.stopped_at IS NOT NULL)
"""
    + _CLAIMED_COLUMNS
)


def claim_job(
    conn: Connection, *, job_uuid: UUID, owner: UUID, daemon_id: UUID
) -> ClaimedJob | None:
    """Claim one job by its id, whatever its posting's status, unless it is
    executing already (then None); commits at once. For running a job by
    hand: the claim is fenced like any other."""
    with _one_statement(conn):
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
    with _one_statement(conn):
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
          AND (cardinality(d.posters) = 0 OR p.poster = ANY(d.posters)))
FROM pdoflowd.postings AS p
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE j.status = 'waiting') AS waiting,
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
    counts = dict(zip(JobStatus, (int(n) for n in row[11:15]), strict=True))
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
ORDER BY j.id
LIMIT %(limit)s
"""


def posting_jobs(
    conn: Connection, posting_uuid: UUID, *, limit: int
) -> list[JobRow]:
    """The first ``limit`` jobs of a posting, in the order they were given."""
    rows = conn.execute(
        _POSTING_JOBS, {"uuid": posting_uuid, "limit": limit}
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


# ---------------------------------------------------------------- shared


@dataclass(frozen=True)
class SharedRead:
    """A shared variable as read: absent, or its stored (tagged) value."""

    found: bool
    value: Any


_SHARED_GET = """
SELECT v.posting_id IS NOT NULL, v.value
FROM pdoflowd.postings AS p
LEFT JOIN pdoflowd.shared_variables AS v
       ON v.posting_id = p.id AND v.name = %(name)s
WHERE p.uuid = %(posting)s
"""

_SHARED_SET = """
INSERT INTO pdoflowd.shared_variables (posting_id, name, value)
SELECT p.id, %(name)s, %(value)s::jsonb
FROM pdoflowd.postings AS p
WHERE p.uuid = %(posting)s
ON CONFLICT (posting_id, name)
DO UPDATE SET value = EXCLUDED.value, updated_at = now()
RETURNING 1
"""

_SHARED_ADD_DEFAULT = """
INSERT INTO pdoflowd.shared_variables (posting_id, name, value)
SELECT p.id, %(name)s, %(value)s::jsonb
FROM pdoflowd.postings AS p
WHERE p.uuid = %(posting)s
ON CONFLICT (posting_id, name) DO NOTHING
"""

_SHARED_LOCK = """
SELECT v.posting_id, v.value
FROM pdoflowd.shared_variables AS v
JOIN pdoflowd.postings AS p ON p.id = v.posting_id
WHERE p.uuid = %(posting)s AND v.name = %(name)s
FOR UPDATE OF v
"""

_SHARED_STORE = """
UPDATE pdoflowd.shared_variables
SET value = %(value)s::jsonb, updated_at = now()
WHERE posting_id = %(posting_id)s AND name = %(name)s
"""

_SHARED_DELETE = """
WITH target AS (
    SELECT id FROM pdoflowd.postings WHERE uuid = %(posting)s
), gone AS (
    DELETE FROM pdoflowd.shared_variables AS v
    USING target
    WHERE v.posting_id = target.id AND v.name = %(name)s
    RETURNING 1
)
SELECT (SELECT count(*) FROM target), (SELECT count(*) FROM gone)
"""

_SHARED_ALL = """
SELECT v.name, v.value
FROM pdoflowd.postings AS p
LEFT JOIN pdoflowd.shared_variables AS v ON v.posting_id = p.id
WHERE p.uuid = %(posting)s
ORDER BY v.name
"""


def shared_get(
    conn: Connection, posting_uuid: UUID, name: str
) -> SharedRead | None:
    """A posting's shared variable; None when there is no such posting."""
    row = conn.execute(
        _SHARED_GET, {"posting": posting_uuid, "name": name}
    ).fetchone()
    return None if row is None else SharedRead(bool(row[0]), row[1])


def shared_set(
    conn: Connection, posting_uuid: UUID, name: str, value_json: str
) -> bool:
    """Create or replace a shared variable; False: no such posting."""
    with _one_statement(conn):
        row = conn.execute(
            _SHARED_SET,
            {"posting": posting_uuid, "name": name, "value": value_json},
        ).fetchone()
    return row is not None


def shared_lock(
    conn: Connection, posting_uuid: UUID, name: str, default_json: str
) -> tuple[int, Any] | None:
    """Lock a shared variable (created with the default if absent) for an
    update in the caller's transaction: (posting's internal id, value), or
    None when there is no such posting."""
    params = {"posting": posting_uuid, "name": name, "value": default_json}
    conn.execute(_SHARED_ADD_DEFAULT, params)
    row = conn.execute(_SHARED_LOCK, params).fetchone()
    return None if row is None else (row[0], row[1])


def shared_store(
    conn: Connection, posting_id: int, name: str, value_json: str
) -> None:
    """Write a variable locked by :func:`shared_lock` (same transaction)."""
    conn.execute(
        _SHARED_STORE,
        {"posting_id": posting_id, "name": name, "value": value_json},
    )


def shared_delete(
    conn: Connection, posting_uuid: UUID, name: str
) -> bool | None:
    """Delete a shared variable: whether it existed; None: no such posting."""
    with _one_statement(conn):
        row = conn.execute(
            _SHARED_DELETE, {"posting": posting_uuid, "name": name}
        ).fetchone()
    assert row is not None
    return None if row[0] == 0 else row[1] > 0


def shared_all(conn: Connection, posting_uuid: UUID) -> dict[str, Any] | None:
    """Every shared variable of a posting; None when there is no posting."""
    rows = conn.execute(_SHARED_ALL, {"posting": posting_uuid}).fetchall()
    if not rows:
        return None
    return {name: value for name, value in rows if name is not None}


# ---------------------------------------------------------------- profiles


@dataclass(frozen=True)
class ProfileRecord:
    """One job's profile, flattened: functions are (file, line, name);
    stats and calls refer to them by their index in ``functions``."""

    job_id: int
    attempt: int
    entry_point: str
    total_time: float
    ncalls: int
    primitive_calls: int
    functions: list[tuple[str, int, str]]
    # (function, ncalls, primitive calls, tottime, cumtime)
    stats: list[tuple[int, int, int, float, float]]
    # (caller, callee, ncalls, primitive calls, tottime, cumtime)
    calls: list[tuple[int, int, int, int, float, float]]


_INSERT_PROFILE = """
INSERT INTO pdoflowd.job_profiles
    (job_id, attempt, entry_point, total_time, ncalls, primitive_calls)
VALUES (%(job_id)s, %(attempt)s, %(entry_point)s, %(total_time)s,
        %(ncalls)s, %(primitive_calls)s)
RETURNING id
"""

# Sorted, so that concurrent writers take the unique index's locks in the
# same order and cannot deadlock.
_ADD_PROFILE_FUNCTIONS = """
INSERT INTO pdoflowd.profile_functions (filename, line, name)
SELECT * FROM unnest(%(files)s::text[], %(lines)s::integer[],
                     %(names)s::text[]) AS f(filename, line, name)
ORDER BY filename, line, name
ON CONFLICT (filename, line, name) DO NOTHING
"""

_PROFILE_FUNCTION_IDS = """
SELECT f.id, k.n
FROM unnest(%(files)s::text[], %(lines)s::integer[], %(names)s::text[])
     WITH ORDINALITY AS k(filename, line, name, n)
JOIN pdoflowd.profile_functions AS f
  ON f.filename = k.filename AND f.line = k.line AND f.name = k.name
"""

_INSERT_FUNCTION_STATS = """
INSERT INTO pdoflowd.profile_function_stats
    (profile_id, function_id, ncalls, primitive_calls, tottime, cumtime)
SELECT %(profile_id)s, * FROM unnest(
    %(functions)s::bigint[], %(ncalls)s::bigint[], %(pcalls)s::bigint[],
    %(tottime)s::double precision[], %(cumtime)s::double precision[])
"""

_INSERT_CALL_MAP = """
INSERT INTO pdoflowd.profile_call_map
    (profile_id, caller_id, callee_id, ncalls, primitive_calls, tottime,
     cumtime)
SELECT %(profile_id)s, * FROM unnest(
    %(callers)s::bigint[], %(callees)s::bigint[], %(ncalls)s::bigint[],
    %(pcalls)s::bigint[], %(tottime)s::double precision[],
    %(cumtime)s::double precision[])
"""


def insert_profile(conn: Connection, record: ProfileRecord) -> int:
    """Store one job's profile in one transaction; returns its id."""
    keys = {
        "files": [f[0] for f in record.functions],
        "lines": [f[1] for f in record.functions],
        "names": [f[2] for f in record.functions],
    }
    with conn.transaction():
        row = conn.execute(
            _INSERT_PROFILE,
            {
                "job_id": record.job_id,
                "attempt": record.attempt,
                "entry_point": record.entry_point,
                "total_time": record.total_time,
                "ncalls": record.ncalls,
                "primitive_calls": record.primitive_calls,
            },
        ).fetchone()
        assert row is not None
        profile_id: int = row[0]
        conn.execute(_ADD_PROFILE_FUNCTIONS, keys)
        ids = {
            n - 1: fid
            for fid, n in conn.execute(_PROFILE_FUNCTION_IDS, keys).fetchall()
        }
        conn.execute(
            _INSERT_FUNCTION_STATS,
            {
                "profile_id": profile_id,
                "functions": [ids[s[0]] for s in record.stats],
                "ncalls": [s[1] for s in record.stats],
                "pcalls": [s[2] for s in record.stats],
                "tottime": [s[3] for s in record.stats],
                "cumtime": [s[4] for s in record.stats],
            },
        )
        conn.execute(
            _INSERT_CALL_MAP,
            {
                "profile_id": profile_id,
                "callers": [ids[c[0]] for c in record.calls],
                "callees": [ids[c[1]] for c in record.calls],
                "ncalls": [c[2] for c in record.calls],
                "pcalls": [c[3] for c in record.calls],
                "tottime": [c[4] for c in record.calls],
                "cumtime": [c[5] for c in record.calls],
            },
        )
    return profile_id


@dataclass(frozen=True)
class FunctionStat:
    """One function's time summed over the profiles of matching jobs."""

    filename: str
    line: int
    name: str
    profiles: int
    ncalls: int
    tottime: float
    cumtime: float


_FUNCTION_STATS = """
SELECT f.filename, f.line, f.name, count(*), sum(s.ncalls), sum(s.tottime),
       sum(s.cumtime)
FROM pdoflowd.profile_function_stats AS s
JOIN pdoflowd.profile_functions AS f ON f.id = s.function_id
JOIN pdoflowd.job_profiles AS jp ON jp.id = s.profile_id
WHERE %(entry_point)s::text IS NULL OR jp.entry_point = %(entry_point)s
GROUP BY f.id
ORDER BY sum(s.tottime) DESC, f.id
LIMIT %(limit)s
"""


def function_stats(
    conn: Connection, *, entry_point: str | None = None, limit: int = 20
) -> list[FunctionStat]:
    """The functions that took most time in profiled jobs (of one entry
    point, if given), by total time spent in the function itself."""
    rows = conn.execute(
        _FUNCTION_STATS, {"entry_point": entry_point, "limit": limit}
    ).fetchall()
    return [
        FunctionStat(r[0], r[1], r[2], int(r[3]), int(r[4]), r[5], r[6])
        for r in rows
    ]


# ---------------------------------------------------------------- gauges

QUEUE_COUNT_CAP = 100_000

_QUEUE_COUNTS = """
SELECT
    (SELECT count(*) FROM (
        SELECT FROM pdoflowd.jobs WHERE status = 'waiting' LIMIT %(cap)s
    ) AS w),
    (SELECT count(*) FROM pdoflowd.jobs WHERE status = 'executing')
"""

_OLDEST_WAITING = """
SELECT extract(epoch FROM now() - coalesce(j.run_after, j.created_at))::float8
FROM pdoflowd.jobs AS j
WHERE j.status = 'waiting'
  AND coalesce(j.run_after, j.created_at) <= now()
  AND EXISTS (
      SELECT FROM pdoflowd.postings AS p
      WHERE p.id = j.posting_id AND p.status = 'executing')
ORDER BY coalesce(j.run_after, j.created_at)
LIMIT 1
"""


def queue_stats(conn: Connection) -> tuple[dict[str, int], float | None]:
    """Waiting and executing job counts, and the oldest runnable job's age.

    Both read partial indexes only, never the finished history; the waiting
    count stops at :data:`QUEUE_COUNT_CAP` so a huge backlog stays cheap.
    """
    with conn.transaction():
        conn.execute("SELECT set_config('statement_timeout', '2000', true)")
        row = conn.execute(_QUEUE_COUNTS, {"cap": QUEUE_COUNT_CAP}).fetchone()
        oldest = conn.execute(_OLDEST_WAITING).fetchone()
    assert row is not None
    counts = {"waiting": int(row[0]), "executing": int(row[1])}
    return counts, None if oldest is None else float(oldest[0])
