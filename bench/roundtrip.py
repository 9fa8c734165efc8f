"""The client's CPU for one statement, below any of pdoflowd's code:
``python -m bench.roundtrip [N]``.

Starts a throwaway PostgreSQL and sends N (default 5,000) one-row
statements each way, timing the client process's CPU
(``time.process_time``): libpq's own ``PQexecParams`` through psycopg's
thin ``pgconn`` (the floor any Python client pays: the kernel's send,
wait and receive and libpq's protocol), then psycopg's ``execute`` of a
trivial statement and of one with seven parameters of the claim's types.
On a machine where a system call is dear, this floor bounds the CPU per
job a daemon that claims in batches of B can reach: a B-th of it per job
whatever the daemon does, and more for what it does.
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from devtools import devcluster

_WARM_UP = 200


def _cpu_us(action: Callable[[], Any], times: int) -> tuple[float, float]:
    """CPU and wall time per call of ``action``, in microseconds."""
    for _ in range(_WARM_UP):
        action()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(times):
        action()
    return (
        (time.process_time() - cpu) / times * 1e6,
        (time.perf_counter() - wall) / times * 1e6,
    )


def main(argv: list[str]) -> int:
    times = int(argv[0]) if argv else 5000
    work = Path(tempfile.mkdtemp(prefix="pdoflowd-roundtrip-"))
    with devcluster.LocalCluster(work / "pg") as cluster:
        dsn = cluster.create_database("roundtrip")
        with psycopg.connect(dsn, autocommit=True) as conn:
            cursor = conn.cursor(binary=True)
            params = {
                "finishing": uuid.uuid4(),
                "outcomes": "[]",
                "owner": uuid.uuid4(),
                "limit": 10,
                "provides": [],
                "posters": [],
            }
            steps: list[tuple[str, Callable[[], Any]]] = [
                (
                    "libpq PQexecParams, one int",
                    lambda: conn.pgconn.exec_params(
                        b"SELECT $1::int", [b"1"], result_format=1
                    ),
                ),
                (
                    "psycopg execute + fetchall, SELECT 1",
                    lambda: cursor.execute("SELECT 1").fetchall(),
                ),
                (
                    "psycopg, the claim's parameter types",
                    lambda: cursor.execute(
                        "SELECT %(finishing)s::uuid, %(outcomes)s::json,"
                        " %(owner)s::uuid, %(limit)s::int,"
                        " %(provides)s::text[], %(posters)s::text[]",
                        params,
                    ).fetchall(),
                ),
            ]
            print(f"{times:,} statements each, client process only:")
            for label, action in steps:
                cpu, wall = _cpu_us(action, times)
                print(f"  {label:<40} {cpu:7.1f} us CPU {wall:7.1f} us wall")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
