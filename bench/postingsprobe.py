"""Many small postings against one big one:
``python -m bench.postingsprobe [N] [--workers W]``.

Starts a throwaway PostgreSQL and ``pdoflowd run`` (batch 100), then
drains N no-op jobs twice, each time pre-enqueued paused and resumed at
once: as one posting of N jobs, and as N postings of one job each (the
drains of the main table's postings section, in :mod:`bench.phases`).
Prints both rates (from the resuming commit to the last posting's
finished_at, on the database clock) and their ratio, which the
performance target wants at 0.5 or more: settling postings must not
dominate the drain. An untimed posting warms the daemon up first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench import database, phases, report
from bench.daemon import Daemon, DaemonSettings
from devtools import devcluster
from pdoflowd.db import migrate


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
            phases.warm_up(conn, settings)
            one = phases.drain_one_posting(conn, args.jobs)
            small = phases.drain_small_postings(conn, args.jobs)
    ratio = small / one
    target = report.SMALL_POSTINGS_OVER_ONE_MIN
    verdict = "met" if ratio >= target else "NOT met"
    print(
        f"{settings.label()}, {args.jobs:,} no-op jobs:"
        f" one posting {one:,.0f} jobs/s,"
        f" {args.jobs:,} postings of one job {small:,.0f} jobs/s;"
        f" ratio {ratio:.2f} (>= {target}: {verdict})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
