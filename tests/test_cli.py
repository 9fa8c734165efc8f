"""The ``pdoflow`` command, run as a subprocess against a real PostgreSQL.

The two tests of ``wait`` on a posting that ends run the real daemon.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools import devcluster
from harness import Daemon, daemon_config, wait_until
from pdoflowd.cli import UserError, main, parse_job_lines
from pdoflowd.client import Client
from pdoflowd.exitcodes import EXIT_INTERRUPTED, EXIT_UNAVAILABLE, EXIT_USAGE


def pdoflow(
    *args: str,
    stdin: str | bytes = b"",
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pdoflowd.cli ARGS`` with ``stdin``; text results."""
    environ = {
        k: v
        for k, v in os.environ.items()
        if k != "PDOFLOW_DSN" and not k.startswith("PG")
    }
    environ.update(env or {})
    data = stdin.encode() if isinstance(stdin, str) else stdin
    done = subprocess.run(
        [sys.executable, "-m", "pdoflowd.cli", *args],
        input=data,
        capture_output=True,
        env=environ,
        timeout=timeout,
    )
    return subprocess.CompletedProcess(
        done.args,
        done.returncode,
        done.stdout.decode(),
        done.stderr.decode(),
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """A failed run: non-zero exit, one line on stderr, no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pdoflow: ")
    return lines[0]


def job_rows(dsn: str) -> list[tuple[Any, ...]]:
    """(priority, posargs, kwargs, tries_remaining), in insert order."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT priority, posargs, kwargs, tries_remaining "
            "FROM pdoflowd.jobs ORDER BY id"
        ).fetchall()


def row_counts(dsn: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM pdoflowd.postings), "
            "(SELECT count(*) FROM pdoflowd.jobs)"
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def lines(*values: Any) -> str:
    return "".join(json.dumps(v) + "\n" for v in values)


# ---------------------------------------------------------------- submit


def test_submit_takes_arrays_and_objects_and_prints_the_posting_uuid(
    dsn: str,
) -> None:
    result = pdoflow(
        "--dsn",
        dsn,
        "submit",
        "jobfns.noop",
        stdin=lines(
            [1, 2.5, "a"],
            {"args": [2], "kwargs": {"x": [1, None]}},
            {"kwargs": {"y": True}},
        ),
    )
    assert result.returncode == 0, result.stderr
    posting_id = uuid.UUID(result.stdout.strip())
    with psycopg.connect(dsn) as conn:
        assert conn.execute(
            "SELECT uuid, entry_point FROM pdoflowd.postings"
        ).fetchall() == [(posting_id, "jobfns.noop")]
    assert job_rows(dsn) == [
        (0, [1, 2.5, "a"], {}, 3),
        (0, [2], {"x": [1, None]}, 3),
        (0, [], {"y": True}, 3),
    ]


def test_submit_reads_the_dsn_from_pdoflow_dsn(dsn: str) -> None:
    result = pdoflow(
        "submit", "jobfns.noop", stdin="[1]\n", env={"PDOFLOW_DSN": dsn}
    )
    assert result.returncode == 0, result.stderr
    assert row_counts(dsn) == (1, 1)


def test_submit_priority_option_is_the_default_and_lines_override_it(
    dsn: str,
) -> None:
    result = pdoflow(
        "--dsn",
        dsn,
        "submit",
        "jobfns.noop",
        "--priority",
        "5",
        stdin=lines([1], {"args": [2], "priority": -3}, {"args": [3]}),
    )
    assert result.returncode == 0, result.stderr
    assert [row[0] for row in job_rows(dsn)] == [5, -3, 5]


def test_submit_priority_defaults_to_zero(dsn: str) -> None:
    result = pdoflow("--dsn", dsn, "submit", "jobfns.noop", stdin="[1]\n")
    assert result.returncode == 0, result.stderr
    assert [row[0] for row in job_rows(dsn)] == [0]


def test_submit_tries_option_sets_the_tries_of_every_job(dsn: str) -> None:
    result = pdoflow(
        "--dsn", dsn, "submit", "jobfns.noop", "--tries", "1", stdin="[1]\n[2]"
    )
    assert result.returncode == 0, result.stderr
    assert [row[3] for row in job_rows(dsn)] == [1, 1]


def test_submit_skips_blank_lines(dsn: str) -> None:
    result = pdoflow(
        "--dsn", dsn, "submit", "jobfns.noop", stdin="\n[1]\n  \n[2]\n\n"
    )
    assert result.returncode == 0, result.stderr
    assert [row[1] for row in job_rows(dsn)] == [[1], [2]]


MALFORMED_LINES = [
    ("[1, 2", "not JSON: Expecting ',' delimiter at column 6"),
    ("{'args': []}", "not JSON"),
    ('"text"', "expected a JSON array or object, got a string"),
    ("42", "expected a JSON array or object, got a number"),
    ("null", "expected a JSON array or object, got null"),
    ('{"args": {"a": 1}}', '"args" must be an array, got an object'),
    ('{"kwargs": [1]}', '"kwargs" must be an object, got an array'),
    ('{"args": [], "retries": 2}', "unknown key 'retries'"),
    ('{"priority": "high"}', '"priority" must be an integer, got a string'),
    ('{"priority": 1.5}', '"priority" must be an integer, got a number'),
    ('{"priority": true}', '"priority" must be an integer, got a boolean'),
    ('{"priority": 4294967296}', '"priority" must be between'),
    ('[{"a": [1, {"b": {}}]}, true, {"c": "\\u0000"}]', "posargs[2]['c']: a"),
    ('["a\\u0000b"]', "posargs[0]: a string with a NUL character"),
    ('["\\ud800"]', "posargs[0]: a string is not valid Unicode"),
    ('{"kwargs": {"not-a-name": 1}}', "kwargs: 'not-a-name' is not"),
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ("[" + "7" * 5000 + "]", "not usable: Exceeds the limit"),
]


@pytest.mark.parametrize(("bad_line", "problem"), MALFORMED_LINES)
def test_parse_job_lines_names_the_first_malformed_line(
    bad_line: str, problem: str
) -> None:
    with pytest.raises(UserError) as caught:
        parse_job_lines(["[1]\n", "\n", bad_line + "\n", "[[[\n"], 0)
    assert str(caught.value).startswith("line 3: ")
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("[1, 2", "not JSON"),
        ('"text"', "expected a JSON array or object"),
        ('{"args": [], "retries": 2}', "unknown key 'retries'"),
        ('{"priority": "high"}', '"priority" must be an integer'),
        ('["\\ud800"]', "posargs[0]: a string is not valid Unicode"),
    ],
)
def test_submit_rejects_a_malformed_line_naming_it_and_writes_nothing(
    dsn: str, bad_line: str, problem: str
) -> None:
    result = pdoflow(
        "--dsn",
        dsn,
        "submit",
        "jobfns.noop",
        stdin=f"[1]\n\n{bad_line}\n[2]\n",
    )
    message = assert_one_line_error(result)
    assert result.returncode == EXIT_USAGE
    assert message.startswith("pdoflow: line 3: ")
    assert problem in message
    assert result.stdout == ""
    assert row_counts(dsn) == (0, 0)


def test_submit_rejects_a_line_that_is_not_utf8(dsn: str) -> None:
    result = pdoflow(
        "--dsn", dsn, "submit", "jobfns.noop", stdin=b'[1]\n["\xff"]\n'
    )
    message = assert_one_line_error(result)
    assert message.startswith("pdoflow: line 2: not UTF-8")
    assert row_counts(dsn) == (0, 0)


@pytest.mark.parametrize("stdin", ["", "\n  \n"])
def test_submit_refuses_empty_input(dsn: str, stdin: str) -> None:
    result = pdoflow("--dsn", dsn, "submit", "jobfns.noop", stdin=stdin)
    assert assert_one_line_error(result) == "pdoflow: no jobs on stdin"
    assert row_counts(dsn) == (0, 0)


def test_submit_refuses_a_malformed_entry_point(dsn: str) -> None:
    result = pdoflow("--dsn", dsn, "submit", "noop", stdin="[1]\n")
    assert "not a dotted path" in assert_one_line_error(result)
    assert row_counts(dsn) == (0, 0)


def test_a_usage_mistake_is_one_line_with_the_usage_exit_code() -> None:
    result = pdoflow("submit", "jobfns.noop", "--priority", "high")
    message = assert_one_line_error(result)
    assert result.returncode == EXIT_USAGE
    assert "--priority" in message


# ---------------------------------------------------------------- status


def test_status_json_prints_exactly_the_documented_keys_and_counts(
    dsn: str,
) -> None:
    posting = Client(dsn).post("jobfns.noop", [[i] for i in range(4)])
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE pdoflowd.jobs SET status = 'done' "
            "WHERE id IN (SELECT min(id) FROM pdoflowd.jobs)"
        )
    result = pdoflow("--dsn", dsn, "status", str(posting.id), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "id": str(posting.id),
        "status": "executing",
        "jobs": {
            "waiting": 3,
            "executing": 0,
            "done": 1,
            "errored_out": 0,
            "held": 0,
        },
        "waiting_for": [],
    }
    assert list(json.loads(result.stdout)) == [
        "id",
        "status",
        "jobs",
        "waiting_for",
    ]


def test_status_without_json_prints_a_line_per_job_status(dsn: str) -> None:
    posting = Client(dsn).post("jobfns.noop", [[1], [2]])
    result = pdoflow("--dsn", dsn, "status", str(posting.id))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"posting {posting.id}: executing",
        "  waiting      2",
        "  executing    0",
        "  done         0",
        "  errored_out  0",
    ]


def test_status_of_an_unknown_posting_is_a_one_line_error(dsn: str) -> None:
    unknown = uuid.uuid4()
    result = pdoflow("--dsn", dsn, "status", str(unknown), "--json")
    assert assert_one_line_error(result) == f"pdoflow: no posting {unknown}"
    assert result.returncode == EXIT_USAGE
    assert result.stdout == ""


def test_status_of_something_not_a_uuid_is_a_one_line_error(dsn: str) -> None:
    result = pdoflow("--dsn", dsn, "status", "not-a-uuid")
    message = assert_one_line_error(result)
    assert message == "pdoflow: 'not-a-uuid' is not a posting id"


def test_an_unreachable_database_is_a_one_line_error() -> None:
    dsn = f"host=127.0.0.1 port={devcluster.free_port()} connect_timeout=5"
    result = pdoflow("--dsn", dsn, "status", str(uuid.uuid4()))
    message = assert_one_line_error(result)
    assert result.returncode == EXIT_UNAVAILABLE
    assert message.startswith("pdoflow: cannot reach the database: ")


# ---------------------------------------------------------------- wait


def test_wait_exits_2_when_the_timeout_passes_first(dsn: str) -> None:
    posting = Client(dsn).post("jobfns.noop", [[1]])
    result = pdoflow(
        "--dsn",
        dsn,
        "wait",
        str(posting.id),
        "--timeout",
        "0.3",
        "--interval",
        "0.1",
        "--json",
    )
    assert result.returncode == 2
    assert json.loads(result.stdout)["status"] == "executing"
    assert "timed out" in assert_one_line_error(result)


def test_wait_on_an_unknown_posting_is_an_error_not_a_timeout(
    dsn: str,
) -> None:
    result = pdoflow("--dsn", dsn, "wait", str(uuid.uuid4()), "--timeout", "5")
    assert_one_line_error(result)
    assert result.returncode == EXIT_USAGE


def test_wait_refuses_a_negative_timeout() -> None:
    result = pdoflow("wait", str(uuid.uuid4()), "--timeout", "-1")
    assert "--timeout" in assert_one_line_error(result)
    assert result.returncode == EXIT_USAGE


@pytest.mark.parametrize(
    "option",
    [
        ("--timeout", "nan"),
        ("--timeout", "soon"),
        ("--interval", "0"),
        ("--interval", "inf"),
    ],
)
def test_wait_refuses_meaningless_times(
    option: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["wait", str(uuid.uuid4()), *option])
    assert caught.value.code == EXIT_USAGE
    message = capsys.readouterr().err
    assert message.count("\n") == 1
    assert message.startswith(f"pdoflow: argument {option[0]}: ")


def test_wait_interrupted_by_ctrl_c_is_one_line_without_traceback(
    dsn: str,
) -> None:
    posting = Client(dsn).post("jobfns.noop", [[1]])
    environ = {k: v for k, v in os.environ.items() if k != "PDOFLOW_DSN"}
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "pdoflowd.cli", "--dsn", dsn),
            *("wait", str(posting.id), "--interval", "0.1"),
        ],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def waiting() -> bool:
            with psycopg.connect(dsn) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = 'pdoflow-client' "
                    "AND datname = current_database()"
                ).fetchone()
            return row == (1,)

        wait_until(waiting, timeout=20)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_INTERRUPTED
    assert stderr == "pdoflow: interrupted\n"


def test_wait_exits_0_when_the_posting_is_finished(
    dsn: str, tmp_path: Path
) -> None:
    daemon = Daemon(tmp_path, daemon_config(dsn), effects_dsn=dsn)
    try:
        daemon.start().wait_ready()
        submitted = pdoflow(
            "--dsn", dsn, "submit", "jobfns.noop", stdin=lines([1], [2], [3])
        )
        assert submitted.returncode == 0, submitted.stderr
        posting_id = submitted.stdout.strip()
        result = pdoflow(
            "--dsn",
            dsn,
            "wait",
            posting_id,
            "--timeout",
            "30",
            "--interval",
            "0.1",
            "--json",
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {
            "id": posting_id,
            "status": "finished",
            "jobs": {
                "waiting": 0,
                "executing": 0,
                "done": 3,
                "errored_out": 0,
                "held": 0,
            },
            "waiting_for": [],
        }
        assert daemon.stop() == 0
    finally:
        daemon.close()


def test_wait_exits_1_when_the_posting_errored_out(
    dsn: str, tmp_path: Path
) -> None:
    config = daemon_config(dsn, jobs={"posting_error_threshold": 2})
    daemon = Daemon(tmp_path, config, effects_dsn=dsn)
    try:
        daemon.start().wait_ready()
        submitted = pdoflow(
            "--dsn",
            dsn,
            "submit",
            "jobfns.fail",
            "--tries",
            "1",
            stdin=lines(*[[f"job {i}"] for i in range(10)]),
        )
        assert submitted.returncode == 0, submitted.stderr
        result = pdoflow(
            "--dsn",
            dsn,
            "wait",
            submitted.stdout.strip(),
            "--timeout",
            "30",
            "--interval",
            "0.1",
            "--json",
        )
        assert result.returncode == 1, result.stderr
        state = json.loads(result.stdout)
        assert state["status"] == "errored_out"
        assert state["jobs"]["errored_out"] >= 2
        assert daemon.stop() == 0
    finally:
        daemon.close()
