"""One worker's Python cost per job, in this process: ``python -m
bench.workerprobe [N] [--batch B] [--profile]``.

Starts a throwaway PostgreSQL, loads N waiting no-op jobs (default
20,000), and runs a real :class:`~pdoflowd.daemon.worker.Worker` on them
in this process, without a supervisor (its reports go to /dev/null), until
the queue is empty. Prints the worker's CPU per job (``time.process_time``,
so the figure holds on a busy machine, unlike the wall clock) and, with
``--profile``, where it went (cProfile on the CPU clock, which itself
slows every call: read the shares, not the totals). A probe for the
worker's hot path alone; ``bench.cpuprobe`` measures the whole daemon.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench import database
from devtools import devcluster
from pdoflowd.config import loading
from pdoflowd.daemon.scoreboard import Scoreboard
from pdoflowd.daemon.worker import Worker, WorkerSpec
from pdoflowd.db import migrate


def _worker(dsn: str, batch: int, report_fd: int, wake_fd: int) -> Worker:
    config = loading.parse(
        {
            "database": {"dsn": dsn},
            "workers": {"count": 1, "batch_size": batch},
            "jobs": {"allowed_modules": ["bench.jobs"]},
        }
    )
    worker = Worker(
        WorkerSpec(
            slot=0,
            daemon_id=uuid.uuid4(),
            config=config,
            password=None,
            scoreboard=Scoreboard(1),
            wake_fd=wake_fd,
            report_fd=report_fd,
            parent_pid=os.getppid(),
            inherited_fds=(),
        )
    )

    def stop_when_idle(seconds: float) -> None:
        # The queue is empty: the probe is over.
        worker.stop_requested = True

    worker.sleep = stop_when_idle  # type: ignore[method-assign]
    return worker


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.workerprobe",
        description="One worker's CPU per no-op job, in this process.",
    )
    parser.add_argument("jobs", nargs="?", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pdoflowd-workerprobe-"))
    with devcluster.LocalCluster(work / "pg") as cluster:
        dsn = cluster.create_database("workerprobe")
        migrate.upgrade(dsn)
        with database.connect(dsn) as conn:
            database.load_waiting(conn, 500, paused=False)
        wake_read, _wake_write = os.pipe()
        report_fd = os.open(os.devnull, os.O_WRONLY)
        # A warm-up: imports, prepared statements, the entry point.
        warm = _worker(dsn, args.batch, report_fd, wake_read)
        warm.boot()
        warm.run()
        with database.connect(dsn) as conn:
            posting_id = database.load_waiting(conn, args.jobs, paused=False)
            database.settle_storage(conn)
        worker = _worker(dsn, args.batch, report_fd, wake_read)
        worker.conn = warm.conn
        profile = cProfile.Profile(time.process_time) if args.profile else None
        began_cpu, began = time.process_time(), time.monotonic()
        if profile:
            profile.enable()
        worker.run()
        if profile:
            profile.disable()
        cpu_s = time.process_time() - began_cpu
        wall_s = time.monotonic() - began
        worker.close()
        with database.connect(dsn) as conn:
            counts = database.job_counts(conn, posting_id)
    done = counts.get("done", 0)
    print(
        f"batch {args.batch}, {done:,} no-op jobs: {cpu_s * 1e6 / done:.1f} us"
        f" of the worker's CPU per job, {done / wall_s:,.0f} jobs/s"
    )
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
