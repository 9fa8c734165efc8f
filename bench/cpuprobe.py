"""CPU per no-op job alone: ``python -m bench.cpuprobe [N] [--workers W]
[--batch B] [--max-running M] [--uses NAME]``.

Starts a throwaway PostgreSQL and ``pdoflowd run`` (batch B, default 100),
drains a warm-up posting of 2,000 no-op jobs, then one of N (default
40,000), and prints what the drain cost the daemon's processes (the
supervisor, the database session and the workers, from /proc) per job,
the supervisor's own share of it (its process alone: reading reports,
counting metrics, its loop), and the jobs per second. A probe to compare
two checkouts run after run, without the rest of ``python -m bench``
around it: run it alternately in each, several times, since one run on a
shared machine is noisy. ``--max-running`` and ``--uses`` cap the drained
posting (the daemon gets a limit of M for each resource named), so the
claim takes its capped path.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench import cpu, database
from bench.daemon import Daemon, DaemonSettings
from devtools import devcluster
from pdoflowd.client import Client
from pdoflowd.db import migrate

_WARM_UP_JOBS = 2000


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cpuprobe",
        description="CPU per no-op job of the daemon's processes, alone.",
    )
    parser.add_argument("jobs", nargs="?", type=int, default=40_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--max-running", type=int, default=None)
    parser.add_argument("--uses", action="append", default=[])
    args = parser.parse_args(argv)
    caps = {"max_running": args.max_running, "uses": args.uses}
    work = Path(tempfile.mkdtemp(prefix="pdoflowd-cpuprobe-"))
    with devcluster.LocalCluster(work / "pg") as cluster:
        dsn = cluster.create_database("cpuprobe")
        migrate.upgrade(dsn)
        client = Client(dsn)
        limit = args.max_running or 1000
        settings = DaemonSettings(
            args.workers,
            args.batch,
            limits={name: limit for name in args.uses},
        )
        with Daemon(work / "daemon", dsn, settings) as daemon:
            warm = client.post(
                database.NOOP, [[i] for i in range(_WARM_UP_JOBS)]
            )
            client.wait(warm.id, timeout=300, poll_interval=0.05)
            before = cpu.tree_seconds(daemon.pid)
            before_own = cpu.own_seconds(daemon.pid)
            began = time.monotonic()
            drain = client.post(
                database.NOOP, [[i] for i in range(args.jobs)], **caps
            )
            client.wait(drain.id, timeout=900, poll_interval=0.02)
            wall = time.monotonic() - began
            spent = cpu.tree_seconds(daemon.pid) - before
            own = cpu.own_seconds(daemon.pid) - before_own
    capped = (
        f", max_running {args.max_running}" if args.max_running else ""
    ) + (f", uses {','.join(args.uses)}" if args.uses else "")
    print(
        f"{settings.label()}{capped}, {args.jobs:,} no-op jobs:"
        f" {spent * 1e6 / args.jobs:.1f} us of daemon CPU per job"
        f" ({own * 1e6 / args.jobs:.1f} us of it the supervisor's own),"
        f" {args.jobs / wall:,.0f} jobs/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
