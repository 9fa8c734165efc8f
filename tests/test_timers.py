"""Every: when a periodic chore of the supervisor's loop is due."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdoflowd.daemon.timers import Every


def test_a_chore_is_due_at_once_by_default() -> None:
    assert Every(5.0).due(0.0)


def test_a_chore_is_not_due_again_within_its_interval() -> None:
    timer = Every(5.0)
    assert timer.due(100.0)
    assert not timer.due(100.0)
    assert not timer.due(104.999)


def test_a_chore_is_due_again_one_interval_later() -> None:
    timer = Every(5.0)
    assert timer.due(100.0)
    assert timer.due(105.0)
    assert timer.next_at == 110.0


def test_a_chore_may_first_be_due_later() -> None:
    timer = Every(1.0, first_at=50.0)
    assert not timer.due(49.9)
    assert timer.due(50.0)


def test_a_late_loop_runs_the_chore_once_not_a_burst() -> None:
    timer = Every(1.0)
    assert timer.due(0.0)
    assert timer.due(10.5)
    assert not timer.due(10.6)
    assert not timer.due(11.4)
    assert timer.due(11.5)


def test_a_question_that_is_not_answered_yes_moves_nothing() -> None:
    timer = Every(2.0)
    assert timer.due(10.0)
    for now in (10.5, 11.0, 11.9):
        assert not timer.due(now)
    assert timer.next_at == 12.0


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan")])
def test_an_interval_must_be_positive(interval: float) -> None:
    with pytest.raises(ValueError, match="interval must be positive"):
        Every(interval)


@given(
    st.floats(0.001, 1e4),
    st.lists(st.floats(0, 1e3), min_size=1, max_size=50),
)
def test_due_exactly_when_an_interval_has_passed_since_it_last_was(
    interval: float, steps: list[float]
) -> None:
    timer = Every(interval)
    now, last = 0.0, None
    for step in steps:
        now += step
        expected = last is None or now >= last + interval
        assert timer.due(now) is expected
        if expected:
            last = now


@given(st.floats(0.001, 1e4), st.floats(0, 1e6))
def test_a_chore_asked_at_its_time_is_due(interval: float, now: float) -> None:
    timer = Every(interval, first_at=now)
    assert timer.due(now)
    assert not timer.due(now)
