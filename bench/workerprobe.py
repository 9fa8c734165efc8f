"""One worker's Python cost per job, in this process: ``python -m
bench.workerprobe [N] [--batch B] [--profile | --breakdown]``.

Starts a throwaway PostgreSQL, loads N waiting no-op jobs (default
20,000), and runs a real :class:`~pdoflowd.daemon.worker.Worker` on them
in this process, without a supervisor (its reports go to /dev/null), until
the queue is empty. Prints the worker's CPU per job (``time.process_time``,
so the figure holds on a busy machine, unlike the wall clock) and, with
``--profile``, where it went (cProfile on the CPU clock, which itself
slows every call: read the shares, not the totals), or with
``--breakdown``, the CPU of the steps of a batch alone (each step timed on
the CPU clock around its call, which adds about a microsecond a call). A
probe for the worker's hot path alone; ``bench.cpuprobe`` measures the
whole daemon.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import database
from devtools import devcluster
from pdoflowd.config import loading
from pdoflowd.daemon import runner, worker
from pdoflowd.daemon.scoreboard import Scoreboard
from pdoflowd.daemon.worker import Worker, WorkerSpec
from pdoflowd.db import migrate, queue

# The steps of a batch --breakdown times: (owner, attribute, label).
_STEPS: tuple[tuple[Any, str, str], ...] = (
    (worker.Worker, "claim", "claim (writes the last outcomes too)"),
    (queue, "record_and_claim", "  of which the statement"),
    (worker.Worker, "run_job", "run one job"),
    (runner.JobRunner, "run", "  of which JobRunner.run"),
    (worker.Worker, "mark", "  scoreboard marks"),
    (worker.Worker, "send_metrics", "metrics (tally, stash, pipe)"),
    (worker.Worker, "stash_metrics", "  of which the stash"),
    (runner.OutcomeBuffer, "settle", "settle postings"),
)


class _Steps:
    """CPU time and calls of the steps, each timed around its call."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self) -> None:
        for owner, name, label in _STEPS:
            setattr(owner, name, self._timed(getattr(owner, name), label))

    def _timed(
        self, action: Callable[..., Any], label: str
    ) -> Callable[..., Any]:
        @functools.wraps(action)
        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.process_time()
            try:
                return action(*args, **kwargs)
            finally:
                spent = time.process_time() - began
                self.seconds[label] = self.seconds.get(label, 0.0) + spent
                self.calls[label] = self.calls.get(label, 0) + 1

        return timed

    def report(self, jobs: int) -> str:
        lines = [f"  {'step':<40} {'calls':>7} {'us/call':>9} {'us/job':>8}"]
        for _, _, label in _STEPS:
            calls = self.calls.get(label, 0)
            if not calls:
                continue
            spent = self.seconds[label] * 1e6
            lines.append(
                f"  {label:<40} {calls:>7,} {spent / calls:>9.1f}"
                f" {spent / jobs:>8.1f}"
            )
        return "\n".join(lines)


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
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--profile", action="store_true")
    how.add_argument("--breakdown", action="store_true")
    args = parser.parse_args(argv)
    steps = _Steps() if args.breakdown else None
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
        if steps:
            steps.wrap()
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
    if steps:
        print(steps.report(done))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
