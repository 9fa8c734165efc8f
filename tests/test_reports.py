"""The report pipe's protocol: what a worker tells its supervisor.

The lines are pinned byte for byte: the supervisor of a running daemon
reads what its workers write, so the wire format must not drift.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from pdoflowd.daemon import reports
from pdoflowd.daemon.reports import (
    CLAIM_BUCKETS,
    DURATION_BUCKETS,
    WAIT_BUCKETS,
    Attempts,
    Bins,
    BootFailed,
    DbError,
    MetricsReport,
    Ready,
    ReportEvent,
    Retiring,
    bins_of,
)
from pdoflowd.daemon.tally import JobRun, metrics_report

# ------------------------------------------------------------ the lines


@pytest.mark.parametrize(
    ("report", "line"),
    [
        (Ready(), b'{"event": "ready"}\n'),
        (
            BootFailed("no module named 'x\xe9'"),
            b'{"event": "boot_failed", "reason": "no module named'
            b" 'x\\u00e9'\"}\n",
        ),
        (
            Retiring("max_jobs"),
            b'{"event": "retiring", "reason": "max_jobs"}\n',
        ),
        (
            DbError("record outcomes"),
            b'{"event": "db_error", "operation": "record outcomes"}\n',
        ),
        (
            MetricsReport(
                2,
                Bins((0, 1), 0.001),
                Bins((0, 0, 0, 0, 0, 0, 2), 3.5),
                {
                    "done": {
                        "pkg.f": Attempts(2, Bins((0, 0, 0, 0, 0, 1), 0.25))
                    }
                },
                seq=7,
            ),
            b'{"event": "metrics", "v": 2, "seq": 7, "claimed": 2, "claim_s":'
            b' [0.001, [0, 1]], "wait_s": [3.5, [0, 0, 0, 0, 0, 0, 2]],'
            b' "outcomes": {"done": {"pkg.f": [2, [0.25, [0, 0, 0, 0, 0,'
            b" 1]]]}}}\n",
        ),
    ],
)
def test_each_report_is_one_json_line_and_decodes_to_itself(
    report: reports.Report, line: bytes
) -> None:
    assert reports.encode(report) == line
    assert reports.decode(line.rstrip(b"\n")) == report


def test_every_event_has_its_report_and_nothing_else_does() -> None:
    kinds = {Ready, BootFailed, Retiring, DbError, MetricsReport}
    assert {k.event for k in kinds} == set(ReportEvent)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'"ready"',
        b"{}",
        b'{"event": "probe"}',
        b'{"event": ["ready"]}',
        b'{"event": "metrics"}',
        b'{"event": "metrics", "v": 1}',
        b'{"event": "metrics", "v": 2, "seq": -1}',
        b'{"event": "metrics", "v": 2, "outcomes": {"vanished": {}}}',
        b'{"event": "metrics", "v": 2, "wait_s": [-1, []]}',
        b'{"event": "metrics", "v": 2, "wait_s": [1.5, [-1]]}',
        b'{"event": "metrics", "v": 2, "wait_s": [1.5]}',
        b'{"event": "metrics", "v": 2, "wait_s": [1.5, 1]}',
        b'{"event": "metrics", "v": 2, "wait_s": [1.5, [0.5]]}',
        b'{"event": "metrics", "v": 2, "claim_s": [1, ['
        + b"0, " * 15
        + b"1]]}",
        b'{"event": "metrics", "v": 2, "outcomes": {"done": {"f": [1, [2,'
        b" [1, 1]]]}}}",
    ],
)
def test_a_line_that_is_not_a_report_is_a_value_error(line: bytes) -> None:
    with pytest.raises(ValueError):
        reports.decode(line)


def test_other_reports_take_their_fields_as_text_as_the_supervisor_did() -> (
    None
):
    assert reports.decode(b'{"event": "boot_failed"}') == BootFailed("None")
    assert reports.decode(b'{"event": "retiring", "reason": 3}') == Retiring(
        "3"
    )
    assert reports.decode(b'{"event": "db_error"}') == DbError("")
    assert reports.decode(b'{"event": "ready", "extra": 1}') == Ready()


def test_a_decoded_metrics_report_holds_sums_as_floats() -> None:
    line = b'{"event": "metrics", "v": 2, "claim_s": [1, [0, 0, 1]]}'
    decoded = reports.decode(line)
    assert isinstance(decoded, MetricsReport)
    assert decoded.claim_s == Bins((0, 0, 1), 1.0)
    assert type(decoded.claim_s.sum_s) is float
    assert decoded.wait_s == Bins()


def test_bins_follow_prometheus_le_and_keep_no_trailing_empty_bucket() -> None:
    bounds = (0.1, 1.0, 10.0)
    assert bins_of(bounds, []) == Bins() == Bins((0, 0, 0, 0), 0.0)
    # A duration on a bound is in that bound's bucket; above all, +Inf.
    assert bins_of(bounds, [0.1, 0.5, 1.0, 11.0, -2.0]) == Bins(
        (2, 2, 0, 1), 12.6
    )
    assert bins_of(bounds, [0.05]).counts == (1,)
    assert Bins((1, 0, 2), 1.5).plus(Bins((0, 3), 0.5)) == Bins((1, 3, 2), 2.0)


def test_every_histogram_has_its_own_bounds() -> None:
    for bounds in (DURATION_BUCKETS, WAIT_BUCKETS, CLAIM_BUCKETS):
        assert list(bounds) == sorted(set(bounds))
        assert all(bound > 0 for bound in bounds)


def test_merged_reports_add_counts_and_bins_exactly() -> None:
    first = metrics_report(
        claimed=1, claim_s=[0.1], runs=[JobRun("done", "f", 0.5)]
    )
    second = metrics_report(
        claimed=2,
        claim_s=[0.2],
        wait_s=[3.0],
        runs=[JobRun("done", "f", 0.75), JobRun("released", "g", None)],
    )
    merged = replace(first, seq=4).merged(replace(second, seq=5))
    assert merged == MetricsReport(
        3,
        bins_of(CLAIM_BUCKETS, [0.1, 0.2]),
        bins_of(WAIT_BUCKETS, [3.0]),
        {
            "done": {"f": Attempts(2, bins_of(DURATION_BUCKETS, [0.5, 0.75]))},
            "released": {"g": Attempts(1)},
        },
        seq=5,
    )
