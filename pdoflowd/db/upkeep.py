"""The daemons' own rows and the sweeps that keep every job owned.

Owns the SQL the database session runs for its daemon: registering and
heartbeating the daemon with its live owner tokens, session deadlines,
marking it stopped, taking back jobs whose owner is gone, the owners of
claims a cancel ended, and the queue gauges. Callers pass plain values and
their own connection.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from uuid import UUID

from pdoflowd.db.common import (
    JSON_ENCODER,
    Connection,
    one_statement,
)
from pdoflowd.db.queue import RequeuedJob, claim_ends
from pdoflowd.status import JobStatus

# ---------------------------------------------------------------- daemons


_HEARTBEAT = """
WITH previous AS (
    -- Read in the statement's snapshot: the row as it was before the upsert.
    SELECT stopped_at FROM pdoflowd.daemons WHERE id = %(id)s
)
INSERT INTO pdoflowd.daemons (id, hostname, pid, version, provides, posters,
                              lease_s, live_owners, limits)
VALUES (%(id)s, %(hostname)s, %(pid)s, %(version)s, %(provides)s::text[],
        %(posters)s::text[], %(lease_s)s, %(live_owners)s::uuid[],
        %(limits)s::jsonb)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL,
    previous_heartbeat_at = pdoflowd.daemons.heartbeat_at,
    provides = EXCLUDED.provides, posters = EXCLUDED.posters,
    lease_s = EXCLUDED.lease_s, live_owners = EXCLUDED.live_owners,
    limits = EXCLUDED.limits
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
    resource_limits: Mapping[str, int] | None = None,
) -> dt.datetime | None:
    """Register a daemon or renew its heartbeat.

    ``lease_s`` is how long others wait for its next heartbeat before they
    declare it lost. ``live_owners`` are the owner tokens its live workers
    hold, read before this statement is sent: a job claimed under another
    token of this daemon before its previous heartbeat has no live owner
    (see :func:`take_back_ownerless_jobs`). ``provides`` and ``posters``
    record what it claims, so that a posting no running daemon would claim
    can be shown as such, and ``resource_limits`` its jobs.limits, so that
    daemons whose limits differ can be found
    (:func:`differing_resource_limits`). Returns when it had been declared
    lost (its jobs were then rescued by another daemon), else None.
    """
    with one_statement(conn):
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
                "limits": JSON_ENCODER.encode(dict(resource_limits or {})),
            },
        ).fetchone()
    return None if row is None else row[0]


# Live daemons (not stopped, heartbeat within their lease) whose published
# jobs.limits differ from these.
_DIFFERING_LIMITS = """
SELECT d.hostname, d.id, d.limits::text
FROM pdoflowd.daemons AS d
WHERE d.id <> %(id)s AND d.stopped_at IS NULL
  AND d.heartbeat_at > now() - make_interval(secs => d.lease_s)
  AND d.limits <> %(limits)s::jsonb
ORDER BY d.hostname, d.id
"""


def differing_resource_limits(
    conn: Connection, *, daemon_id: UUID, resource_limits: Mapping[str, int]
) -> list[tuple[str, UUID, dict[str, int]]]:
    """The live daemons other than ``daemon_id`` whose jobs.limits differ
    from ``resource_limits``: (hostname, daemon id, their limits)."""
    with one_statement(conn):
        rows = conn.execute(
            _DIFFERING_LIMITS,
            {
                "id": daemon_id,
                "limits": JSON_ENCODER.encode(dict(resource_limits)),
            },
        ).fetchall()
    return [(r[0], r[1], json.loads(r[2])) for r in rows]


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
    with one_statement(conn):
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
    + claim_ends("c.kind", "c.reason", live="c.live")
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
    with one_statement(conn):
        rows = conn.execute(
            _TAKE_BACK_OWNERLESS, {"may_declare_lost": may_declare_lost}
        ).fetchall()
    return [RequeuedJob(r[0], r[1], bool(r[2]), JobStatus(r[3])) for r in rows]


_CANCELLED_CLAIM_OWNERS = """
SELECT DISTINCT j.owner FROM pdoflowd.jobs AS j
WHERE j.daemon_id = %(daemon_id)s
  AND j.status = 'errored_out' AND j.owner IS NOT NULL
"""


def cancelled_claim_owners(conn: Connection, *, daemon_id: UUID) -> set[UUID]:
    """Owners of this daemon's claims that a cancel ended while their run
    may still be going or be about to start (until the owner gives them up
    or its jobs are taken back)."""
    with one_statement(conn):
        rows = conn.execute(
            _CANCELLED_CLAIM_OWNERS, {"daemon_id": daemon_id}
        ).fetchall()
    return {r[0] for r in rows}


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
