"""Many small postings against one big one:
``python -m bench.postingsprobe [N] [--workers W]``.

Starts a throwaway PostgreSQL and ``pdoflowd run`` (batch 100), then
drains N no-op jobs twice, each time pre-enqueued paused and resumed at
once: as one posting of N jobs, and as N postings of one job each. Prints
both rates (from the resuming commit to the last posting's finished_at,
on the database clock) and their ratio, which the performance target
wants at 0.5 or more: settling postings must not dominate the drain.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench import database
from bench.daemon import Daemon, DaemonSettings
from devtools import devcluster
from pdoflowd.db import migrate, postings

_TARGET = 0.5

_SMALL_POSTINGS = """
WITH made AS (
    INSERT INTO pdoflowd.postings
        (uuid, target_function, entry_point, status)
    SELECT gen_random_uuid(), 'noop', %(entry_point)s, 'paused'
    FROM generate_series(1, %(count)s::bigint)
    RETURNING id
)
INSERT INTO pdoflowd.jobs (uuid, posting_id, priority, posargs)
SELECT gen_random_uuid(), made.id, 0, jsonb_build_array(made.id)
FROM made
RETURNING posting_id
"""

_RESUME_ALL = """
UPDATE pdoflowd.postings SET status = 'executing'
WHERE status = 'paused'
RETURNING extract(epoch FROM now())::float8
"""

_UNFINISHED = """
SELECT count(*) FILTER (WHERE status NOT IN ('finished', 'errored_out')),
       extract(epoch FROM max(finished_at))::float8
FROM pdoflowd.postings WHERE id BETWEEN %s AND %s
"""


def drain_one_posting(conn: database.Connection, count: int) -> float:
    """Jobs per second draining one posting of ``count`` jobs."""
    posting_id = database.load_waiting(conn, count, paused=True)
    began = database.resume(conn, posting_id)
    ended = database.wait_finished(
        conn, posting_id, timeout_s=max(120.0, count / 100), interval=0.02
    )
    return count / (ended - began)


def drain_small_postings(conn: database.Connection, count: int) -> float:
    """Jobs per second draining ``count`` postings of one job each."""
    with conn.transaction():
        ids = [
            row[0]
            for row in conn.execute(
                _SMALL_POSTINGS,
                {"entry_point": database.NOOP, "count": count},
            ).fetchall()
        ]
    low, high = min(ids), max(ids)
    with conn.transaction():
        row = conn.execute(_RESUME_ALL).fetchone()
        assert row is not None
        postings.notify(conn)
    began = float(row[0])
    deadline = time.monotonic() + max(120.0, count / 50)
    while True:
        row = conn.execute(_UNFINISHED, (low, high)).fetchone()
        assert row is not None
        left, ended = row
        if left == 0 and ended is not None:
            return count / (float(ended) - began)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{left} of {count} postings still open")
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.postingsprobe",
        description="N postings of one job against one posting of N jobs.",
    )
    parser.add_argument("jobs", nargs="?", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pdoflowd-postingsprobe-"))
    with devcluster.LocalCluster(work / "pg") as cluster:
        dsn = cluster.create_database("postingsprobe")
        migrate.upgrade(dsn)
        settings = DaemonSettings(args.workers, 100)
        with (
            Daemon(work / "daemon", dsn, settings),
            database.connect(dsn) as conn,
        ):
            one = drain_one_posting(conn, args.jobs)
            small = drain_small_postings(conn, args.jobs)
    ratio = small / one
    verdict = "met" if ratio >= _TARGET else "NOT met"
    print(
        f"{settings.label()}, {args.jobs:,} no-op jobs:"
        f" one posting {one:,.0f} jobs/s,"
        f" {args.jobs:,} postings of one job {small:,.0f} jobs/s;"
        f" ratio {ratio:.2f} (>= {_TARGET}: {verdict})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
