"""Pickup latency alone: ``python -m bench.pickup [N]``.

Starts a throwaway PostgreSQL and ``pdoflowd run`` (W=4, batch 100), then
posts N single-job postings (default 30), one at a time, 50-70 ms apart,
each committed on its own connection, and prints the latency of each: the
job's ``work_started_at`` minus the moment the commit returned (the lower
bound the full benchmark also reports). It does so on the fresh daemon,
right after a drain of 5,000 jobs, and 5 s later. A probe to look at one
figure without the rest of ``python -m bench`` around it.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from bench import database
from bench.daemon import Daemon, DaemonSettings
from devtools import devcluster
from pdoflowd.client import Client
from pdoflowd.db import migrate

_STARTED = (
    "SELECT extract(epoch FROM j.work_started_at)::float8"
    " FROM pdoflowd.jobs AS j JOIN pdoflowd.postings AS p"
    " ON p.id = j.posting_id WHERE p.uuid = %s AND j.status = 'done'"
)


def latencies_ms(dsn: str, count: int) -> list[float]:
    """Post ``count`` single jobs one at a time; each one's pickup in ms."""
    client = Client(dsn)
    rng = random.Random(1)
    found = []
    with (
        database.connect(dsn, autocommit=False) as poster,
        database.connect(dsn) as conn,
    ):
        for index in range(count):
            posting = client.post(database.NOOP, [[index]], conn=poster)
            poster.commit()
            returned = time.time()
            while (
                row := conn.execute(_STARTED, (posting.id,)).fetchone()
            ) is None:
                time.sleep(0.005)
            found.append((row[0] - returned) * 1000)
            time.sleep(0.05 + 0.02 * rng.random())
    return sorted(found)


def show(label: str, samples: list[float]) -> None:
    print(
        f"{label}: p50 {samples[len(samples) // 2]:.2f} ms,"
        f" max {samples[-1]:.2f} ms;"
        f" each: {' '.join(f'{s:.1f}' for s in samples)}"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pickup",
        description="Pickup latency of single-job postings, alone.",
    )
    parser.add_argument(
        "count", nargs="?", type=int, default=30, help="postings per phase"
    )
    count = parser.parse_args(argv).count
    work = Path(tempfile.mkdtemp(prefix="pdoflowd-pickup-"))
    with devcluster.LocalCluster(work / "pg") as cluster:
        dsn = cluster.create_database("pickup")
        migrate.upgrade(dsn)
        with Daemon(work / "daemon", dsn, DaemonSettings(4, 100, None)):
            show("fresh daemon", latencies_ms(dsn, count))
            client = Client(dsn)
            drain = client.post(database.NOOP, [[i] for i in range(5000)])
            client.wait(drain.id, timeout=120, poll_interval=0.01)
            show("right after a drain of 5,000", latencies_ms(dsn, count))
            time.sleep(5)
            show("5 s later", latencies_ms(dsn, count))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
