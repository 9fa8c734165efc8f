"""The procrastinate app of the benchmark: what its own worker command loads.

Run under the peers' virtual environment as ``python -m procrastinate
--app=procrastinate_worker.app worker --concurrency C`` from this
directory: procrastinate's own command line, its psycopg connector (a
psycopg_pool pool with its default size, through the libpq environment
variables) and the one task ``noop``. The task is a coroutine, so the
worker awaits it in its event loop; a plain function would run in a
thread. Imports nothing from pdoflowd or bench.
"""

from __future__ import annotations

from procrastinate import App, PsycopgConnector

app = App(connector=PsycopgConnector())


@app.task(name="noop")
async def noop() -> None:
    """Do nothing: what is measured is the queue's own cost per job."""
