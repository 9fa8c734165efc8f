"""Job functions for the systemd and logging tests (module ``systest_jobs``).

Side effects go to the table ``effects`` of the database named by
``SYSTEST_EFFECTS_DSN``: one row per call with the worker's pid and uid, so
a test can tell which process, as which user, ran each job and whether a
job that was running when the daemon stopped got to finish.
"""

from __future__ import annotations

import logging
import os
import time

import psycopg

from pdoflowd import job

log = logging.getLogger("systest_jobs")

CREATE_EFFECTS = (
    "CREATE TABLE IF NOT EXISTS effects (id bigserial PRIMARY KEY,"
    " key text NOT NULL, note text NOT NULL, pid int NOT NULL,"
    " uid int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
)


@job()
def record(key: str, note: str = "") -> None:
    """Write one row: (key, note, pid, uid)."""
    with psycopg.connect(os.environ["SYSTEST_EFFECTS_DSN"]) as conn:
        conn.execute(
            "INSERT INTO effects (key, note, pid, uid) VALUES (%s, %s, %s, %s)",
            (key, note, os.getpid(), os.getuid()),
        )


@job()
def sleep(seconds: float, key: str) -> None:
    """Record the start, sleep, record the end."""
    record(key, "start")
    time.sleep(seconds)
    record(key, "end")


@job()
def log_failure(message: str) -> None:
    """Log an error with its traceback from inside a job, then succeed."""
    try:
        raise RuntimeError(message)
    except RuntimeError:
        log.exception("job caught: %s", message)
