"""Pure policies: retries, claim sizing, respawn, crash loops, exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from pdoflowd import policy
from pdoflowd.status import PostingStatus


def test_retry_delay_is_zero_without_a_base() -> None:
    assert policy.retry_delay(5, 0.0, 300.0) == 0.0


def test_retry_delay_doubles_per_attempt() -> None:
    assert [policy.retry_delay(a, 1.0, 300.0) for a in (1, 2, 3, 4)] == [
        1.0,
        2.0,
        4.0,
        8.0,
    ]


@given(st.integers(1, 10_000), st.floats(0.001, 100), st.floats(0, 1e6))
def test_retry_delay_never_exceeds_its_cap(
    attempt: int, base: float, cap: float
) -> None:
    assert 0 <= policy.retry_delay(attempt, base, cap) <= max(cap, 0)


def test_backoff_waits_nothing_before_a_failure() -> None:
    assert policy.backoff_delay(0, 0.5, 10.0) == 0.0


def test_backoff_doubles_from_its_first_wait_up_to_its_cap() -> None:
    waits = [policy.backoff_delay(n, 0.5, 10.0) for n in range(1, 8)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_respawn_waits_by_the_same_backoff_spread_by_jitter() -> None:
    for crashes in range(2, 12):
        full = policy.backoff_delay(crashes - 1, 1.0, 60.0)
        assert policy.respawn_delay(crashes, 1.0, 60.0, 0.0) == full / 2
        assert policy.respawn_delay(crashes, 1.0, 60.0, 1.0) == full


def test_claim_size_starts_with_one_job() -> None:
    assert policy.claim_size(50, None) == 1


def test_claim_size_holds_about_a_second_of_work() -> None:
    assert policy.claim_size(50, 0.1) == 10
    assert policy.claim_size(50, 5.0) == 1
    assert policy.claim_size(50, 0.0001) == 50


@given(st.integers(1, 10_000), st.one_of(st.none(), st.floats(0, 1e4)))
def test_claim_size_stays_within_one_and_the_batch_size(
    batch: int, mean: float | None
) -> None:
    assert 1 <= policy.claim_size(batch, mean) <= batch


def test_mean_update_moves_towards_the_sample() -> None:
    assert policy.mean_update(None, 2.0, 0.2) == 2.0
    assert policy.mean_update(1.0, 2.0, 0.5) == 1.5


def test_first_crash_is_refilled_at_once() -> None:
    assert policy.respawn_delay(1, 0.5, 30.0, 0.9) == 0.0


@given(st.integers(2, 1000), st.floats(0, 0.999))
def test_respawn_delay_grows_but_stays_capped(
    crashes: int, jitter: float
) -> None:
    delay = policy.respawn_delay(crashes, 0.5, 30.0, jitter)
    assert 0.25 <= delay <= 30.0
    assert delay <= policy.respawn_delay(crashes + 1, 0.5, 30.0, 0.999)


def test_crash_loop_counts_only_the_window() -> None:
    assert policy.is_crash_loop([1, 2, 3], now=4, limit=3, window_s=10)
    assert not policy.is_crash_loop([1, 2, 3], now=12, limit=3, window_s=10)


def test_poll_timeout_is_spread_around_the_interval() -> None:
    assert policy.poll_timeout(1.0, 0.0) == 0.5
    assert policy.poll_timeout(1.0, 0.999) < 1.5


def _status_of(code: str) -> int:
    proc = subprocess.run([sys.executable, "-c", code], check=False)
    # Rebuild the raw wait status the supervisor sees.
    if proc.returncode < 0:
        return -proc.returncode
    return proc.returncode << 8


def test_describe_exit_names_the_signal() -> None:
    status = _status_of(f"import os; os.kill(os.getpid(), {signal.SIGKILL})")
    assert os.WIFSIGNALED(status)
    assert policy.describe_exit(status) == "worker died: signal 9 (SIGKILL)"


def test_describe_exit_names_the_exit_code() -> None:
    status = _status_of("import os; os._exit(7)")
    assert policy.describe_exit(status) == "worker died: exit code 7"


# Retention.


def test_retention_ages_give_errored_and_cancelled_postings_the_second() -> (
    None
):
    assert policy.retention_ages(10.0, 20.0) == {
        PostingStatus.FINISHED: 10.0,
        PostingStatus.ERRORED_OUT: 20.0,
        PostingStatus.CANCELLED: 20.0,
    }


def test_an_age_of_zero_keeps_that_kind_of_posting() -> None:
    assert policy.retention_ages(0.0, 5.0) == {
        PostingStatus.ERRORED_OUT: 5.0,
        PostingStatus.CANCELLED: 5.0,
    }
    assert policy.retention_ages(5.0, 0.0) == {PostingStatus.FINISHED: 5.0}


@given(
    chunks=st.integers(min_value=0, max_value=100),
    elapsed=st.floats(min_value=0, max_value=1e6),
    heartbeat=st.floats(min_value=0.001, max_value=3600),
)
def test_a_pruning_pass_is_bounded_and_always_makes_progress(
    chunks: int, elapsed: float, heartbeat: float
) -> None:
    goes_on = policy.prune_goes_on(chunks, elapsed, heartbeat)

    if chunks == 0:
        assert goes_on
    if chunks >= policy.PRUNE_CHUNKS_PER_PASS or elapsed >= heartbeat / 4:
        assert goes_on == (chunks == 0)


@given(
    more=st.booleans(),
    took=st.floats(min_value=0, max_value=1e5),
    interval=st.floats(min_value=0.001, max_value=86400),
)
def test_the_next_pass_comes_no_later_than_the_interval(
    more: bool, took: float, interval: float
) -> None:
    delay = policy.next_prune_in(more, took, interval)

    assert 0 <= delay <= interval
    assert delay == (min(took, interval) if more else interval)


@given(
    statement=st.floats(min_value=0.001, max_value=3600),
    heartbeat=st.floats(min_value=0.001, max_value=3600),
)
def test_a_pruning_chunk_never_holds_the_heartbeat_back_by_an_interval(
    statement: float, heartbeat: float
) -> None:
    timeout = policy.prune_statement_timeout(statement, heartbeat)

    assert timeout <= statement
    assert 3 * timeout <= heartbeat * (1 + 1e-9)
