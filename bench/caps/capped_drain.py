"""A capped drain through the claim alone: ``python -m bench.caps.capped_drain
VARIANT [N] [T] [B] [CAP] [ROUNDS]``.

Starts a throwaway PostgreSQL and drains one posting of N no-op jobs
(default 3,000) with ``max_running`` CAP and ``uses=["tape"]`` (limit CAP,
default 8) through T connections (default 4) in threads, each claiming up
to B jobs (default 4) and writing the outcomes of its last batch in the
same call, as workers do, with no daemon and no job run. VARIANT
``advisory`` is the claim as built; ``counts`` is the counts-table variant
(:mod:`bench.caps.counts_variant`). Prints each round's drain time after a
warm-up round, and the median's jobs per second.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg

from bench.caps import counts_variant
from devtools import devcluster
from pdoflowd.client import Client
from pdoflowd.db import migrate, queue
from pdoflowd.status import OutcomeKind

_COUNTING = threading.Lock()


def _worker(dsn: str, batch: int, cap: int, left: list[int]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        finishing: uuid.UUID | None = None
        outcomes: list[queue.Outcome] = []
        while left[0] > 0 or outcomes:
            owner = uuid.uuid4()
            claimed = queue.record_and_claim(
                conn,
                finishing=finishing,
                outcomes=outcomes,
                owner=owner,
                daemon_id=None,
                limit=batch,
                resource_limits={"tape": cap},
            )
            with _COUNTING:
                left[0] -= len(claimed.jobs)
            now = time.time()
            finishing = owner
            outcomes = [
                queue.Outcome(j.id, j.attempt, OutcomeKind.DONE, now, now)
                for j in claimed.jobs
            ]


def main(argv: list[str]) -> int:
    variant = argv[0]
    jobs = int(argv[1]) if len(argv) > 1 else 3000
    threads = int(argv[2]) if len(argv) > 2 else 4
    batch = int(argv[3]) if len(argv) > 3 else 4
    cap = int(argv[4]) if len(argv) > 4 else 8
    rounds = int(argv[5]) if len(argv) > 5 else 3
    work = Path(tempfile.mkdtemp(prefix="pdoflowd-capped-drain-"))
    with devcluster.LocalCluster(work / "pg") as cluster:
        dsn = cluster.create_database("drain")
        migrate.upgrade(dsn)
        if variant == "counts":
            counts_variant.apply(dsn)
        client = Client(dsn)
        times = []
        for round_ in range(rounds + 1):
            client.post(
                "bench.jobs.noop",
                [[i] for i in range(jobs)],
                max_running=cap,
                uses=["tape"],
            )
            left = [jobs]
            workers = [
                threading.Thread(target=_worker, args=(dsn, batch, cap, left))
                for _ in range(threads)
            ]
            began = time.perf_counter()
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            if round_:
                times.append(time.perf_counter() - began)
            with psycopg.connect(dsn) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pdoflowd.jobs WHERE status <> 'done'"
                ).fetchone()
            assert row == (0,), row
    median = sorted(times)[len(times) // 2]
    print(
        f"{variant}: N={jobs} T={threads} B={batch} cap={cap}, drain s:"
        f" {' '.join(f'{t:.2f}' for t in times)}, median {median:.2f} s"
        f" = {jobs / median:,.0f} jobs/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
