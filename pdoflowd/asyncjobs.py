"""Running ``async def`` jobs: the event loop of a worker process.

Owns :func:`is_async` and :func:`run`, which runs one call of a coroutine
function to its end on the process's event loop. One loop serves every
async job of the process, made at the first and again after one was closed
or given up: a fresh loop per job (``asyncio.run``) cost about ten times as
much CPU per job (docs/client.md). What one job leaves behind does not
reach the next: when the call ends, however it ends, the tasks still on the
loop are cancelled and awaited; tasks that will not end within
:data:`CLEANUP_S` cost the process its loop, not the next job its start.

A timeout (the worker's SIGTERM raising inside the job) raises out of the
loop as it does out of a plain function, after the cleanup. This module
must not know of claims, outcomes or the job context.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["CLEANUP_S", "is_async", "run"]

log = logging.getLogger("pdoflowd.jobs")

# How long the tasks a job left behind get to end once cancelled.
CLEANUP_S = 1.0

_loop: asyncio.AbstractEventLoop | None = None
# Whether each function met so far is async (functions a worker resolves
# are kept for its life anyway).
_ASYNC: dict[Callable[..., Any], bool] = {}


def is_async(function: Callable[..., Any]) -> bool:
    """Whether ``function`` is an ``async def`` function (its call makes a
    coroutine to run, not the job's result); asked once per function, since
    a worker asks it for every job."""
    try:
        known = _ASYNC.get(function)
    except TypeError:  # an unhashable callable: asked every time
        return inspect.iscoroutinefunction(function)
    if known is None:
        known = _ASYNC[function] = inspect.iscoroutinefunction(function)
    return known


def run(
    function: Callable[..., Coroutine[Any, Any, Any]],
    posargs: list[Any],
    kwargs: dict[str, Any],
) -> Any:
    """Call ``function`` and run the coroutine it makes to its end; return
    its value or raise what it raised."""
    loop = _event_loop()
    try:
        return loop.run_until_complete(function(*posargs, **kwargs))
    finally:
        _end_leftover_tasks(loop)


def _event_loop() -> asyncio.AbstractEventLoop:
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_loop)
    return _loop


def _end_leftover_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what the job left on the loop and wait, a while, for it."""
    global _loop
    if loop.is_closed():
        return
    leftover = [task for task in asyncio.all_tasks(loop) if not task.done()]
    if not leftover:
        return
    for task in leftover:
        task.cancel()
    try:
        done, pending = loop.run_until_complete(
            asyncio.wait(leftover, timeout=CLEANUP_S)
        )
    except RuntimeError:
        # The job closed or stopped the loop from inside: start afresh.
        done = {task for task in leftover if task.done()}
        pending = set(leftover) - done
    for task in done:
        if not task.cancelled():
            # Read, so that asyncio does not log it as never retrieved:
            # the job's own outcome is what counts.
            task.exception()
    if pending:
        log.warning(
            "%d task(s) of an async job did not end when cancelled: this"
            " process's event loop is given up for a new one",
            len(pending),
        )
        _loop = None
