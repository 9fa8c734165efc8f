"""The command's text for people: tables, durations, the progress bar and
the rate it shows (pure functions, no database)."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdoflowd.cli.display import (
    RateMeter,
    duration,
    one_line,
    progress_bar,
    table,
    timestamp,
)


def test_table_pads_every_column_but_the_last() -> None:
    assert table(["A", "BB", "C"], [["xxx", "y", "a long cell"]]) == [
        "A    BB  C",
        "xxx  y   a long cell",
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (44.6, "45s"),
        (65, "1m05s"),
        (3599, "59m59s"),
        (7620, "2h07m"),
        (None, "?"),
        (float("inf"), "?"),
        (-1, "?"),
    ],
)
def test_durations_read_as_people_write_them(
    seconds: float | None, text: str
) -> None:
    assert duration(seconds) == text


def test_timestamps_keep_their_offset_to_the_second() -> None:
    moment = dt.datetime(2030, 1, 2, 3, 4, 5, 678, tzinfo=dt.timezone.utc)
    assert timestamp(moment) == "2030-01-02 03:04:05+00:00"
    assert timestamp(None) == "-"


def test_one_line_keeps_the_first_line_cut_short() -> None:
    assert one_line("ValueError: bad\n  more") == "ValueError: bad"
    assert one_line("x" * 100, 10) == "x" * 9 + "…"
    assert one_line(None) == ""


def test_the_progress_bar_shows_count_share_rate_and_time_left() -> None:
    assert progress_bar(25, 100, 5.0, "executing", width=20) == (
        "[#####...............]  25/100   25%  5.0 jobs/s  ETA 15s  executing"
    )


def test_without_a_rate_the_time_left_is_unknown_until_done() -> None:
    assert "ETA ?" in progress_bar(1, 4, None, "executing")
    assert "ETA 0s" in progress_bar(4, 4, None, "finished")
    assert "[" + "." * 30 + "]  0/0" in progress_bar(0, 0, None, "paused")


@given(
    st.integers(0, 10_000),
    st.integers(0, 10_000),
    st.none() | st.floats(0, 1e6),
)
def test_the_bar_always_has_its_width(
    ended: int, extra: int, rate: float | None
) -> None:
    bar = progress_bar(ended, ended + extra, rate, "executing", width=30)
    assert bar.index("]") == 31


def test_the_rate_is_measured_over_the_readings_in_the_window() -> None:
    meter = RateMeter(window_s=10)
    assert meter.rate() is None
    meter.add(0.0, 0)
    assert meter.rate() is None
    meter.add(2.0, 10)
    assert meter.rate() == 5.0
    meter.add(20.0, 10)
    meter.add(22.0, 30)
    assert meter.rate() == 1.0  # from the last reading before the window
    meter.add(40.0, 30)
    assert meter.rate() == 0.0
