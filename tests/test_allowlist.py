"""Only registered code runs: a hostile poster's entry points, for real.

A submitter role (granted as ``pdoflowd migrate --grant-submitter`` grants
it) posts entry points that name code other than a ``@job`` function under
``jobs.allowed_modules``: names the allowed module merely imported, a class,
a bound method, a partial, a special attribute, a job defined elsewhere.
Each payload would write a marker file; none may exist afterwards, and
each job must end errored out on its first try as refused, counted as such.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import clientjobs
import psycopg
import pytest

from devtools.devcluster import free_port
from harness import (
    REPO_ROOT,
    TESTS_DIR,
    Daemon,
    Roles,
    create_effects_table,
    daemon_config,
    grant,
    wait_until,
    write_config,
)
from pdoflowd import entrypoints
from pdoflowd.client import Client, JobDefinition, PostingError
from pdoflowd.status import PostingStatus
from scrape import parse_scrape, scrape_sum

# The application package the daemon allows, with the names an attacker
# would reach through it. Each payload writes the file it is given.
_TASKS = """
import functools
import importlib
import os
import subprocess
from os import system

from pdoflowd import job
from outside import marked_elsewhere


def _write(path, text):
    with open(path, "w") as marker:
        marker.write(text)


@job()
def ok(path):
    _write(path, "ok")


def plain(path):
    _write(path, "plain")


class Thing:
    def __init__(self, path):
        _write(path, "class")

    def method(self, path):
        _write(path, "method")


bound = Thing.__new__(Thing).method
partial = functools.partial(ok)
run = subprocess.run
"""

_OUTSIDE = """
from pdoflowd import job


@job()
def marked_elsewhere(path):
    with open(path, "w") as marker:
        marker.write("outside")
"""

_PAYLOAD = """
import os
with open(os.environ["PDOFLOWD_TEST_MARKER"], "w") as marker:
    marker.write("imported")
"""


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """``myapp`` (allowed) and ``outside``/``payload`` (not) in tmp_path."""
    package = tmp_path / "myapp"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("import os\n")
    (package / "tasks.py").write_text(textwrap.dedent(_TASKS))
    (tmp_path / "outside.py").write_text(textwrap.dedent(_OUTSIDE))
    (tmp_path / "payload.py").write_text(textwrap.dedent(_PAYLOAD))
    return tmp_path


def start_daemon(
    dsn: str, app: Path, marker: Path, port: int, **jobs: Any
) -> Daemon:
    create_effects_table(dsn)
    config = daemon_config(
        dsn,
        jobs={"allowed_modules": ["myapp"], **jobs},
        metrics={"listen": f"127.0.0.1:{port}"},
    )
    daemon = Daemon(
        app, config, effects_dsn=dsn, env={"PDOFLOWD_TEST_MARKER": str(marker)}
    )
    return daemon.start().wait_ready()


def job_rows(dsn: str, posting: Any) -> list[tuple[str, int, str | None]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT j.status, j.attempt, j.error FROM pdoflowd.jobs AS j"
            " JOIN pdoflowd.postings AS p ON p.id = j.posting_id"
            " WHERE p.uuid = %s",
            (posting,),
        ).fetchall()


def refused_count(port: int) -> float:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return scrape_sum(
        parse_scrape(text), "pdoflowd_jobs_processed_total", outcome="refused"
    )


# Each entry point and its arguments: [[marker path]] is filled in.
_ATTACKS = {
    "an imported module's function": ("myapp.tasks.os.system", "shell"),
    "a function imported by name": ("myapp.tasks.system", "shell"),
    "importlib through the module": (
        "myapp.tasks.importlib.import_module",
        "payload",
    ),
    "a subpackage's import": ("myapp.sub.os.system", "shell"),
    "a module's builtins": ("myapp.tasks.__builtins__.exec", "python"),
    "builtins in colon form": ("myapp.tasks:__builtins__", "path"),
    "a class": ("myapp.tasks.Thing", "path"),
    "a method through its class": ("myapp.tasks.Thing.method", "path"),
    "a bound method": ("myapp.tasks.bound", "path"),
    "a partial of a job": ("myapp.tasks.partial", "path"),
    "a stdlib function assigned": ("myapp.tasks.run", "argv"),
    "an unmarked function": ("myapp.tasks.plain", "path"),
    "a job defined outside": ("myapp.tasks.marked_elsewhere", "path"),
    "a module outside": ("outside.marked_elsewhere", "path"),
}


def crafted(entry_point: str) -> JobDefinition:
    """A posting target with any entry point, as a hostile poster's own
    code can write it: the client's own checks are not a defence."""
    return JobDefinition(function=print, name="attack", entry_point=entry_point)


def arguments(kind: str, marker: Path) -> list[Any]:
    return {
        "shell": [f"touch {marker}"],
        "payload": ["payload"],
        "python": [f"open({str(marker)!r}, 'w').close()"],
        "path": [str(marker)],
        "argv": [["touch", str(marker)]],
    }[kind]


def test_no_crafted_entry_point_runs_anything(
    dsn: str, roles: Roles, app: Path
) -> None:
    poster = roles.make()
    grant(dsn, submitters=[poster])
    marker = app / "marker"
    port = free_port()
    daemon = start_daemon(dsn, app, marker, port)
    try:
        client = Client(roles.dsn_of(poster))
        postings = {}
        for name, (entry_point, kind) in _ATTACKS.items():
            posting = client.post(
                crafted(entry_point), [arguments(kind, marker)], tries=3
            )
            postings[name] = posting.id
        for name, posting_id in postings.items():
            state = client.wait(posting_id, timeout=30, poll_interval=0.05)
            assert state.jobs["errored_out"] == 1, name
        assert not marker.exists(), marker.read_text()
        for name, posting_id in postings.items():
            [(status, attempt, error)] = job_rows(dsn, posting_id)
            assert (status, attempt) == ("errored_out", 1), (name, error)
            assert error is not None
        refused = [
            name
            for name, posting_id in postings.items()
            if (job_rows(dsn, posting_id)[0][2] or "").startswith("refused:")
        ]
        assert len(refused) == len(_ATTACKS)
        # Counted when the workers next report (at once when idle).
        wait_until(lambda: refused_count(port) == len(refused), timeout=10)
        assert daemon.stop() == 0
    finally:
        daemon.close()
    assert "Traceback" not in daemon.log()


def test_a_job_marked_and_defined_under_the_allowlist_runs(
    dsn: str, roles: Roles, app: Path
) -> None:
    poster = roles.make()
    grant(dsn, submitters=[poster])
    marker = app / "marker"
    daemon = start_daemon(dsn, app, marker, free_port())
    try:
        client = Client(roles.dsn_of(poster))
        for entry_point in ("myapp.tasks.ok", "myapp.tasks:ok"):
            marker.unlink(missing_ok=True)
            posting = client.post(entry_point, [[str(marker)]])
            state = client.wait(posting.id, timeout=30, poll_interval=0.05)
            assert state.status is PostingStatus.FINISHED, daemon.log()
            assert marker.read_text() == "ok"
    finally:
        daemon.close()


def test_allow_unmarked_runs_plain_functions_defined_under_the_allowlist(
    dsn: str, roles: Roles, app: Path
) -> None:
    poster = roles.make()
    grant(dsn, submitters=[poster])
    marker = app / "marker"
    daemon = start_daemon(dsn, app, marker, free_port(), allow_unmarked=True)
    try:
        client = Client(roles.dsn_of(poster))
        posting = client.post("myapp.tasks.plain", [[str(marker)]])
        state = client.wait(posting.id, timeout=30, poll_interval=0.05)
        assert state.status is PostingStatus.FINISHED, daemon.log()
        assert marker.read_text() == "plain"
        marker.unlink()
        # Still only functions defined under the allowlist.
        for entry_point, kind in (
            ("myapp.tasks.system", "shell"),
            ("myapp.tasks.run", "argv"),
            ("myapp.tasks.marked_elsewhere", "path"),
        ):
            posting = client.post(entry_point, [arguments(kind, marker)])
            state = client.wait(posting.id, timeout=30, poll_interval=0.05)
            assert state.jobs["errored_out"] == 1, entry_point
            [(_, attempt, error)] = job_rows(dsn, posting.id)
            assert attempt == 1
            assert error is not None and error.startswith("refused:"), error
        assert not marker.exists()
    finally:
        daemon.close()


def test_execute_job_resolves_by_the_same_rule(
    dsn: str, roles: Roles, app: Path
) -> None:
    poster = roles.make()
    grant(dsn, submitters=[poster])
    marker = app / "marker"
    config = write_config(
        app / "fg.toml", {"jobs": {"allowed_modules": ["myapp"]}}
    )
    client = Client(roles.dsn_of(poster))
    for entry_point, kind in (
        ("myapp.tasks.os.system", "shell"),
        ("myapp.tasks.Thing", "path"),
        ("myapp.tasks.plain", "path"),
    ):
        posting = client.post(crafted(entry_point), [arguments(kind, marker)])
        done = subprocess.run(
            [
                *(sys.executable, "-m", "pdoflowd.cli", "--dsn", dsn),
                *("execute-job", str(posting.job_ids[0])),
                *("--config", str(config)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=app,
            env={**os.environ, "PYTHONPATH": f"{app}:{TESTS_DIR}:{REPO_ROOT}"},
            check=False,
        )
        assert done.returncode == 64, (entry_point, done.stderr)
        assert "refused" in done.stderr
        [(status, attempt, _)] = job_rows(dsn, posting.id)
        assert (status, attempt) == ("waiting", 0)
    assert not marker.exists()


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("entry_point", "expected"),
    [
        ("a.b", ("a", "b")),
        ("a.b.c", ("a.b", "c")),
        ("a.b:c", ("a.b", "c")),
        ("a:c", ("a", "c")),
    ],
)
def test_an_entry_point_is_a_module_and_one_attribute(
    entry_point: str, expected: tuple[str, str]
) -> None:
    assert entrypoints.split_entry_point(entry_point) == expected


@pytest.mark.parametrize(
    "entry_point",
    ["a", "a.", ".a", "a..b", "a:b.c", "a:b:c", "a.__dict__", "a:__call__", ""],
)
def test_anything_else_is_refused(entry_point: str) -> None:
    with pytest.raises(entrypoints.EntryPointRefused):
        entrypoints.split_entry_point(entry_point)


def test_a_prefix_must_end_at_a_dot() -> None:
    allowed = ("myapp",)
    assert entrypoints.module_allowed("myapp", allowed)
    assert entrypoints.module_allowed("myapp.tasks", allowed)
    assert not entrypoints.module_allowed("myapplication", allowed)
    assert not entrypoints.module_allowed("os", allowed)


def test_a_module_outside_the_allowlist_is_never_imported(
    app: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = app / "marker"
    monkeypatch.syspath_prepend(str(app))
    monkeypatch.setenv("PDOFLOWD_TEST_MARKER", str(marker))
    with pytest.raises(entrypoints.EntryPointRefused):
        entrypoints.resolve("payload.anything", ("myapp",))
    assert not marker.exists()


def test_a_wrapper_copying_the_marker_is_not_a_job() -> None:
    import functools

    def inner() -> None:
        pass

    entrypoints.mark(inner)

    @functools.wraps(inner)
    def wrapper() -> None:
        pass

    assert entrypoints.is_marked(inner)
    assert not entrypoints.is_marked(wrapper)


@pytest.mark.parametrize(
    "target",
    [Client.post, clientjobs.Shapes.area, clientjobs.Shapes().perimeter],
    ids=["a class's function", "a classmethod", "a bound method"],
)
def test_the_client_refuses_what_no_worker_would_run(
    dsn: str, target: Any
) -> None:
    with pytest.raises(PostingError, match="module-level function"):
        Client(dsn).post(target, [[]])
