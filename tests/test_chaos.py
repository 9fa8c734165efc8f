"""Chaos: kills of workers, of the daemon and of PostgreSQL lose nothing.

A few thousand short jobs each write one row per run to a side-effect
table. While they drain, workers are SIGKILLed at random, the daemon is
killed once and started again, stopped fast (SIGINT, its workers killed
in the middle of their claims) and started again, and PostgreSQL is
restarted once. At the end every job is done, none is lost or stuck (every
claim had a live owner or was taken back), and the runs beyond one per job
stay within the bound docs/operations.md states: a dead worker re-runs at
most its running job, plus the jobs it finished within one outcome-flush
window (never more than one claim batch, as a batch's end flushes too).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from harness import Daemon, create_effects_table, daemon_config
from pdoflowd.client import Client

JOBS = 2000
BATCH = 10


def progress(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pdoflowd.jobs WHERE status = 'done'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def kill_a_worker(daemon: Daemon, rng: random.Random) -> bool:
    workers = daemon.workers()
    if not workers:
        return False
    try:
        os.kill(rng.choice(workers), signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("flush_ms", [0, 20], ids=["flush-0", "flush-20ms"])
def test_chaos_loses_nothing_and_bounds_duplicate_runs(
    dsn: str, pg_server: Any, tmp_path: Path, flush_ms: int
) -> None:
    if not pg_server.can_restart:
        pytest.skip("this PostgreSQL cannot be restarted from the tests")
    create_effects_table(dsn)
    config = daemon_config(
        dsn,
        workers={
            "count": 3,
            "batch_size": BATCH,
            "outcome_flush_ms": flush_ms,
        },
        daemon={
            "heartbeat_interval_s": 0.2,
            "host_lease_s": 1.5,
            "maintenance_interval_s": 0.1,
            "crash_loop_max": 1000,
            "respawn_delay_s": 0.05,
            "respawn_delay_max_s": 0.2,
        },
    )
    rng = random.Random(flush_ms)
    daemon = Daemon(tmp_path, config, effects_dsn=dsn, name="first")
    daemons = [daemon]
    deaths = 0
    try:
        daemon.start().wait_ready()
        client = Client(dsn)
        posting = client.post(
            "jobfns.chaos", [[f"c{i}"] for i in range(JOBS)], tries=50
        )
        killed_daemon = stopped_fast = restarted_db = False
        deadline = time.monotonic() + 240
        while progress(dsn) < JOBS:
            assert time.monotonic() < deadline, "chaos run did not finish"
            time.sleep(rng.uniform(0.05, 0.25))
            done = progress(dsn)
            if not killed_daemon and done > JOBS * 0.3:
                # The daemon killed outright: each worker counts as dead.
                deaths += len(daemon.workers())
                os.kill(daemon.pid, signal.SIGKILL)
                daemon.wait(10)
                killed_daemon = True
                daemon = Daemon(tmp_path, config, effects_dsn=dsn, name="2nd")
                daemons.append(daemon)
                daemon.start().wait_ready()
            elif not stopped_fast and done > JOBS * 0.45:
                # A fast stop kills every worker, claims in flight or not.
                deaths += len(daemon.workers())
                assert daemon.stop(signal.SIGINT) == 0
                stopped_fast = True
                daemon = Daemon(tmp_path, config, effects_dsn=dsn, name="3rd")
                daemons.append(daemon)
                daemon.start().wait_ready()
            elif not restarted_db and done > JOBS * 0.6:
                pg_server.restart()
                restarted_db = True
            elif done < JOBS * 0.9 and kill_a_worker(daemon, rng):
                deaths += 1
        state = client.wait(posting.id, timeout=60, poll_interval=0.1)
        assert killed_daemon and stopped_fast and restarted_db
        assert state.jobs["done"] == JOBS, state
        with psycopg.connect(dsn) as conn:
            held = conn.execute(
                "SELECT count(*) FROM pdoflowd.jobs WHERE owner IS NOT NULL"
                " AND status <> 'done'"
            ).fetchone()
        assert held == (0,), "a claim outlived its owner"
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT count(*), count(DISTINCT key) FROM effects"
            ).fetchone()
        assert row is not None
        total_runs, distinct = row
        assert distinct == JOBS
        duplicates = total_runs - JOBS
        bound = deaths if flush_ms == 0 else deaths * BATCH
        print(
            f"flush {flush_ms} ms: {deaths} worker deaths, "
            f"{duplicates} duplicate runs, bound {bound}"
        )
        assert deaths > 5
        assert duplicates <= bound
    finally:
        for each in daemons:
            each.close()
