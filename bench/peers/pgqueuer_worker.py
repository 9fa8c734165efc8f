"""One PgQueuer worker process for the benchmark.

``python pgqueuer_worker.py B`` under the peers' virtual environment runs
``pgqueuer.run`` (what PgQueuer's ``pgq run`` command calls) with batch
size B and every other setting at its default, on uvloop (what ``pgq run``
chooses when uvloop is installed, and it comes with PgQueuer). The factory
opens one asyncpg connection through the libpq environment variables and
builds a ``QueueManager`` (no scheduler: the benchmark has no schedules)
with the one entrypoint ``noop``. PgQueuer takes only coroutine
entrypoints; every job of a batch runs as an asyncio task of this process,
with no limit of its own (``max_concurrent_tasks`` unset, the default).
SIGTERM stops it. Imports nothing from pdoflowd or bench.

``pgq run`` itself is not used: in 1.6.0 it stops at start-up with an
AttributeError while setting up its logging (its ``--log-level`` reaches
``setup_fancy_logger`` as a str).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pgqueuer
import uvloop
from pgqueuer import Job, Queries, QueueManager


@asynccontextmanager
async def create() -> AsyncIterator[QueueManager]:
    connection = await asyncpg.connect()
    manager = QueueManager(Queries.from_asyncpg_connection(connection))

    @manager.entrypoint("noop")
    async def noop(job: Job) -> None:
        """Do nothing: what is measured is the queue's own cost per job."""

    try:
        yield manager
    finally:
        await connection.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    uvloop.run(pgqueuer.run(create, batch_size=int(sys.argv[1])))
