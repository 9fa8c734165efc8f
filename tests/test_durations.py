"""Durations as the command line takes them: ``<number><s|m|h|d>``."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import REPO_ROOT, write_config
from pdoflowd.durations import (
    DURATION_UNITS,
    MAX_DURATION_S,
    DurationError,
    duration_text,
    parse_duration,
)
from pdoflowd.exitcodes import EXIT_CONFIG


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0s", 0),
        ("45s", 45),
        ("90m", 5400),
        ("12h", 43200),
        ("30d", 2592000),
        ("1.5h", 5400),
        (".5s", 0.5),
        ("36500d", MAX_DURATION_S),
    ],
)
def test_a_duration_is_a_number_and_a_unit(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        "30",
        "d",
        "-1d",
        "+1d",
        "1 d",
        " 1d",
        "1D",
        "1w",
        "1e3s",
        "infs",
        "nans",
        "1.d",
        "1h30m",
        "36501d",
        "0x1s",
    ],
)
def test_anything_else_is_refused_with_the_spelling_expected(text: str) -> None:
    with pytest.raises(DurationError, match=r"30d|at most"):
        parse_duration(text)


def test_bare_seconds_are_the_older_spelling_where_asked_for() -> None:
    assert parse_duration("2.5", bare_seconds=True) == 2.5
    assert parse_duration("1e3", bare_seconds=True) == 1000
    assert parse_duration("2m", bare_seconds=True) == 120
    for text in ("-1", "nan", "inf", "soon"):
        with pytest.raises(DurationError, match=r"number of seconds|at most"):
            parse_duration(text, bare_seconds=True)


@given(
    number=st.integers(min_value=0, max_value=36500),
    unit=st.sampled_from(sorted(DURATION_UNITS)),
)
def test_whole_durations_read_back_as_written_in_seconds(
    number: int, unit: str
) -> None:
    seconds = parse_duration(f"{number}{unit}")

    assert seconds == number * DURATION_UNITS[unit]
    assert parse_duration(duration_text(seconds)) == seconds


@given(st.text(max_size=12))
def test_any_text_is_a_duration_in_range_or_refused(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except DurationError as exc:
        assert repr(text) in str(exc)
    else:
        assert math.isfinite(seconds) and 0 <= seconds <= MAX_DURATION_S
        assert text[-1] in DURATION_UNITS


@given(st.floats(min_value=0, max_value=MAX_DURATION_S))
def test_duration_text_writes_every_duration_readably(seconds: float) -> None:
    text = duration_text(seconds)

    assert abs(parse_duration(text) - seconds) <= 1e-6


def test_a_bad_retention_key_stops_check_config_with_78(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "bad.toml",
        {"retention": {"enabled": True, "batch": 0, "interval_s": -1}},
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdoflowd",
            "check-config",
            "--config",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )

    assert result.returncode == EXIT_CONFIG
    assert result.stderr.startswith("retention.batch: ")
    assert "retention.interval_s: " in result.stderr
