"""Retention: deleting postings that ended long ago, in short transactions.

Owns the SQL that finds prunable postings (ended before their status's
cutoff, with no job of theirs running or held by a claim), deletes one
posting's jobs a bounded chunk at a time (each chunk its own transaction;
the jobs' profiles go with them by ON DELETE CASCADE) and then the posting
(its shared variables go with it), counts what a prune would remove, and
the advisory lock that lets one daemon at a time prune. Callers pass the
ages per posting status (a status left out is kept) and their connection;
it knows nothing of configuration or processes.

A posting is locked (FOR UPDATE, SKIP LOCKED) and checked again in every
chunk, and its jobs are skipped, never waited for, when another session
holds them: a posting resumed or retried between two chunks keeps the
jobs it has left, and pruning never waits on a lock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from psycopg import errors

from pdoflowd.db.common import Connection, one_statement
from pdoflowd.status import PostingStatus

__all__ = [
    "ENDED",
    "ChunkResult",
    "PruneCount",
    "PrunePass",
    "count_prunable",
    "may_prune",
    "prunable_postings",
    "prune_chunk",
    "prune_some",
    "try_lock_pruning",
]

# The posting statuses pruning may delete.
ENDED = (
    PostingStatus.FINISHED,
    PostingStatus.ERRORED_OUT,
    PostingStatus.CANCELLED,
)

# Any fixed number; all pdoflowd daemons agree on it ("pdoprune").
_PRUNING_LOCK_KEY = 0x70646F_7072756E

# Which postings may go: ended before their status's cutoff (an age of
# NULL keeps that status), and nothing of theirs running: no executing job,
# and no job a cancel ended while its claim's run may still be going. The
# cutoff of the youngest age bounds the scan of postings_ended; the
# cancelled claims are found through their own small partial index.
_PRUNABLE = """
p.status IN ('finished', 'errored_out', 'cancelled')
AND p.finished_at < now() - make_interval(
    secs => least(%(finished)s::float8, %(errored_out)s::float8,
                  %(cancelled)s::float8))
AND p.finished_at < now() - make_interval(secs => CASE p.status
    WHEN 'finished' THEN %(finished)s::float8
    WHEN 'errored_out' THEN %(errored_out)s::float8
    ELSE %(cancelled)s::float8 END)
AND NOT EXISTS (
    SELECT FROM pdoflowd.jobs AS j
    WHERE j.posting_id = p.id AND j.status = 'executing')
AND NOT EXISTS (
    SELECT FROM pdoflowd.jobs AS j
    WHERE j.status = 'errored_out' AND j.owner IS NOT NULL
      AND j.posting_id = p.id)
"""

_PRUNABLE_POSTINGS = (
    "SELECT p.id FROM pdoflowd.postings AS p WHERE"
    + _PRUNABLE
    + "ORDER BY p.finished_at LIMIT %(limit)s"
)

_LOCK_POSTING = (
    "SELECT p.id FROM pdoflowd.postings AS p WHERE p.id = %(id)s AND"
    + _PRUNABLE
    + "FOR UPDATE OF p SKIP LOCKED"
)

_DELETE_JOBS = """
DELETE FROM pdoflowd.jobs AS j
WHERE j.id IN (
    SELECT k.id FROM pdoflowd.jobs AS k
    WHERE k.posting_id = %(id)s
    LIMIT %(batch)s
    FOR UPDATE OF k SKIP LOCKED)
"""

_DELETE_POSTING = """
DELETE FROM pdoflowd.postings AS p
WHERE p.id = %(id)s
  AND NOT EXISTS (SELECT FROM pdoflowd.jobs AS j WHERE j.posting_id = p.id)
"""

_COUNT_PRUNABLE = (
    """
SELECT count(*),
       coalesce(sum((SELECT count(*) FROM pdoflowd.jobs AS j
                     WHERE j.posting_id = p.id)), 0)
FROM pdoflowd.postings AS p WHERE"""
    + _PRUNABLE
)


def _ages(older_than: Mapping[PostingStatus, float]) -> dict[str, float | None]:
    """The statement's parameters: each ended status's age in seconds, or
    None to keep that status."""
    unknown = set(older_than) - set(ENDED)
    if unknown:
        names = ", ".join(sorted(s.value for s in unknown))
        raise ValueError(f"only ended postings can be pruned, not {names}")
    for status, age in older_than.items():
        if not age >= 0:
            raise ValueError(f"the age of {status.value} postings: {age!r}")
    return {s.value: older_than.get(s) for s in ENDED}


@dataclass(frozen=True)
class ChunkResult:
    """What one chunk removed: ``jobs``, and whether the posting went too.
    ``locked`` is False when the posting was not (or no longer) prunable,
    or another session held it."""

    locked: bool
    jobs: int
    posting_deleted: bool


@dataclass(frozen=True)
class PruneCount:
    """Postings and jobs removed, or that a prune would remove."""

    postings: int = 0
    jobs: int = 0

    def __add__(self, other: PruneCount) -> PruneCount:
        return PruneCount(
            self.postings + other.postings, self.jobs + other.jobs
        )


def may_prune(conn: Connection) -> bool:
    """Whether this session's role may delete postings and jobs."""
    row = conn.execute(
        "SELECT has_table_privilege('pdoflowd.jobs', 'DELETE')"
        " AND has_table_privilege('pdoflowd.postings', 'DELETE')"
    ).fetchone()
    return bool(row and row[0])


def try_lock_pruning(conn: Connection) -> bool:
    """Take the pruning lock for this session, without waiting; True if it
    holds it now. It is held until the session ends (a session-level lock
    nests: take it once per connection), so one daemon prunes while its
    connection lives."""
    row = conn.execute(
        "SELECT pg_try_advisory_lock(%s)", (_PRUNING_LOCK_KEY,)
    ).fetchone()
    return bool(row and row[0])


def prunable_postings(
    conn: Connection, older_than: Mapping[PostingStatus, float], *, limit: int
) -> list[int]:
    """Up to ``limit`` prunable postings' internal ids, oldest end first."""
    params = {**_ages(older_than), "limit": limit}
    with one_statement(conn):
        rows = conn.execute(_PRUNABLE_POSTINGS, params).fetchall()
    return [int(r[0]) for r in rows]


def prune_chunk(
    conn: Connection,
    posting_id: int,
    older_than: Mapping[PostingStatus, float],
    *,
    batch: int,
    statement_timeout_s: float | None = None,
) -> ChunkResult:
    """Delete up to ``batch`` jobs of one prunable posting, and the posting
    once none is left, in one transaction of its own; each of its
    statements bounded by ``statement_timeout_s`` if given (the session's
    own timeout otherwise)."""
    params = {**_ages(older_than), "id": posting_id, "batch": batch}
    with conn.transaction():
        if statement_timeout_s is not None:
            conn.execute(
                "SELECT set_config('statement_timeout', %s, true)",
                (f"{max(1, round(statement_timeout_s * 1000))}ms",),
            )
        if conn.execute(_LOCK_POSTING, params).fetchone() is None:
            return ChunkResult(False, 0, False)
        jobs = conn.execute(_DELETE_JOBS, params).rowcount
        gone = False
        if jobs < batch:
            gone = conn.execute(_DELETE_POSTING, params).rowcount == 1
    return ChunkResult(True, max(jobs, 0), gone)


@dataclass(frozen=True)
class PrunePass:
    """What :func:`prune_some` removed, whether more may be left, and the
    error that ended it early (a lock or statement timeout), if one did."""

    removed: PruneCount
    more_left: bool
    interrupted: str | None = None


def prune_some(
    conn: Connection,
    older_than: Mapping[PostingStatus, float],
    *,
    batch: int,
    postings: int,
    go_on: Callable[[int], bool] = lambda chunks: True,
    statement_timeout_s: float | None = None,
) -> PrunePass:
    """Prune up to ``postings`` prunable postings, oldest end first, a chunk
    of ``batch`` jobs per transaction (its statements bounded by
    ``statement_timeout_s``, if given), while ``go_on(chunks done)`` says so.

    A posting that a chunk could not touch (held by another session, or no
    longer prunable) is left for a later call; so is the chunk that met a
    lock or statement timeout (rolled back; the pass ends there).
    """
    removed = PruneCount()
    chunks = 0
    found = prunable_postings(conn, older_than, limit=postings)
    for posting_id in found:
        while True:
            if not go_on(chunks):
                return PrunePass(removed, True)
            chunks += 1
            try:
                chunk = prune_chunk(
                    conn,
                    posting_id,
                    older_than,
                    batch=batch,
                    statement_timeout_s=statement_timeout_s,
                )
            except (errors.LockNotAvailable, errors.QueryCanceled) as exc:
                return PrunePass(removed, True, str(exc).strip())
            removed += PruneCount(int(chunk.posting_deleted), chunk.jobs)
            if chunk.posting_deleted or not chunk.jobs:
                break
    return PrunePass(removed, len(found) >= postings)


def count_prunable(
    conn: Connection, older_than: Mapping[PostingStatus, float]
) -> PruneCount:
    """How many postings and jobs a prune with these ages would remove now."""
    with one_statement(conn):
        row = conn.execute(_COUNT_PRUNABLE, _ages(older_than)).fetchone()
    assert row is not None
    return PruneCount(int(row[0]), int(row[1]))
