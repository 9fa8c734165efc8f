"""Pure decisions of the queue: no I/O, no clocks, no database.

Owns how long to wait before a retry, a respawn or a reconnect (one
backoff), how many jobs one claim
takes, when crashes amount to a crash loop, and how a worker's end is worded.
Callers pass in every fact (times, counts, random draws) so that each policy
can be tested on its own.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

from pdoflowd.status import PostingStatus


def backoff_delay(failures: int, first_s: float, max_s: float) -> float:
    """Seconds to wait after ``failures`` failures in a row: the one backoff.

    None before the first failure; then ``first_s``, doubled after each
    further failure, capped at ``max_s``; 0 when ``first_s`` is 0. Job
    retries, slot refills and reconnects to the database all wait by it.
    """
    if first_s <= 0 or failures < 1:
        return 0.0
    exponent = min(failures - 1, 62)
    return float(min(max_s, first_s * (2**exponent)))


def retry_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Seconds before a failed job may run again after ``attempt`` tries.

    Exponential: base, 2*base, 4*base, ..., capped at ``max_s``; 0 when the
    base is 0 (retry at once).
    """
    return backoff_delay(attempt, base_s, max_s)


def claim_size(
    batch_size: int, mean_job_s: float | None, target_s: float = 1.0
) -> int:
    """How many jobs the next claim may take.

    At most ``batch_size``, and no more than about ``target_s`` of expected
    work, so that a worker never hoards jobs an idle neighbour could run.
    With no experience yet (``mean_job_s`` None) claim a single job.
    """
    if mean_job_s is None:
        return 1
    if mean_job_s * batch_size <= target_s:
        return batch_size
    return max(1, int(target_s / mean_job_s))


def mean_update(previous: float | None, sample: float, weight: float) -> float:
    """Exponentially weighted mean of job durations."""
    if previous is None:
        return sample
    return previous + weight * (sample - previous)


def respawn_delay(
    consecutive_crashes: int, base_s: float, max_s: float, jitter: float
) -> float:
    """Seconds before a slot whose worker crashed is refilled.

    ``jitter`` is a draw from [0, 1); it spreads restarts of many slots.
    The first crash of a healthy slot is refilled at once.
    """
    delay = backoff_delay(consecutive_crashes - 1, base_s, max_s)
    return delay * (0.5 + jitter / 2)


def is_crash_loop(
    crash_times: Sequence[float], now: float, limit: int, window_s: float
) -> bool:
    """True when ``limit`` or more crashes fell within the last window."""
    recent = [t for t in crash_times if now - t <= window_s]
    return len(recent) >= limit


def may_rescue(connected_for_s: float, lease_s: float) -> bool:
    """Whether this daemon may declare others lost.

    Only after it has been connected for a whole lease: a daemon that was
    itself cut off has not seen the others' heartbeats, which are stale
    because the database was unreachable, not because their hosts died.
    """
    return connected_for_s >= lease_s


def poll_timeout(interval_s: float, jitter: float) -> float:
    """An idle worker's wait, spread by a draw from [0, 1) over +/-50%."""
    return interval_s * (0.5 + jitter)


def retention_ages(
    finished_after_s: float, errored_after_s: float
) -> dict[PostingStatus, float]:
    """How old each ended posting status may grow before it is pruned, from
    the two configured ages (0 keeps that status): finished postings by
    the first, errored-out and cancelled ones by the second."""
    ages = {}
    if finished_after_s > 0:
        ages[PostingStatus.FINISHED] = finished_after_s
    if errored_after_s > 0:
        ages[PostingStatus.ERRORED_OUT] = errored_after_s
        ages[PostingStatus.CANCELLED] = errored_after_s
    return ages


# Chunks one pruning pass deletes at most.
PRUNE_CHUNKS_PER_PASS = 8


def prune_goes_on(chunks: int, elapsed_s: float, heartbeat_s: float) -> bool:
    """Whether a pruning pass that has deleted ``chunks`` chunks in
    ``elapsed_s`` may start another.

    The first chunk always; then at most :data:`PRUNE_CHUNKS_PER_PASS`,
    and none after a quarter of the heartbeat interval: the heartbeat that
    runs on the same connection never waits behind pruning for long.
    """
    if chunks == 0:
        return True
    return chunks < PRUNE_CHUNKS_PER_PASS and elapsed_s < heartbeat_s / 4


def prune_statement_timeout(
    statement_timeout_s: float, heartbeat_s: float
) -> float:
    """The deadline of each statement of a pruning chunk: the session's
    own, but no more than a third of the heartbeat interval, so a chunk's
    three statements together never hold the heartbeat back by more than
    one interval (the lease is more than two)."""
    return min(statement_timeout_s, heartbeat_s / 3)


def next_prune_in(more_left: bool, pass_s: float, interval_s: float) -> float:
    """Seconds until the next pruning pass: ``interval_s`` when the last
    one left nothing, else as long as it took (pruning a backlog takes at
    most half of the connection's time, and the other chores run between
    two passes), but never later than ``interval_s``."""
    if not more_left:
        return interval_s
    return min(interval_s, max(pass_s, 0.0))


def describe_exit(status: int) -> str:
    """Word a worker's wait status as the reason recorded on its job."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"worker died: signal {number} ({name})"
    if os.WIFEXITED(status):
        return f"worker died: exit code {os.WEXITSTATUS(status)}"
    return f"worker died: wait status {status}"
