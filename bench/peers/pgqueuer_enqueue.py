"""Install PgQueuer's schema and enqueue N no-op jobs, in one process.

``python pgqueuer_enqueue.py N`` under the peers' virtual environment
(never pdoflowd's): connects with asyncpg through the libpq environment
variables (PGHOST, PGPORT, PGUSER, PGDATABASE), installs the schema with
``Queries.install`` (PgQueuer's default durability, every table logged),
enqueues N jobs for the entrypoint ``noop`` with one batch
``Queries.enqueue`` (lists of entrypoints, payloads and priorities), and
prints one JSON object: the jobs and the seconds the enqueue took.
Imports nothing from pdoflowd or bench.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import asyncpg
from pgqueuer import Queries


async def main(count: int) -> dict[str, float]:
    connection = await asyncpg.connect()
    try:
        queries = Queries.from_asyncpg_connection(connection)
        await queries.install()
        started = time.perf_counter()
        ids = await queries.enqueue(
            ["noop"] * count, [None] * count, [0] * count
        )
        seconds = time.perf_counter() - started
    finally:
        await connection.close()
    if len(ids) != count:
        raise RuntimeError(f"enqueued {len(ids)} jobs, not {count}")
    return {"jobs": count, "seconds": seconds}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1])))))
