"""The report pipe's protocol: what a worker tells its supervisor.

The lines are pinned byte for byte: the supervisor of a running daemon
reads what its workers write, so the wire format must not drift.
"""

from __future__ import annotations

import pytest

from pdoflowd.daemon import reports
from pdoflowd.daemon.reports import (
    Attempts,
    BootFailed,
    DbError,
    MetricsReport,
    Ready,
    ReportEvent,
    Retiring,
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
                (0.001,),
                (1.5, 2),
                {"done": {"pkg.f": Attempts(2, (0.25,))}},
            ),
            b'{"event": "metrics", "v": 1, "claimed": 2, "claim_s": [0.001],'
            b' "wait_s": [1.5, 2], "outcomes": {"done": {"pkg.f": [2,'
            b" [0.25]]}}}\n",
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
        b'{"event": "metrics", "v": 1, "outcomes": {"vanished": {}}}',
        b'{"event": "metrics", "v": 1, "wait_s": [-1]}',
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


def test_a_decoded_metrics_report_holds_numbers_as_floats() -> None:
    line = reports.encode(
        MetricsReport(1, (1,), (), {"failed": {"f": Attempts(1, (3,))}})
    )
    decoded = reports.decode(line)
    assert isinstance(decoded, MetricsReport)
    assert decoded.claim_s == (1.0,)
    assert decoded.outcomes["failed"]["f"] == Attempts(1, (3.0,))


def test_merged_reports_add_counts_and_keep_the_first_samples() -> None:
    first = metrics_report(
        claimed=1, claim_s=[0.1], runs=[JobRun("done", "f", 0.5)]
    )
    second = metrics_report(
        claimed=2,
        claim_s=[0.2],
        wait_s=[3.0],
        runs=[JobRun("done", "f", 0.75), JobRun("released", "g", None)],
    )
    merged = first.merged(second, max_samples=1)
    assert merged == MetricsReport(
        3,
        (0.1,),
        (3.0,),
        {
            "done": {"f": Attempts(2, (0.5,))},
            "released": {"g": Attempts(1, ())},
        },
    )
