"""The statements of posting dependencies: postings that wait for postings.

Owns making a new posting wait for others (``pdoflowd.wait_for_postings``
in the schema, which holds its jobs), what a posting still waits for, the
tree of what it waits for, the results of the postings it waited for, and
the daemons' review of held postings. The decisions themselves (release or
cancel a held posting when its upstream postings end) are the schema's:
``pdoflowd.judge_hold`` and ``pdoflowd.follow_upstreams``, run in the
transaction that ends an upstream posting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from pdoflowd.db.common import Connection, one_statement
from pdoflowd.status import JobStatus, PostingStatus

__all__ = [
    "ON_FAILURE_RULES",
    "GraphNode",
    "UpstreamResult",
    "dependency_graph",
    "dependents",
    "missing_postings",
    "review_holds",
    "upstream_results",
    "wait_for_postings",
    "waiting_for",
]

# What an upstream posting's failure (errored out, cancelled) does to a
# posting that waits for it: cancel it (and its own dependents), or run it
# all the same once every upstream posting has ended.
ON_FAILURE_RULES = ("cancel", "run")

_MISSING_POSTINGS = """
SELECT u.id FROM unnest(%(ids)s::uuid[]) AS u(id)
WHERE NOT EXISTS (SELECT FROM pdoflowd.postings AS p WHERE p.uuid = u.id)
"""


def missing_postings(conn: Connection, ids: Sequence[UUID]) -> list[UUID]:
    """Which of ``ids`` name no posting this session may see."""
    if not ids:
        return []
    rows = conn.execute(_MISSING_POSTINGS, {"ids": list(ids)}).fetchall()
    return [r[0] for r in rows]


_WAIT_FOR_POSTINGS = """
SELECT new_status, held
FROM pdoflowd.wait_for_postings(%(posting)s, %(upstreams)s::uuid[],
                                %(on_failure)s)
"""


def wait_for_postings(
    conn: Connection,
    posting_uuid: UUID,
    upstreams: Sequence[UUID],
    on_failure: str,
) -> tuple[PostingStatus, bool]:
    """Make the posting just inserted (in this transaction) wait for
    ``upstreams``; its status after that and whether its jobs are held.

    Refused whole (``psycopg.errors.ForeignKeyViolation``) when one of
    ``upstreams`` is no posting the poster may see.
    """
    row = conn.execute(
        _WAIT_FOR_POSTINGS,
        {
            "posting": posting_uuid,
            "upstreams": list(upstreams),
            "on_failure": on_failure,
        },
    ).fetchone()
    assert row is not None
    return PostingStatus(row[0]), bool(row[1])


_WAITING_FOR = """
SELECT u.uuid
FROM pdoflowd.postings AS p
JOIN pdoflowd.posting_dependencies AS d ON d.posting_id = p.id
JOIN pdoflowd.postings AS u ON u.id = d.upstream_id
WHERE p.uuid = %(posting)s
  AND u.status NOT IN ('finished', 'errored_out', 'cancelled')
ORDER BY u.id
"""


def waiting_for(conn: Connection, posting_uuid: UUID) -> list[UUID]:
    """The upstream postings of a posting that have not ended yet."""
    rows = conn.execute(_WAITING_FOR, {"posting": posting_uuid}).fetchall()
    return [r[0] for r in rows]


@dataclass(frozen=True)
class GraphNode:
    """One posting in a dependency tree: ``parent`` is the posting that
    waits for it (None at the root), ``depth`` its distance from the root.
    ``held`` is whether its own jobs are held."""

    depth: int
    uuid: UUID
    parent: UUID | None
    status: PostingStatus
    target_function: str
    held: bool
    on_failure: str
    cancel_reason: str | None


# The root, then what it waits for, and what that waits for, to `depth`
# levels (each path in full: a posting two others wait for is shown under
# both). Row-level security applies: a poster sees only its own postings.
_DEPENDENCY_GRAPH = """
WITH RECURSIVE tree(depth, id, parent, path) AS (
    SELECT 0, p.id, NULL::bigint, ARRAY[p.id]
    FROM pdoflowd.postings AS p WHERE p.uuid = %(posting)s
  UNION ALL
    SELECT t.depth + 1, d.upstream_id, t.id, t.path || d.upstream_id
    FROM tree AS t
    JOIN pdoflowd.posting_dependencies AS d ON d.posting_id = t.id
    WHERE t.depth < %(depth)s
)
SELECT t.depth, p.uuid, parent.uuid, p.status, p.target_function, p.held,
       p.on_failure, p.cancel_reason
FROM tree AS t
JOIN pdoflowd.postings AS p ON p.id = t.id
LEFT JOIN pdoflowd.postings AS parent ON parent.id = t.parent
ORDER BY t.path
"""


def dependency_graph(
    conn: Connection, posting_uuid: UUID, *, depth: int
) -> list[GraphNode]:
    """The posting and the tree of what it waits for, depth first (empty
    when there is no such posting)."""
    rows = conn.execute(
        _DEPENDENCY_GRAPH, {"posting": posting_uuid, "depth": depth}
    ).fetchall()
    return [
        GraphNode(r[0], r[1], r[2], PostingStatus(r[3]), *r[4:]) for r in rows
    ]


_DEPENDENTS = """
SELECT w.uuid, w.status, w.target_function
FROM pdoflowd.postings AS p
JOIN pdoflowd.posting_dependencies AS d ON d.upstream_id = p.id
JOIN pdoflowd.postings AS w ON w.id = d.posting_id
WHERE p.uuid = %(posting)s
ORDER BY w.id
"""


def dependents(
    conn: Connection, posting_uuid: UUID
) -> list[tuple[UUID, PostingStatus, str]]:
    """The postings that wait for this one: id, status, target."""
    rows = conn.execute(_DEPENDENTS, {"posting": posting_uuid}).fetchall()
    return [(r[0], PostingStatus(r[1]), r[2]) for r in rows]


@dataclass(frozen=True)
class UpstreamResult:
    """One job of a posting that a posting waited for, as its job context
    reads it (``value`` still tagged, as stored)."""

    posting_uuid: UUID
    store_result: bool
    job_uuid: UUID | None
    status: JobStatus | None
    stored: bool
    value: Any


# Every upstream posting once, with its jobs in the order they were given
# (no job row for a posting that has none).
_UPSTREAM_RESULTS = """
SELECT u.uuid, u.store_result, j.uuid, j.status, j.result IS NOT NULL,
       j.result
FROM pdoflowd.postings AS p
JOIN pdoflowd.posting_dependencies AS d ON d.posting_id = p.id
JOIN pdoflowd.postings AS u ON u.id = d.upstream_id
LEFT JOIN pdoflowd.jobs AS j ON j.posting_id = u.id
WHERE p.uuid = %(posting)s
ORDER BY u.id, j.id
"""


def upstream_results(
    conn: Connection, posting_uuid: UUID
) -> list[UpstreamResult]:
    """The jobs (and stored results) of the postings a posting waited for,
    posting by posting in the order they were made, jobs in order."""
    with one_statement(conn):
        rows = conn.execute(
            _UPSTREAM_RESULTS, {"posting": posting_uuid}
        ).fetchall()
    return [
        UpstreamResult(
            r[0],
            r[1],
            r[2],
            None if r[3] is None else JobStatus(r[3]),
            bool(r[4]),
            r[5],
        )
        for r in rows
    ]


_REVIEW_HOLDS = "SELECT pdoflowd.review_holds(%(batch)s)"


def review_holds(conn: Connection, *, batch: int = 1000) -> int:
    """Release or cancel held postings whose upstream postings allow it
    and that no transaction decided (one committed while it settled an
    upstream, a dependent locked then); how many were decided."""
    with one_statement(conn):
        row = conn.execute(_REVIEW_HOLDS, {"batch": batch}).fetchone()
    return 0 if row is None else int(row[0])
