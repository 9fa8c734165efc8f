"""The ``pdoflow`` verbs beyond submit/status: listing, detail, steering,
results, execute-job, and ``wait``'s progress on a terminal and a pipe.

Most run ``pdoflowd.cli.main`` in this process; ``wait`` runs as a
subprocess, once under a real pseudo-terminal and once into a pipe.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import pty
import select
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from harness import REPO_ROOT, TESTS_DIR, write_config
from pdoflowd.cli import main
from pdoflowd.client import Client
from pdoflowd.exitcodes import (
    EXIT_CANCELLED,
    EXIT_CONFIG,
    EXIT_ERRORED,
    EXIT_OK,
    EXIT_USAGE,
)
from pdoflowd.status import PostingStatus

SUMMARY_KEYS = [
    "id",
    "status",
    "poster",
    "target_function",
    "entry_point",
    "created_at",
    "finished_at",
    "requires",
    "store_result",
    "tries",
    "timeout_s",
    "jobs",
    "delayed",
    "percent_done",
    "mean_progress",
    "claimable_by",
    "key",
    "key_scope",
    "after",
    "waiting_for",
    "on_failure",
    "cancel_reason",
    "max_running",
    "uses",
]
JOB_KEYS = [
    "id",
    "status",
    "priority",
    "attempt",
    "tries_remaining",
    "run_after",
    "progress",
    "progress_note",
    "error",
    "completed_at",
]


def run(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    *args: str,
    stdin: bytes = b"",
) -> tuple[int, str, str]:
    """``pdoflow ARGS`` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def pdoflow(
    dsn: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Any:
    def call(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
        return run(capsys, monkeypatch, "--dsn", dsn, *args, stdin=stdin)

    return call


def one_line_error(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pdoflow: ")
    assert "Traceback" not in err
    return lines[0]


def posting_row(dsn: str, posting: str) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        row = cur.execute(
            "SELECT * FROM pdoflowd.postings WHERE uuid = %s", (posting,)
        ).fetchone()
    assert row is not None
    return dict(row)


def job_rows(dsn: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        return cur.execute("SELECT * FROM pdoflowd.jobs ORDER BY id").fetchall()


# ---------------------------------------------------------------- submit


def test_submit_options_set_requirements_results_pause_and_delay(
    dsn: str, pdoflow: Any
) -> None:
    code, out, err = pdoflow(
        "submit",
        "jobfns.noop",
        "--requires",
        "gpu",
        "--requires",
        "big memory",
        "--store-result",
        "--paused",
        "--delay",
        "3600",
        stdin=b"[1]\n[2]\n",
    )
    assert code == EXIT_OK, err
    row = posting_row(dsn, out.strip())
    assert row["requires"] == ["gpu", "big memory"]
    assert (row["store_result"], row["status"]) == (True, "paused")
    for job in job_rows(dsn):
        delay = job["run_after"] - job["created_at"]
        assert dt.timedelta(minutes=59) < delay <= dt.timedelta(hours=1)


def test_submit_run_after_takes_an_iso_time_with_offset(
    dsn: str, pdoflow: Any
) -> None:
    code, _, err = pdoflow(
        "submit",
        "jobfns.noop",
        "--run-after",
        "2031-02-03T04:05:06+01:00",
        stdin=b"[1]\n",
    )
    assert code == EXIT_OK, err
    assert job_rows(dsn)[0]["run_after"] == dt.datetime(
        2031, 2, 3, 3, 5, 6, tzinfo=dt.timezone.utc
    )


def test_submit_refuses_a_run_after_time_without_offset(pdoflow: Any) -> None:
    code, _, err = pdoflow(
        "submit", "jobfns.noop", "--run-after", "2031-02-03T04:05", stdin=b"[1]"
    )
    assert code == EXIT_USAGE
    assert "UTC offset" in one_line_error(err)


def test_submit_accepts_non_finite_numbers(dsn: str, pdoflow: Any) -> None:
    code, _, err = pdoflow(
        "submit", "jobfns.noop", stdin=b"[NaN, Infinity, -Infinity]\n"
    )
    assert code == EXIT_OK, err
    assert job_rows(dsn)[0]["posargs"] == [
        {"__pdoflowd_float__": "nan"},
        {"__pdoflowd_float__": "inf"},
        {"__pdoflowd_float__": "-inf"},
    ]


# ---------------------------------------------------------------- listing


def test_list_postings_prints_a_table_newest_first(
    dsn: str, pdoflow: Any
) -> None:
    client = Client(dsn)
    first = client.post("jobfns.noop", [[1], [2]])
    second = client.post("jobfns.noop", [[3]], paused=True)
    code, out, _ = pdoflow("list-postings")
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID",
        "STATUS",
        "DONE",
        "JOBS",
        "CREATED",
        "POSTER",
        "TARGET",
    ]
    assert [line.split()[:4] for line in lines[1:]] == [
        [str(second.id), "paused", "0%", "1"],
        [str(first.id), "executing", "0%", "2"],
    ]


def test_list_postings_json_has_the_documented_keys_and_filters(
    dsn: str, pdoflow: Any
) -> None:
    client = Client(dsn)
    client.post("jobfns.noop", [[1]])
    paused = client.post("jobfns.noop", [[2]], paused=True)
    code, out, _ = pdoflow("list-postings", "--status", "paused", "--json")
    assert code == EXIT_OK
    [shape] = json.loads(out)
    assert list(shape) == SUMMARY_KEYS
    assert shape["id"] == str(paused.id)
    assert shape["jobs"] == {
        "waiting": 1,
        "executing": 0,
        "done": 0,
        "errored_out": 0,
        "held": 0,
    }
    code, out, _ = pdoflow("list-postings", "--limit", "1", "--json")
    assert [p["id"] for p in json.loads(out)] == [str(paused.id)]


def test_posting_status_json_shows_requirements_and_who_could_run_it(
    dsn: str, pdoflow: Any
) -> None:
    posting = Client(dsn).post(
        "jobfns.noop", [[1], [2]], requires=["gpu"], run_after=600
    )
    code, out, _ = pdoflow("posting-status", str(posting.id), "--json")
    assert code == EXIT_OK
    shape = json.loads(out)
    assert list(shape) == SUMMARY_KEYS
    assert shape["requires"] == ["gpu"]
    assert (shape["delayed"], shape["claimable_by"]) == (2, 0)
    assert shape["poster"] == posting_row(dsn, str(posting.id))["poster"]


def test_submit_caps_a_posting_and_posting_status_shows_its_caps(
    dsn: str, pdoflow: Any
) -> None:
    code, out, err = pdoflow(
        "submit",
        "jobfns.noop",
        "--max-running",
        "2",
        "--uses",
        "tape",
        "--uses",
        "licence",
        stdin=b"[1]\n[2]\n",
    )
    assert code == EXIT_OK, err
    posting_id = out.strip()
    code, out, _ = pdoflow("posting-status", posting_id, "--json")
    shape = json.loads(out)
    assert (shape["max_running"], shape["uses"]) == (2, ["tape", "licence"])
    # No daemon has a limit for these resources: none would claim them.
    assert shape["claimable_by"] == 0
    code, out, _ = pdoflow("posting-status", posting_id)
    lines = [line.split() for line in out.splitlines()]
    assert ["max", "running", "2"] in lines
    assert ["uses", "tape,", "licence"] in lines


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_submit_refuses_a_max_running_that_is_not_a_count(
    dsn: str, pdoflow: Any, value: str
) -> None:
    code, _, err = pdoflow(
        "submit", "jobfns.noop", "--max-running", value, stdin=b"[1]\n"
    )
    assert code == EXIT_USAGE
    assert "--max-running" in err
    with psycopg.connect(dsn) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pdoflowd.postings"
        ).fetchone() == (0,)


def test_posting_status_says_when_no_daemon_would_claim_the_jobs(
    dsn: str, pdoflow: Any
) -> None:
    posting = Client(dsn).post("jobfns.noop", [[1]], requires=["tpu"])
    code, out, _ = pdoflow("posting-status", str(posting.id))
    assert code == EXIT_OK
    assert out.splitlines()[0] == f"posting {posting.id}: executing"
    assert "no running daemon would claim these jobs" in out
    assert "tpu" in out


def test_posting_status_show_jobs_lists_them_in_order(
    dsn: str, pdoflow: Any
) -> None:
    posting = Client(dsn).post("jobfns.noop", [[1], [2], [3]], priority=4)
    code, out, _ = pdoflow(
        "posting-status",
        str(posting.id),
        "--show-jobs",
        "--limit",
        "2",
        "--json",
    )
    assert code == EXIT_OK
    shape = json.loads(out)
    assert [list(j) for j in shape["job_list"]] == [JOB_KEYS, JOB_KEYS]
    assert [j["id"] for j in shape["job_list"]] == [
        str(i) for i in posting.job_ids[:2]
    ]
    assert shape["more_jobs"] == 1
    code, out, _ = pdoflow("posting-status", str(posting.id), "--show-jobs")
    table = out.split("\n\n")[1].splitlines()
    assert table[0].split()[:3] == ["JOB", "STATUS", "PRI"]
    assert [line.split()[:3] for line in table[1:]] == [
        [str(i), "waiting", "4"] for i in posting.job_ids
    ]


def test_priority_stats_counts_unfinished_jobs_by_priority(
    dsn: str, pdoflow: Any
) -> None:
    client = Client(dsn)
    client.post("jobfns.noop", [[1], [2]], priority=[5, 1])
    client.post("jobfns.noop", [[3]], priority=5, paused=True)
    code, out, _ = pdoflow("priority-stats", "--json")
    assert code == EXIT_OK
    assert json.loads(out) == [
        {"priority": 5, "waiting": 2, "runnable": 1, "executing": 0},
        {"priority": 1, "waiting": 1, "runnable": 1, "executing": 0},
    ]
    code, out, _ = pdoflow("priority-stats")
    assert [line.split() for line in out.splitlines()] == [
        ["PRIORITY", "WAITING", "RUNNABLE", "EXECUTING"],
        ["5", "2", "1", "0"],
        ["1", "1", "1", "0"],
    ]


# ---------------------------------------------------------------- steering


def test_pause_resume_cancel_print_the_new_status(
    dsn: str, pdoflow: Any
) -> None:
    posting = str(Client(dsn).post("jobfns.noop", [[1], [2]]).id)
    assert pdoflow("pause", posting)[1] == f"posting {posting}: paused\n"
    assert pdoflow("resume", posting)[1] == f"posting {posting}: executing\n"
    code, out, _ = pdoflow("cancel", posting, "--json")
    assert code == EXIT_OK
    assert json.loads(out) == {
        "id": posting,
        "status": "cancelled",
        "jobs_changed": 2,
    }


def test_retry_prints_how_many_jobs_went_back(dsn: str, pdoflow: Any) -> None:
    posting = str(Client(dsn).post("jobfns.noop", [[1]]).id)
    pdoflow("cancel", posting)
    code, out, _ = pdoflow("retry", posting, "--tries", "2")
    assert code == EXIT_OK
    assert out == f"posting {posting}: executing (1 jobs back to waiting)\n"
    assert job_rows(dsn)[0]["tries_remaining"] == 2


def test_set_posting_status_takes_the_seeds_statuses(
    dsn: str, pdoflow: Any
) -> None:
    posting = str(Client(dsn).post("jobfns.noop", [[1]]).id)
    code, out, _ = pdoflow("set-posting-status", posting, "finished", "--json")
    assert code == EXIT_OK
    assert json.loads(out)["status"] == "finished"
    assert posting_row(dsn, posting)["finished_at"] is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pause", "{posting}"], "is paused; only an executing posting"),
        (["set-posting-status", "{posting}", "bogus"], "not a posting status"),
        (["cancel", "{unknown}"], "no posting"),
        (["retry", "not-a-uuid"], "'not-a-uuid' is not a posting id"),
        (["retry", "{posting}", "--tries", "0"], "--tries"),
    ],
)
def test_steering_mistakes_are_one_line_with_the_usage_status(
    dsn: str, pdoflow: Any, args: list[str], message: str
) -> None:
    posting = str(Client(dsn).post("jobfns.noop", [[1]], paused=True).id)
    filled = [a.format(posting=posting, unknown=uuid.uuid4()) for a in args]
    code, out, err = pdoflow(*filled)
    assert code == EXIT_USAGE
    assert out == ""
    assert message in one_line_error(err)


# ---------------------------------------------------------------- results


def test_results_show_stored_values_and_errors(dsn: str, pdoflow: Any) -> None:
    posting = Client(dsn).post("jobfns.noop", [[1], [2]], store_result=True)
    with psycopg.connect(dsn) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM pdoflowd.jobs")]
        conn.execute(
            "UPDATE pdoflowd.jobs SET status = 'done', result = %s::jsonb"
            " WHERE id = %s",
            ('{"x": [1, {"__pdoflowd_float__": "nan"}]}', min(ids)),
        )
        conn.execute(
            "UPDATE pdoflowd.jobs SET status = 'errored_out', error = %s"
            " WHERE id = %s",
            ("ValueError: bad\nmore", max(ids)),
        )
    code, out, _ = pdoflow("results", str(posting.id), "--json")
    assert code == EXIT_OK
    assert json.loads(out) == [
        {
            "id": str(posting.job_ids[0]),
            "status": "done",
            "stored": True,
            "result": {"x": [1, {"__pdoflowd_float__": "nan"}]},
            "error": None,
        },
        {
            "id": str(posting.job_ids[1]),
            "status": "errored_out",
            "stored": False,
            "result": None,
            "error": "ValueError: bad\nmore",
        },
    ]
    code, out, _ = pdoflow("results", str(posting.id))
    assert out.splitlines()[2].split()[1:] == [
        "errored_out",
        "ValueError:",
        "bad",
    ]


# ---------------------------------------------------------------- execute-job


@pytest.fixture
def job_config(tmp_path: Path, dsn: str) -> Path:
    return write_config(
        tmp_path / "pdoflowd.toml",
        {"jobs": {"allowed_modules": ["featurejobs"]}},
    )


def test_execute_job_runs_the_job_here_and_records_it(
    dsn: str, pdoflow: Any, job_config: Path
) -> None:
    posting = Client(dsn).post(
        "featurejobs.describe", [[1.5, "a"]], store_result=True
    )
    job_id = str(posting.job_ids[0])
    code, out, err = pdoflow(
        "execute-job", job_id, "--config", str(job_config), "--json"
    )
    assert code == EXIT_OK, err
    shape = json.loads(out)
    assert (shape["status"], shape["attempt"], shape["error"]) == (
        "done",
        1,
        None,
    )
    assert shape["result"]["args"] == [1.5, "a"]
    assert shape["result"]["job_id"] == job_id
    assert shape["result"]["pid"] == os.getpid()
    [row] = job_rows(dsn)
    assert (row["status"], row["attempt"], row["exited_ok"]) == (
        "done",
        1,
        True,
    )
    assert row["result"]["posting_id"] == str(posting.id)
    assert Client(dsn).status(posting.id).status is PostingStatus.FINISHED
    with psycopg.connect(dsn) as conn:
        stopped = conn.execute(
            "SELECT stopped_at IS NOT NULL FROM pdoflowd.daemons"
        ).fetchall()
    assert stopped == [(True,)]


def test_execute_job_runs_an_async_job_to_its_end(
    dsn: str, pdoflow: Any, job_config: Path
) -> None:
    posting = Client(dsn).post("featurejobs.describe_async", [[0.01]])
    job_id = str(posting.job_ids[0])
    code, out, err = pdoflow(
        "execute-job", job_id, "--config", str(job_config), "--json"
    )
    assert code == EXIT_OK, err
    shape = json.loads(out)
    assert shape["status"] == "done"
    assert shape["result"]["job_id"] == job_id


def test_execute_job_reports_a_failure_with_its_traceback(
    dsn: str, pdoflow: Any, job_config: Path
) -> None:
    posting = Client(dsn).post("featurejobs.fail_until_flag", [["go"]])
    code, out, err = pdoflow(
        "execute-job", str(posting.job_ids[0]), "--config", str(job_config)
    )
    assert code == EXIT_ERRORED
    assert "Traceback" in err and "flag go not set" in err
    assert out.strip().endswith("RuntimeError: flag go not set")
    [row] = job_rows(dsn)
    assert (row["status"], row["tries_remaining"]) == ("waiting", 2)


def test_execute_job_refuses_what_allowed_modules_does_not_allow(
    dsn: str,
    pdoflow: Any,
    job_config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = f"sentinel_{uuid.uuid4().hex}"
    marker = tmp_path / "imported"
    (tmp_path / f"{module}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef run(): pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    posting = Client(dsn).post(f"{module}.run", [[]])
    code, out, err = pdoflow(
        "execute-job", str(posting.job_ids[0]), "--config", str(job_config)
    )
    assert (code, out) == (EXIT_USAGE, "")
    assert "is not under jobs.allowed_modules" in one_line_error(err)
    assert module not in sys.modules
    assert not marker.exists()
    [row] = job_rows(dsn)
    assert (row["status"], row["attempt"], row["error"]) == ("waiting", 0, None)


def test_execute_job_with_an_invalid_config_exits_78(
    pdoflow: Any, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[jobs]\nallowed_modules = 3\n")
    code, _, err = pdoflow(
        "execute-job", str(uuid.uuid4()), "--config", str(bad)
    )
    assert code == EXIT_CONFIG
    assert "jobs.allowed_modules" in one_line_error(err)


def test_execute_job_of_an_unknown_job_is_a_usage_error(
    pdoflow: Any, job_config: Path
) -> None:
    unknown = uuid.uuid4()
    code, _, err = pdoflow(
        "execute-job", str(unknown), "--config", str(job_config)
    )
    assert code == EXIT_USAGE
    assert one_line_error(err) == f"pdoflow: no job {unknown}"


# ---------------------------------------------------------------- wait


def _advance(dsn: str, posting: uuid.UUID, step_s: float) -> None:
    """Finish the posting's jobs one by one, then the posting."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        ids = [
            r[0]
            for r in conn.execute("SELECT id FROM pdoflowd.jobs ORDER BY id")
        ]
        for job_id in ids:
            time.sleep(step_s)
            conn.execute(
                "UPDATE pdoflowd.jobs SET status = 'done' WHERE id = %s",
                (job_id,),
            )
        conn.execute(
            "UPDATE pdoflowd.postings SET status = 'finished' WHERE uuid = %s",
            (posting,),
        )


def _wait_command(dsn: str, posting: uuid.UUID) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pdoflowd.cli",
        "--dsn",
        dsn,
        "wait",
        str(posting),
        "--interval",
        "0.1",
        "--timeout",
        "60",
    ]


def _environ() -> dict[str, str]:
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PG") and k != "PDOFLOW_DSN"
    }
    environ["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT)])
    return environ


def test_wait_on_a_terminal_draws_a_progress_bar_with_rate_and_eta(
    dsn: str,
) -> None:
    posting = Client(dsn).post("jobfns.noop", [[i] for i in range(4)])
    mover = threading.Thread(target=_advance, args=(dsn, posting.id, 0.4))
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        _wait_command(dsn, posting.id),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=_environ(),
    )
    os.close(slave)
    mover.start()
    output = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            output += chunk
        assert proc.wait(30) == EXIT_OK
    finally:
        mover.join()
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    text = output.decode()
    redraws = [part for part in text.split("\r") if part.startswith("[")]
    assert len(redraws) >= 3, text
    assert any("jobs/s" in part and "ETA" in part for part in redraws)
    assert any(" 4/4 " in part and "100%" in part for part in redraws)
    assert any(" 1/4 " in part or " 2/4 " in part for part in redraws)
    assert "\x1b[K" in text
    assert f"posting {posting.id}: finished" in text


def test_wait_into_a_pipe_prints_plain_lines_and_exit_3_when_cancelled(
    dsn: str,
) -> None:
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[1], [2]])
    proc = subprocess.Popen(
        _wait_command(dsn, posting.id),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_environ(),
    )
    try:
        first = proc.stdout.readline() if proc.stdout else ""
        client.cancel(posting.id)
        rest, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_CANCELLED, stderr
    stdout = first + rest
    assert "\r" not in stdout and "\x1b" not in stdout
    lines = stdout.splitlines()
    assert lines[0] == (
        f"posting {posting.id}: executing, 0/2 ended "
        "(0 done, 0 errored out, 0 executing)"
    )
    assert f"posting {posting.id}: cancelled, 2/2 ended" in lines[1]
    assert lines[2:] == [
        f"posting {posting.id}: cancelled",
        "  waiting      0",
        "  executing    0",
        "  done         0",
        "  errored_out  2",
    ]
