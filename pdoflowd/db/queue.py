"""The queue's hot path: claiming jobs and recording how they ended.

Owns the SQL a worker runs per job: the ``FOR UPDATE SKIP LOCKED`` claim
(its columns and ownership shared with ``execute-job``'s claim in
:mod:`~pdoflowd.db.onejob`), outcomes recorded in one statement and fenced
by the claim's owner token and attempt, giving claims back, taking back a
dead worker's jobs, settling postings, and cancelled runs. Callers pass
plain values and their own connection; nothing here knows of processes or
configuration.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from uuid import UUID

from pdoflowd.db.common import (
    JSON_ENCODER,
    Connection,
    one_statement,
    storable_text,
)
from pdoflowd.status import (
    JobStatus,
    OutcomeKind,
    PostingStatus,
    outcome_kind,
)

# ---------------------------------------------------------------- claiming


class ClaimedJob(NamedTuple):
    """A job a worker now owns, with what it needs to run it (a tuple: a
    claim makes one per row it returns)."""

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
    # Since when the job could run (its run-after, else its creation), in
    # seconds since the epoch: how long it waited is read from it.
    runnable_since: float
    store_result: bool = False


# What execute-job's claim sets on the job it takes, and what it returns:
# the same as the worker's claim, pdoflowd.claim_jobs in the schema, does
# (tests/test_claim_function.py holds the two to it).
TAKE_OWNERSHIP = """
SET status = 'executing',
    owner = %(owner)s,
    daemon_id = %(daemon_id)s,
    attempt = j.attempt + 1,
    claimed_at = now(),
    progress = NULL,
    progress_note = NULL,
    progress_at = NULL
"""
CLAIMED_COLUMNS = """
RETURNING j.id, j.uuid, j.posting_id, p.uuid, p.entry_point, j.priority,
          j.attempt, j.tries_remaining, j.posargs::text, j.kwargs::text,
          p.timeout_s,
          extract(epoch FROM coalesce(j.run_after, j.created_at))::float8,
          p.store_result
"""

_JOB_STATUS = {status.value: status for status in JobStatus}

# The claim is a function of the schema (see its comment there): with its
# plan made once per session, and the outcomes of the last claim written
# in the same statement. A posting's requirements must be among what this
# daemon provides, and with posters configured, its poster among them; the
# resources it uses must be among the daemon's limits (jobs.limits), and
# its caps are kept inside the claim.
_CLAIM_JOBS = """
SELECT * FROM pdoflowd.claim_jobs(
    %(finishing)s, %(outcomes)s::json, %(owner)s, %(daemon_id)s,
    %(limit)s, %(provides)s::text[], %(posters)s::text[],
    %(limit_names)s::text[], %(limit_values)s::integer[])
"""


def claim(
    conn: Connection,
    *,
    owner: UUID,
    daemon_id: UUID,
    limit: int,
    provides: Sequence[str] = (),
    posters: Sequence[str] = (),
    resource_limits: Mapping[str, int] | None = None,
) -> list[ClaimedJob]:
    """Claim up to ``limit`` runnable jobs, best first; commits at once.

    Only jobs of postings whose requirements are among ``provides`` are
    taken, and with ``posters`` given, only postings of these posters.
    A posting's ``max_running`` and the ``resource_limits`` (name: most
    jobs using it executing at once, cluster-wide) of the resources it
    uses are kept; a posting using a resource not among them is not taken.
    Capped jobs come first in a batch (see docs/architecture.md).
    Nothing is taken for a daemon that stopped or was declared lost: its
    workers, cut off from it, claim nothing they could not be rescued from.
    """
    return record_and_claim(
        conn,
        finishing=None,
        outcomes=(),
        owner=owner,
        daemon_id=daemon_id,
        limit=limit,
        provides=provides,
        posters=posters,
        resource_limits=resource_limits,
    ).jobs


@dataclass(frozen=True)
class Claimed:
    """What one :func:`record_and_claim` did: the outcomes the database
    accepted, and the jobs it claimed, best first."""

    recorded: list[RecordedOutcome]
    jobs: list[ClaimedJob]


def record_and_claim(
    conn: Connection,
    *,
    finishing: UUID | None,
    outcomes: Sequence[Outcome],
    owner: UUID,
    daemon_id: UUID | None,
    limit: int,
    provides: Sequence[str] = (),
    posters: Sequence[str] = (),
    resource_limits: Mapping[str, int] | None = None,
) -> Claimed:
    """Write the outcomes of the claim made under ``finishing``, then
    claim up to ``limit`` jobs (0: none) under ``owner``: one statement,
    committed at once.

    The outcomes are written as :func:`record_outcomes` writes them (fenced
    by ``finishing`` and each job's attempt); the claim is :func:`claim`'s.
    A value the database refuses fails both: write the outcomes on their
    own then (:func:`record_outcomes`, one by one), and claim after.
    """
    names = sorted(resource_limits or {})
    params = {
        "finishing": finishing,
        "outcomes": _outcomes_json(outcomes) if outcomes else None,
        "owner": owner,
        "daemon_id": daemon_id,
        "limit": limit,
        "provides": list(provides),
        "posters": list(posters),
        "limit_names": names,
        "limit_values": [(resource_limits or {})[n] for n in names],
    }
    with one_statement(conn):
        # Binary results: uuids and numbers load faster so.
        cursor = conn.cursor(binary=True)
        rows = cursor.execute(_CLAIM_JOBS, params).fetchall()
    recorded = []
    jobs = []
    for row in rows:
        if row[0]:
            recorded.append(
                RecordedOutcome(
                    row[1], row[2], outcome_kind(row[3]), _JOB_STATUS[row[4]]
                )
            )
        else:
            jobs.append(ClaimedJob(row[1], row[5], row[2], *row[6:]))
    jobs.sort(key=lambda j: (-j.priority, j.id))
    return Claimed(recorded, jobs)


# ---------------------------------------------------------------- outcomes


class _OutcomeFields(NamedTuple):
    job_id: int
    attempt: int
    kind: OutcomeKind
    # When the run began and ended, in seconds since the epoch.
    started: float | None = None
    completed: float | None = None
    error: str | None = None
    traceback: str | None = None
    retry_delay_s: float | None = None
    result: str | None = None


class Outcome(_OutcomeFields):
    """What became of one claimed job, to be written under its fence.

    ``kind`` is ``done``, ``failed`` or ``timeout`` (uses a try; waits again
    while tries remain), ``refused`` (errored out at once, no retry) or
    ``released`` (never started: back to waiting, no try used); given as
    its plain value, it is made an :class:`OutcomeKind`. ``result``
    is the JSON text of a done job's return value, when its posting keeps
    results. A job that waits again may run ``retry_delay_s`` seconds after
    the database's time when the outcome is written, not the worker's.
    A tuple: one is made per job run, and a tuple is made fastest.
    """

    __slots__ = ()

    def __new__(
        cls,
        job_id: int,
        attempt: int,
        kind: OutcomeKind | str,
        started: float | None = None,
        completed: float | None = None,
        error: str | None = None,
        traceback: str | None = None,
        retry_delay_s: float | None = None,
        result: str | None = None,
    ) -> Outcome:
        # The one place the kind is checked and typed.
        return super().__new__(
            cls,
            job_id,
            attempt,
            outcome_kind(kind),
            started,
            completed,
            error,
            traceback,
            retry_delay_s,
            result,
        )

    def as_refused(self, problem: str) -> Outcome:
        """This outcome as it can still be written after the database
        refused it as it was (``problem`` says why): without its result or
        traceback, with an error that says so. A done job ends errored out
        (its return value is lost); any other keeps its kind, so a run still
        uses its try and a job never started still uses none.
        """
        if self.kind is OutcomeKind.DONE:
            kind = OutcomeKind.REFUSED
            what = "the return value" if self.result is not None else "it"
            error = f"done, but {what} could not be stored: {problem}"
        else:
            kind = self.kind
            original = (self.error or self.kind.value)[:_REFUSED_ERROR_CHARS]
            error = (
                f"{original} (stored without its details, which the"
                f" database refused: {problem})"
            )
        return Outcome(
            self.job_id,
            self.attempt,
            kind,
            self.started,
            self.completed,
            # Spelt in ASCII, which a database in any encoding stores.
            error=error.encode("ascii", "backslashreplace").decode("ascii"),
            retry_delay_s=self.retry_delay_s,
        )


# How much of the original error an outcome the database refused keeps.
_REFUSED_ERROR_CHARS = 2000


class RecordedOutcome(NamedTuple):
    """An outcome the database accepted, and the job's resulting status."""

    job_id: int
    posting_id: int
    kind: OutcomeKind
    status: JobStatus


def claim_ends(
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


# The outcomes travel as one JSON array of objects (times in seconds since
# the epoch; absent keys are NULL): one parameter to send and to parse,
# where an array per column cost both sides several times as much.


def _outcome_json(o: Outcome) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": o.job_id,
        "attempt": o.attempt,
        "kind": o.kind.value,
    }
    if o.started is not None:
        row["started"] = o.started
    if o.completed is not None:
        row["completed"] = o.completed
    if o.error is not None:
        row["error"] = storable_text(o.error)
    if o.traceback is not None:
        row["traceback"] = storable_text(o.traceback)
    if o.retry_delay_s is not None:
        row["retry_delay"] = o.retry_delay_s
    if o.result is not None:
        row["result"] = o.result
    return row


def _outcomes_json(outcomes: Iterable[Outcome]) -> str:
    return JSON_ENCODER.encode([_outcome_json(o) for o in outcomes])


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
    return record_and_claim(
        conn,
        finishing=owner,
        outcomes=outcomes,
        owner=owner,
        daemon_id=None,
        limit=0,
    ).recorded


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
    with one_statement(conn):
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
    + claim_ends("'released'", "j.error", live="j.status = 'executing'")
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
    with one_statement(conn):
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
    + claim_ends(
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
    with one_statement(conn):
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
    with one_statement(conn):
        rows = conn.execute(
            _SETTLE_POSTINGS, {"ids": ids, "threshold": error_threshold}
        ).fetchall()
    return {pid: PostingStatus(status) for pid, status in rows}


_UNSETTLED_POSTINGS = """
SELECT p.id FROM pdoflowd.postings AS p
WHERE p.status = 'executing'
  AND NOT EXISTS (
      SELECT FROM pdoflowd.jobs AS j
      WHERE j.posting_id = p.id
        AND j.status IN ('held', 'waiting', 'executing'))
LIMIT 1000
"""


def unsettled_postings(conn: Connection) -> list[int]:
    """Executing postings with nothing left to run (a settle was missed)."""
    with one_statement(conn):
        return [r[0] for r in conn.execute(_UNSETTLED_POSTINGS).fetchall()]


_CANCELLED_AMONG = """
SELECT j.id
FROM pdoflowd.jobs AS j
JOIN pdoflowd.postings AS p ON p.id = j.posting_id
WHERE j.id = ANY(%(ids)s::bigint[])
  AND (p.status = 'cancelled'
       OR (j.status = 'errored_out' AND j.error = 'cancelled'))
"""


def cancelled_among(conn: Connection, job_ids: Iterable[int]) -> set[int]:
    """Which of these (running) jobs were cancelled: their posting, or the
    job alone (``pdoflowd.control_job``)."""
    ids = sorted(set(job_ids))
    if not ids:
        return set()
    with one_statement(conn):
        rows = conn.execute(_CANCELLED_AMONG, {"ids": ids}).fetchall()
    return {r[0] for r in rows}
