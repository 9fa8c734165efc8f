"""Apply procrastinate's schema and defer N no-op jobs, in one process.

``python procrastinate_enqueue.py N`` under the peers' virtual environment
(never pdoflowd's): the app of ``procrastinate_worker`` (psycopg, through
the libpq environment variables), its schema applied with
``schema_manager.apply_schema_async``, N jobs of the task ``noop`` with no
arguments deferred with one ``batch_defer_async``, and one JSON object
printed: the jobs and the seconds the defer took. Imports nothing from
pdoflowd or bench.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from procrastinate_worker import app, noop


async def main(count: int) -> dict[str, float]:
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        arguments: list[dict[str, object]] = [{} for _ in range(count)]
        started = time.perf_counter()
        ids = await noop.batch_defer_async(*arguments)
        seconds = time.perf_counter() - started
    if len(ids) != count:
        raise RuntimeError(f"deferred {len(ids)} jobs, not {count}")
    return {"jobs": count, "seconds": seconds}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1])))))
