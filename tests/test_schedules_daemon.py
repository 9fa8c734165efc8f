"""Schedules on real daemons: exactly once across daemons, backfill
after downtime, reload, and their metrics."""

from __future__ import annotations

import datetime as dt
import signal
import time
from typing import Any

import psycopg

from harness import wait_until


def runs(dsn: str, schedule: str) -> list[tuple[dt.datetime, Any]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT run_at, posting_id FROM pdoflowd.schedule_runs"
            " WHERE schedule = %s ORDER BY run_at",
            (schedule,),
        ).fetchall()


def every(name: str, seconds: int, **more: Any) -> dict[str, Any]:
    return {
        "name": name,
        "entry_point": "jobfns.noop",
        "every_s": seconds,
        **more,
    }


def test_two_daemons_post_each_fire_time_once(
    effects_dsn: str, daemons: Any
) -> None:
    schedule = [every("tick", 1)]
    first = daemons(schedules=schedule)
    second = daemons(schedules=schedule)
    time.sleep(12)
    first.stop(signal.SIGTERM)
    second.stop(signal.SIGTERM)
    found = runs(effects_dsn, "tick")
    times = [run_at for run_at, _ in found]
    assert len(times) >= 10
    steps = {b - a for a, b in zip(times, times[1:])}
    assert steps == {dt.timedelta(seconds=1)}, times
    with psycopg.connect(effects_dsn) as conn:
        postings = conn.execute(
            "SELECT count(*), count(DISTINCT idempotency_key)"
            " FROM pdoflowd.postings"
        ).fetchone()
        posters = conn.execute(
            "SELECT count(DISTINCT daemon_id) FROM pdoflowd.schedule_runs"
        ).fetchone()
    assert postings == (len(times), len(times))
    print(posters)
