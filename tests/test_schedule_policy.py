"""Schedules without a database: fire times, which of them are due, keys."""

from __future__ import annotations

import datetime as dt
import itertools
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdoflowd import schedules
from pdoflowd.schedules import FireTimes, due_runs

UTC = dt.timezone.utc
PARIS = ZoneInfo("Europe/Paris")
SECOND = dt.timedelta(seconds=1)


def utc(*fields: int) -> dt.datetime:
    return dt.datetime(*fields, tzinfo=UTC)


def take(times: FireTimes, start: dt.datetime, count: int) -> list[str]:
    return [t.isoformat() for t in itertools.islice(times.after(start), count)]


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize(
    ("alias", "fields"),
    [
        ("@hourly", "0 * * * *"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("  @Daily ", "0 0 * * *"),
    ],
)
def test_aliases_are_spelt_out(alias: str, fields: str) -> None:
    assert schedules.cron_expression(alias) == fields


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "expected five fields"),
        ("* * * *", "got 4 fields"),
        ("0 * * * * *", "got 6 fields"),
        ("61 * * * *", "not a valid cron expression"),
        ("a b c d e", "not a valid cron expression"),
        ("0 0 31 2 *", "not a valid cron expression"),
        ("*/0 * * * *", "not a valid cron expression"),
        ("@reboot", "unknown alias '@reboot'"),
    ],
)
def test_bad_cron_expressions_are_refused(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        schedules.cron_expression(text)


def test_time_zones() -> None:
    assert schedules.time_zone("UTC") is UTC
    assert schedules.time_zone("Europe/Paris") == PARIS
    for bad in ("Mars/Olympus", "", "/etc/passwd", "../zoneinfo/UTC"):
        with pytest.raises(ValueError, match="not an IANA time zone"):
            schedules.time_zone(bad)


# ---------------------------------------------------------------- instants


def test_every_s_counts_from_the_epoch() -> None:
    times = FireTimes(every_s=90)
    assert take(times, utc(2024, 1, 1, 0, 0, 1), 3) == [
        "2024-01-01T00:01:30+00:00",
        "2024-01-01T00:03:00+00:00",
        "2024-01-01T00:04:30+00:00",
    ]
    # Strictly after: a fire time itself is not next after itself.
    assert times.next_after(utc(2024, 1, 1, 0, 3)) == utc(2024, 1, 1, 0, 4, 30)
    assert next(times.at_or_before(utc(2024, 1, 1, 0, 3))) == utc(
        2024, 1, 1, 0, 3
    )


def test_cron_in_a_time_zone() -> None:
    times = FireTimes(cron="0 3 * * *", zone=PARIS)
    assert take(times, utc(2024, 1, 1), 2) == [
        "2024-01-01T02:00:00+00:00",
        "2024-01-02T02:00:00+00:00",
    ]
    assert take(times, utc(2024, 7, 1), 1) == ["2024-07-01T01:00:00+00:00"]


def test_a_time_skipped_by_summer_time_fires_after_the_jump() -> None:
    # Paris, 2024-03-31: 02:00 CET is 03:00 CEST (01:00 UTC).
    daily = FireTimes(cron="30 2 * * *", zone=PARIS)
    assert take(daily, utc(2024, 3, 30, 12), 2) == [
        "2024-03-31T01:30:00+00:00",  # 03:30 CEST
        "2024-04-01T00:30:00+00:00",  # 02:30 CEST
    ]
    hourly = FireTimes(cron="0 * * * *", zone=PARIS)
    # 02:00 (skipped) and 03:00 are the same instant: one run.
    assert take(hourly, utc(2024, 3, 30, 23, 30), 3) == [
        "2024-03-31T00:00:00+00:00",
        "2024-03-31T01:00:00+00:00",
        "2024-03-31T02:00:00+00:00",
    ]


def test_a_time_repeated_by_winter_time_fires_once() -> None:
    # Paris, 2024-10-27: 03:00 CEST is 02:00 CET; 02:xx happens twice.
    daily = FireTimes(cron="30 2 * * *", zone=PARIS)
    assert take(daily, utc(2024, 10, 26, 12), 2) == [
        "2024-10-27T00:30:00+00:00",  # the first 02:30, CEST
        "2024-10-28T01:30:00+00:00",
    ]
    hourly = FireTimes(cron="0 * * * *", zone=PARIS)
    assert take(hourly, utc(2024, 10, 26, 23, 30), 3) == [
        "2024-10-27T00:00:00+00:00",  # 02:00 CEST
        "2024-10-27T02:00:00+00:00",  # 03:00 CET (02:00 CET is a repeat)
        "2024-10-27T03:00:00+00:00",
    ]
    # Asked from inside the repeated hour, the earlier runs are found.
    inside = utc(2024, 10, 27, 1, 40)  # 02:40 CET, the second pass
    assert [
        t.isoformat() for t in itertools.islice(hourly.at_or_before(inside), 2)
    ] == ["2024-10-27T00:00:00+00:00", "2024-10-26T23:00:00+00:00"]


CRONS = st.sampled_from(
    [
        "* * * * *",
        "*/7 * * * *",
        "0 * * * *",
        "30 2 * * *",
        "15 1,2,3 * * *",
        "0 0 * * 0",
        "0 12 1 * *",
    ]
)
ZONES = st.sampled_from(
    ["UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe"]
)
# Around the changes of 2024 in those zones, and elsewhere.
MOMENTS = st.one_of(
    st.datetimes(dt.datetime(2024, 3, 9), dt.datetime(2024, 4, 8)),
    st.datetimes(dt.datetime(2024, 10, 5), dt.datetime(2024, 11, 4)),
    st.datetimes(dt.datetime(2000, 1, 1), dt.datetime(2040, 1, 1)),
).map(lambda moment: moment.replace(tzinfo=UTC))


@settings(max_examples=150, deadline=None)
@given(CRONS, ZONES, MOMENTS, st.integers(0, 6 * 3600))
def test_forward_and_backward_agree(
    cron: str, zone: str, start: dt.datetime, span_s: int
) -> None:
    times = FireTimes(cron=cron, zone=schedules.time_zone(zone))
    end = start + dt.timedelta(seconds=span_s)
    forward = list(itertools.takewhile(lambda t: t <= end, times.after(start)))
    backward = list(
        itertools.takewhile(lambda t: t > start, times.at_or_before(end))
    )
    assert forward == backward[::-1]
    assert all(a < b for a, b in itertools.pairwise(forward))


@given(st.integers(1, 100_000), MOMENTS)
def test_every_s_forward_and_backward_agree(
    every_s: int, moment: dt.datetime
) -> None:
    times = FireTimes(every_s=every_s)
    after = times.next_after(moment)
    before = next(times.at_or_before(moment))
    assert before <= moment < after
    assert after - before == dt.timedelta(seconds=every_s)
    assert (after - schedules.EPOCH).total_seconds() % every_s == 0


# ---------------------------------------------------------------- the policy


def brute_due(
    period_s: int,
    last: dt.datetime | None,
    now: dt.datetime,
    watching_since: dt.datetime,
    backfill: int,
) -> list[dt.datetime]:
    """due_runs by another road: every fire time listed, then sorted out."""
    grace = dt.timedelta(seconds=min(period_s, schedules.MISSED_AFTER_S))
    # Without a last run, nothing missed counts: start where runs are on
    # time.
    first = (last or watching_since - 2 * grace).timestamp()
    due = [
        schedules.EPOCH + dt.timedelta(seconds=k * period_s)
        for k in range(
            int(first) // period_s, int(now.timestamp()) // period_s + 1
        )
    ]
    due = [t for t in due if (last is None or t > last) and t <= now]
    missed = [t for t in due if t + grace <= watching_since]
    on_time = [t for t in due if t + grace > watching_since]
    if last is None:
        missed = []
    kept = missed[max(0, len(missed) - backfill) :] if backfill else []
    return sorted(kept + on_time)


@settings(max_examples=400, deadline=None)
@given(
    period_s=st.sampled_from([1, 2, 5, 60, 299, 300, 301, 3600]),
    last_k=st.one_of(st.none(), st.integers(0, 50)),
    down_s=st.integers(0, 4000),
    watched_s=st.integers(0, 4000),
    backfill=st.integers(0, 12),
    base=st.integers(1_600_000_000, 1_700_000_000),
)
def test_due_runs_posts_on_time_runs_and_at_most_backfill_missed_ones(
    period_s: int,
    last_k: int | None,
    down_s: int,
    watched_s: int,
    backfill: int,
    base: int,
) -> None:
    times = FireTimes(every_s=period_s)
    anchor = schedules.EPOCH + dt.timedelta(seconds=base // period_s * period_s)
    last = None if last_k is None else anchor + last_k * period_s * SECOND
    reference = last or anchor
    watching_since = (
        reference + down_s * SECOND + dt.timedelta(microseconds=123)
    )
    now = watching_since + watched_s * SECOND
    got = due_runs(
        times,
        last=last,
        now=now,
        watching_since=watching_since,
        backfill=backfill,
        limit=100_000,
    )
    assert got == brute_due(period_s, last, now, watching_since, backfill)
    grace = min(period_s, schedules.MISSED_AFTER_S) * SECOND
    missed = [t for t in got if t + grace <= watching_since]
    assert len(missed) <= backfill
    if last is None:
        assert not missed


def test_a_daemon_down_for_n_periods_backfills_exactly_backfill() -> None:
    times = FireTimes(every_s=10)
    last = utc(2024, 1, 1, 0, 0, 0)
    back = utc(2024, 1, 1, 0, 1, 5)
    # 00:00:10 to 00:00:50 were missed; 00:01:00 is still within its grace
    # (one period), so it is on time.
    missed = [utc(2024, 1, 1, 0, 0, s) for s in (10, 20, 30, 40, 50)]
    on_time = [utc(2024, 1, 1, 0, 1, 0)]
    for backfill in range(8):
        due = due_runs(
            times, last=last, now=back, watching_since=back, backfill=backfill
        )
        kept = missed[max(0, len(missed) - backfill) :] if backfill else []
        assert due == kept + on_time


def test_a_late_pass_of_a_watching_scheduler_skips_nothing() -> None:
    times = FireTimes(every_s=1)
    since = utc(2024, 1, 1, 0, 0, 0)
    last = utc(2024, 1, 1, 0, 0, 10)
    now = utc(2024, 1, 1, 0, 0, 15, 500)
    due = due_runs(times, last=last, now=now, watching_since=since, backfill=0)
    assert due == [utc(2024, 1, 1, 0, 0, s) for s in range(11, 16)]


def test_a_new_schedule_posts_no_missed_run_but_the_current_one() -> None:
    daily = FireTimes(cron="0 3 * * *")
    since = utc(2024, 1, 1, 3, 2)
    assert due_runs(
        daily, last=None, now=since, watching_since=since, backfill=5
    ) == [utc(2024, 1, 1, 3, 0)]
    later = utc(2024, 1, 1, 9, 0)
    assert not due_runs(
        daily, last=None, now=later, watching_since=later, backfill=5
    )


def test_a_pass_takes_at_most_its_limit_oldest_first() -> None:
    times = FireTimes(every_s=1)
    since = utc(2024, 1, 1)
    due = due_runs(
        times,
        last=since,
        now=since + 500 * SECOND,
        watching_since=since,
        backfill=0,
        limit=100,
    )
    assert due == [since + s * SECOND for s in range(1, 101)]


# ---------------------------------------------------------------- keys


def test_the_default_key_names_the_schedule_and_the_utc_fire_time() -> None:
    moment = dt.datetime(2024, 5, 1, 5, 0, tzinfo=PARIS)
    assert (
        schedules.posting_key(schedules.DEFAULT_KEY, "nightly", moment)
        == "schedule:nightly:2024-05-01T03:00:00+00:00"
    )
    assert (
        schedules.posting_key("{schedule}/{run_at:%Y-%m-%d}", "n", moment)
        == "n/2024-05-01"
    )
    assert schedules.posting_key("{run_at.year}", "n", moment) == "2024"


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("{when}", "unknown field {when}"),
        ("{}", "unknown field {}"),
        ("{0}", "unknown field {0}"),
        ("{schedule", "not a valid template"),
        ("{run_at:%Y}}x{", "not a valid template"),
        ("{run_at.nope}", "cannot be filled in"),
        ("{schedule:d}", "cannot be filled in"),
        ("x" * 201, "makes a key of 201 characters"),
    ],
)
def test_bad_key_templates(template: str, says: str) -> None:
    problems = list(schedules.key_problems(template))
    assert problems, template
    assert says in problems[0]


def test_good_key_templates() -> None:
    for template in (
        schedules.DEFAULT_KEY,
        "{schedule}-{run_at:%Y-%m-%d}",
        "fixed",
        "{{literal}} {schedule}",
    ):
        assert not list(schedules.key_problems(template))
