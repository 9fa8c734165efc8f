"""Job functions for the tests of job features (module ``featurejobs``).

They use the job context (``current_job``), shared variables, progress and
stored results; the daemon under test imports them, and
``pdoflow execute-job`` runs them in the test's own process.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from typing import Any

from pdoflowd import current_job
from pdoflowd.client import job


@job(store_result=True)
def describe(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Return what the job got and who it is, as a stored result."""
    context = current_job()
    return {
        "args": list(args),
        "kwargs": kwargs,
        "job_id": str(context.job_id),
        "posting_id": str(context.posting_id),
        "attempt": context.attempt,
        "pid": os.getpid(),
    }


@job()
def count_up(times: int = 1) -> int:
    """Add one to the posting's shared counter ``times`` times."""
    shared = current_job().shared
    value = 0
    for _ in range(times):
        value = shared.update("counter", lambda n: n + 1, default=0)
    return value


@job()
def report_progress(steps: int) -> str:
    """Report progress at each step; return the last note."""
    context = current_job()
    note = ""
    for step in range(1, steps + 1):
        note = f"step {step} of {steps}"
        context.progress(step / steps, note)
    return note


@job()
def wait_for_flag(name: str, seconds: float = 30.0) -> None:
    """Report progress, then wait until the shared flag ``name`` is set."""
    context = current_job()
    context.progress(0.5, "waiting for the flag")
    deadline = time.monotonic() + seconds
    while not context.shared.get(name) and time.monotonic() < deadline:
        time.sleep(0.05)


@job()
def non_finite() -> list[float]:
    return [math.nan, math.inf, -math.inf, 1.5]


@job()
def big_result(size: int) -> str:
    return "x" * size


@job()
def unstorable_result() -> Any:
    return {1, 2}


@job()
def busy(n: int) -> int:
    """A little CPU work for the profiler to see."""
    return sum(_square(i) for i in range(n))


def _square(i: int) -> int:
    return i * i


@job()
def fail_until_flag(name: str) -> None:
    """Fail until the shared flag ``name`` is set."""
    if not current_job().shared.get(name):
        raise RuntimeError(f"flag {name} not set")


@job()
def query_past_timeout(seconds: float = 30.0) -> None:
    """Sleep inside a statement on the job's own connection."""
    current_job().connection().execute("SELECT pg_sleep(%s)", (seconds,))


@job()
def nap(seconds: float) -> None:
    time.sleep(seconds)


@job()
def nap_deaf(seconds: float) -> None:
    """Sleep deaf to the signals that end a job at its timeout, as code
    stuck in a C call is."""
    deaf = {signal.SIGTERM, signal.SIGALRM}
    signal.pthread_sigmask(signal.SIG_BLOCK, deaf)
    try:
        time.sleep(seconds)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, deaf)


@job(store_result=True)
async def describe_async(delay_s: float = 0.0) -> dict[str, Any]:
    """An async job: awaits, then says who it is, as a stored result."""
    await asyncio.sleep(delay_s)
    context = current_job()
    return {
        "job_id": str(context.job_id),
        "attempt": context.attempt,
        "pid": os.getpid(),
        "loop": id(asyncio.get_running_loop()),
    }


@job()
async def sleep_async(seconds: float, name: str) -> None:
    """An async job that awaits longer than its timeout; writes the effect
    ``name`` when it is cancelled."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _record(name, "cancelled")
        raise


@job()
async def stubborn_async(seconds: float) -> None:
    """Swallows the first cancel and awaits on: a timeout must still end
    it (the worker is killed after the grace) and the worker carry on."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        await asyncio.sleep(seconds)


@job(store_result=True)
async def leave_a_task_behind(name: str, after_s: float) -> int:
    """Starts a task that would write the effect ``name`` after ``after_s``
    seconds, and returns its process id at once: the task must not outlive
    the job."""

    async def later() -> None:
        await asyncio.sleep(after_s)
        _record(name, "a task that outlived its job")

    asyncio.get_running_loop().create_task(later())
    return os.getpid()


@job()
async def fail_async(message: str) -> None:
    await asyncio.sleep(0)
    raise ValueError(message)


@job()
def print_lines(count: int, stderr_line: str = "") -> None:
    """Print ``count`` numbered lines to stdout (and one to stderr)."""
    for number in range(count):
        print(f"line {number:07d} " + "x" * 50)
    if stderr_line:
        print(stderr_line, file=sys.stderr)


@job()
def print_attempt_then_fail_once(text: str) -> None:
    """Print the attempt's number and ``text`` without a line end; fail
    on the first attempt."""
    attempt = current_job().attempt
    print(f"attempt {attempt}")
    sys.stdout.write(text)
    if attempt == 1:
        raise RuntimeError("first attempt fails")


@job()
def child_prints(text: str) -> None:
    """A child process writes to the inherited stdout."""
    subprocess.run(["echo", text], check=True)


def _record(key: str, note: str) -> None:
    """jobfns.record, imported only when a job writes an effect: importing
    jobfns here would make its names known to every process that imports
    this module (pdoflow execute-job's tests run in pytest's own)."""
    import jobfns

    jobfns.record(key, note)
