"""Job functions the daemon under test imports (module ``jobfns``).

Side effects go to the table ``effects`` of the database named by
``PDOFLOWD_TEST_EFFECTS_DSN``, so tests can count how often each job ran.
"""

from __future__ import annotations

import os
import signal
import time

import psycopg

from pdoflowd import job

_conn: psycopg.Connection[object] | None = None


def _effects() -> psycopg.Connection[object]:
    global _conn
    if _conn is None or _conn.closed:
        _conn = psycopg.connect(
            os.environ["PDOFLOWD_TEST_EFFECTS_DSN"], autocommit=True
        )
    return _conn


@job()
def record(key: str, note: str = "") -> None:
    """Write one row per run: (key, pid, note)."""
    _effects().execute(
        "INSERT INTO effects (key, pid, note) VALUES (%s, %s, %s)",
        (key, os.getpid(), note),
    )


@job()
def noop(*args: object, **kwargs: object) -> None:
    """Do nothing."""


@job()
def fail(message: str = "boom") -> None:
    raise RuntimeError(message)


@job()
def record_then_fail(key: str) -> None:
    record(key)
    raise ValueError(f"failing {key}")


@job()
def fail_times(key: str, times: int) -> None:
    """Fail on the first ``times`` runs of ``key``, then succeed."""
    record(key)
    row = (
        _effects()
        .execute("SELECT count(*) FROM effects WHERE key = %s", (key,))
        .fetchone()
    )
    assert row is not None
    if int(str(row[0])) <= times:
        raise RuntimeError(f"run {row[0]} of {key} fails")


@job()
def sleep(seconds: float, key: str = "") -> None:
    if key:
        record(key, "start")
    time.sleep(seconds)
    if key:
        record(key, "end")


@job()
def spin(seconds: float) -> None:
    """Busy CPU without returning to the interpreter's signal checks long."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@job()
def kill_self_once(key: str) -> None:
    """SIGKILL the worker on the first run of ``key``; succeed afterwards."""
    record(key)
    row = (
        _effects()
        .execute("SELECT count(*) FROM effects WHERE key = %s", (key,))
        .fetchone()
    )
    assert row is not None
    if int(str(row[0])) == 1:
        os.kill(os.getpid(), signal.SIGKILL)


@job()
def exit_hard(code: int) -> None:
    os._exit(code)


@job()
def pid_of_worker(key: str) -> None:
    """Record the worker's pid, then wait long enough to be killed."""
    record(key, "start")
    time.sleep(30)


@job()
def stubborn(seconds: float) -> None:
    """Sleep with SIGTERM blocked, as code stuck in a C call would."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        time.sleep(seconds)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


_hoard: list[bytes] = []


@job()
def hog_memory(megabytes: int, key: str = "") -> None:
    """Keep ``megabytes`` of memory alive in the worker after returning."""
    if key:
        record(key)
    _hoard.append(b"\x01" * (megabytes * 1024 * 1024))


@job()
def chaos(key: str) -> None:
    """A short job with one visible side effect per run."""
    record(key)
    time.sleep(0.002)
