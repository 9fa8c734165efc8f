"""Log lines: syslog priorities for the journal, timestamps elsewhere.

The journal is recognised the way systemd announces it: JOURNAL_STREAM
holds the device and inode of stderr. The tests give a real process a file
as stderr and that file's device:inode in JOURNAL_STREAM, then read back
every line it wrote.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from harness import (
    REPO_ROOT,
    TESTS_DIR,
    Daemon,
    daemon_config,
    wait_until,
)
from pdoflowd.client import Client
from pdoflowd.daemon import logs

SYSTEST_DIR = TESTS_DIR / "systemd"
JOURNAL_LINE = re.compile(
    r"<(?P<priority>[0-7])>\[(?P<who>[^:\]]+):(?P<pid>\d+)\] "
)
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} ")

# A process that logs everything a daemon may log: levels, several lines,
# a traceback, another library, a Python warning, a worker's label and an
# uncaught exception at the end.
_SCRIPT = textwrap.dedent(
    """
    import logging, warnings
    from pdoflowd.daemon import logs

    logs.configure("info")
    log = logging.getLogger("pdoflowd.test")
    log.info("first line\\nsecond line")
    log.debug("not shown at info")
    logging.getLogger("somelib").warning("a library warns")
    logging.getLogger("somelib").info("not shown: libraries log from warning")
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("dividing failed")
    warnings.warn("careful")
    logs.set_process_label("worker 3")
    log.error("from a worker")
    raise RuntimeError("nobody caught this")
    """
)


def journal_stream_of(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}"


def run_logging_process(stderr: Path, journal_stream: str | None) -> int:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JOURNAL_STREAM", "PYTHONWARNINGS")
    }
    env["PYTHONPATH"] = str(REPO_ROOT)
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream
    with stderr.open("ab") as err:
        return subprocess.run(
            [sys.executable, "-c", _SCRIPT],
            stderr=err,
            stdout=subprocess.DEVNULL,
            env=env,
            timeout=60,
        ).returncode


@pytest.fixture
def journal_output(tmp_path: Path) -> Iterator[tuple[int, list[str]]]:
    stderr = tmp_path / "stderr"
    stderr.touch()
    code = run_logging_process(stderr, journal_stream_of(stderr))
    yield code, stderr.read_text().splitlines()


def test_journal_lines_all_carry_a_priority_and_the_process(
    journal_output: tuple[int, list[str]],
) -> None:
    code, lines = journal_output
    assert code == 1
    assert len(lines) > 10
    for line in lines:
        assert JOURNAL_LINE.match(line), line


def test_journal_lines_carry_no_timestamp(
    journal_output: tuple[int, list[str]],
) -> None:
    _, lines = journal_output
    assert not any(TIMESTAMP.search(line) for line in lines)


def test_journal_priorities_follow_the_levels(
    journal_output: tuple[int, list[str]],
) -> None:
    _, lines = journal_output

    def priority_of(text: str) -> str:
        line = next(line for line in lines if text in line)
        match = JOURNAL_LINE.match(line)
        assert match is not None
        return match["priority"]

    assert priority_of("first line") == "6"
    assert priority_of("second line") == "6"
    assert priority_of("a library warns") == "4"
    assert priority_of("dividing failed") == "3"
    assert priority_of("ZeroDivisionError: division by zero") == "3"
    assert priority_of("careful") == "4"
    assert priority_of("from a worker") == "3"
    assert priority_of("RuntimeError: nobody caught this") == "2"
    assert not any("not shown" in line for line in lines)


def test_a_traceback_stays_in_its_record_line_by_line(
    journal_output: tuple[int, list[str]],
) -> None:
    _, lines = journal_output
    start = next(i for i, line in enumerate(lines) if "dividing failed" in line)
    end = next(
        i for i, line in enumerate(lines) if "ZeroDivisionError:" in line
    )
    record = lines[start : end + 1]
    assert any("Traceback (most recent call last):" in line for line in record)
    assert {line[:3] for line in record} == {"<3>"}
    pids = {JOURNAL_LINE.match(line)["pid"] for line in record}  # type: ignore[index]
    assert len(pids) == 1


def test_journal_lines_name_the_worker_slot_after_the_label_changes(
    journal_output: tuple[int, list[str]],
) -> None:
    _, lines = journal_output
    line = next(line for line in lines if "from a worker" in line)
    assert line.startswith("<3>[worker 3:")
    first = next(line for line in lines if "first line" in line)
    assert first.startswith("<6>[supervisor:")


def test_without_journal_stream_lines_are_timestamped_and_unprefixed(
    tmp_path: Path,
) -> None:
    stderr = tmp_path / "stderr"
    assert run_logging_process(stderr, None) == 1
    lines = stderr.read_text().splitlines()
    assert not any(line.startswith("<") for line in lines)
    heads = [line for line in lines if not line.startswith("    ")]
    assert len(heads) == 6
    for line in heads:
        assert TIMESTAMP.match(line), line
        assert re.search(r" \[(supervisor|worker 3):\d+\] ", line), line
    tail = lines[lines.index(next(h for h in heads if "dividing" in h)) + 1]
    assert tail == "    Traceback (most recent call last):"


def test_journal_stream_of_another_file_is_not_the_journal(
    tmp_path: Path,
) -> None:
    stderr = tmp_path / "stderr"
    other = tmp_path / "other"
    other.touch()
    assert run_logging_process(stderr, journal_stream_of(other)) == 1
    lines = stderr.read_text().splitlines()
    assert not any(line.startswith("<") for line in lines)
    assert TIMESTAMP.match(lines[0])


@pytest.mark.parametrize("value", ["", "12", "a:b", "12:", ":34", "1:2:3"])
def test_stderr_is_journal_rejects_malformed_journal_stream(value: str) -> None:
    assert not logs.stderr_is_journal({"JOURNAL_STREAM": value}, 2)


@pytest.mark.parametrize(
    ("level", "priority"),
    [(50, 2), (45, 3), (40, 3), (30, 4), (25, 6), (20, 6), (15, 7), (5, 7)],
)
def test_syslog_priority_of_each_level(level: int, priority: int) -> None:
    assert logs.syslog_priority(level) == priority


# --------------------------------------------------------- the real daemon


@pytest.fixture
def journaled_daemon(
    tmp_path: Path, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Daemon, Any]]:
    # Imported by its module name, as @job requires of a job's module.
    monkeypatch.syspath_prepend(str(SYSTEST_DIR))
    jobs = importlib.import_module("systest_jobs")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(jobs.CREATE_EFFECTS)
    log_path = tmp_path / "daemon.log"
    log_path.touch()
    daemon = Daemon(
        tmp_path,
        daemon_config(
            dsn,
            workers={"count": 2},
            jobs={"allowed_modules": ["jobfns", "systest_jobs"]},
        ),
        env={
            "JOURNAL_STREAM": journal_stream_of(log_path),
            "SYSTEST_EFFECTS_DSN": dsn,
            "PYTHONPATH": os.pathsep.join(
                [str(TESTS_DIR), str(SYSTEST_DIR), str(REPO_ROOT)]
            ),
        },
    )
    assert daemon.log_path == log_path
    yield daemon.start().wait_ready(), Client(dsn)
    daemon.close()


def test_every_line_of_the_daemon_is_prefixed_for_the_journal(
    journaled_daemon: tuple[Daemon, Any],
) -> None:
    daemon, client = journaled_daemon
    posting = client.post("systest_jobs.log_failure", [["job trouble"]] * 2)
    client.wait(posting.id, timeout=30, poll_interval=0.05)
    victim = daemon.workers()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: "worker died" in daemon.log(), timeout=10)
    assert daemon.stop() == 0
    lines = daemon.log().splitlines()
    assert lines
    for line in lines:
        assert JOURNAL_LINE.match(line), line
    seen = {
        (m["who"], int(m["pid"]))
        for m in map(JOURNAL_LINE.match, lines)
        if m is not None
    }
    assert ("supervisor", daemon.pid) in seen
    assert any(who.startswith("worker ") for who, _ in seen)
    assert all(pid == daemon.pid for who, pid in seen if who == "supervisor")
    assert all(
        pid != daemon.pid for who, pid in seen if who.startswith("worker ")
    )
    caught = [line for line in lines if "job trouble" in line]
    assert any(line.startswith("<3>[worker ") for line in caught)
    traceback_lines = [line for line in lines if "Traceback" in line]
    assert traceback_lines
    assert all(line.startswith("<3>[worker ") for line in traceback_lines)
    died = next(line for line in lines if "worker died" in line)
    assert died.startswith(f"<4>[supervisor:{daemon.pid}] ")
