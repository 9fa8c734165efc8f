"""Finding the database: the order of the sources, the seed's db.conf, and
passwords kept out of what the client shows."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pdoflowd.cli import redact
from pdoflowd.client import (
    Client,
    ConnectionConfigError,
    read_seed_config,
    resolve_connection,
)


def seed_config(home: Path, text: str) -> Path:
    path = home / ".config" / "pdoflow" / "db.conf"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def test_an_explicit_dsn_comes_first(tmp_path: Path) -> None:
    seed_config(tmp_path, "[postgresql]\nhost = seed\n")
    environ = {"PDOFLOW_DSN": "host=env", "PGHOST": "pg", "HOME": str(tmp_path)}
    assert resolve_connection("host=given", environ).dsn == "host=given"


def test_pdoflow_dsn_comes_before_libpq_and_the_seed_file(
    tmp_path: Path,
) -> None:
    seed_config(tmp_path, "[postgresql]\nhost = seed\n")
    environ = {"PDOFLOW_DSN": "host=env", "PGHOST": "pg", "HOME": str(tmp_path)}
    assert resolve_connection(None, environ).dsn == "host=env"


@pytest.mark.parametrize("variable", ["PGHOST", "PGDATABASE", "PGSERVICE"])
def test_libpq_environment_comes_before_the_seed_file(
    tmp_path: Path, variable: str
) -> None:
    seed_config(tmp_path, "[postgresql]\nhost = seed\n")
    target = resolve_connection(None, {variable: "x", "HOME": str(tmp_path)})
    assert (target.dsn, target.source) == ("", f"${variable}")


def test_the_seed_file_is_used_last(tmp_path: Path) -> None:
    path = seed_config(
        tmp_path,
        "[postgresql]\nuser = alice\npassword = s%cr=t 'x\nhost = db1\n"
        "port = 5433\ndatabase = jobs\n",
    )
    target = resolve_connection(None, {"HOME": str(tmp_path)})
    assert conninfo_to_dict(target.dsn) == {
        "user": "alice",
        "host": "db1",
        "port": "5433",
        "dbname": "jobs",
    }
    assert target.password == "s%cr=t 'x"
    assert target.source == str(path)
    assert "s%cr" not in repr(target)


def test_without_any_source_libpq_defaults_apply(tmp_path: Path) -> None:
    target = resolve_connection(None, {"HOME": str(tmp_path)})
    assert (target.dsn, target.password) == ("", None)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[other]\nhost = x\n", "has no [postgresql] section"),
        ("host = x\n", "not an INI file"),
        ("[postgresql]\npasswd = secret\n", "unknown key 'passwd'"),
        ("[postgresql]\nport = fifty\npassword = secret\n", "port must be"),
    ],
)
def test_a_broken_seed_file_is_named_without_its_values(
    tmp_path: Path, text: str, problem: str
) -> None:
    seed_config(tmp_path, text)
    with pytest.raises(ConnectionConfigError) as caught:
        resolve_connection(None, {"HOME": str(tmp_path)})
    assert problem in str(caught.value)
    assert "secret" not in str(caught.value)
    assert "fifty" not in str(caught.value)


def test_a_seed_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    path = seed_config(tmp_path, "")
    path.write_bytes(b"[postgresql]\nhost = \xff\n")
    with pytest.raises(ConnectionConfigError, match="cannot read"):
        read_seed_config(path)


def test_a_malformed_dsn_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConnectionConfigError) as caught:
        Client("password=se cret host")
    assert "cret" not in str(caught.value)


def test_the_client_reaches_the_database_through_the_seed_file(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = conninfo_to_dict(dsn)
    seed_config(
        tmp_path,
        "[postgresql]\n"
        f"user = {params.get('user', '')}\n"
        f"host = {params.get('host', '')}\n"
        f"port = {params.get('port', '')}\n"
        f"database = {params['dbname']}\n",
    )
    for name in list(os.environ):
        if name.startswith("PG") or name == "PDOFLOW_DSN":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    posting = Client().post("jobfns.noop", [[1]])
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT uuid FROM pdoflowd.postings").fetchone()
    assert row == (posting.id,)


# ---------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    "text",
    [
        "connection to host=db1 password=hunter2 failed",
        "connection to host=db1 password = 'hun ter2' failed",
        "could not reach postgresql://alice:hunter2@db1/jobs",
    ],
)
def test_passwords_in_messages_are_redacted(text: str) -> None:
    shown = redact(text)
    assert "hunter2" not in shown and "hun ter2" not in shown
    assert "***" in shown


def test_known_secrets_are_redacted_wherever_they_appear() -> None:
    assert redact("user hunter2 denied", ["hunter2"]) == "user *** denied"


def test_cli_errors_never_show_the_password_of_the_dsn(tmp_path: Path) -> None:
    secret = "pw-" + uuid.uuid4().hex
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PG") and k != "PDOFLOW_DSN"
    }
    for dsn in (
        f"host=127.0.0.1 port=1 password={secret} connect_timeout=2",
        f"postgresql://u:{secret}@127.0.0.1:1/db?connect_timeout=2",
        f"host=127.0.0.1 port=notaport password={secret}",
        f"password={secret} host",
    ):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pdoflowd.cli",
                "--dsn",
                dsn,
                "status",
                str(uuid.uuid4()),
            ],
            capture_output=True,
            text=True,
            env=environ,
            timeout=60,
        )
        assert done.returncode in (64, 69), done.stderr
        assert secret not in done.stderr + done.stdout
        assert len(done.stderr.splitlines()) == 1, done.stderr
