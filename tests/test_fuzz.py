"""Hostile text through every input of the client and the ``pdoflow``
command: each is refused cleanly, or stored and read back byte for byte,
and the schema is intact afterwards."""

from __future__ import annotations

import io
import math
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdoflowd.cli import main
from pdoflowd.client import (
    Client,
    JobDefinition,
    PostingError,
    PostingStateError,
)
from pdoflowd.sharedvars import SharedVariableError

NASTY = [
    "'",
    '"',
    "\\",
    "\\'",
    "''",
    "\x00",
    "a\x00b",
    "\ud800",
    "%s",
    "%(uuid)s",
    "{}",
    "$$",
    "$1",
    "'; DROP TABLE pdoflowd.jobs; --",
    '"); DELETE FROM pdoflowd.postings; --',
    "Robert'); DROP TABLE students;--",
    "\n",
    "\r\n",
    "\t",
    "\u202e",
    "🎉",
    "\U0001d518\U0001d52b\U0001d526",
    "x" * 100_000,
    "é" * 5000,
    "__pdoflowd_float__",
    "__pdoflowd_dict__",
    "nan",
    "gpu",
    "cancelled",
    "finished",
    "jobfns.noop",
    "a.b",
    "a.b\n",
    str(uuid.uuid4()),
    "{" + str(uuid.uuid4()) + "}",
]
hostile = (
    st.sampled_from(NASTY)
    | st.text(
        alphabet=st.characters(blacklist_categories=("Cs",)),
        max_size=50,
    )
    | st.text(max_size=300)
)

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def schema_fingerprint(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT c.relname, c.relkind, a.attname, a.atttypid::regtype::text"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0"
            "  AND NOT a.attisdropped"
            " WHERE n.nspname IN ('pdoflowd', 'public')"
            " UNION ALL SELECT p.proname, 'f', NULL, NULL FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'pdoflowd'"
            " UNION ALL SELECT polname, 'p', NULL, NULL FROM pg_policy"
            " ORDER BY 1, 2, 3"
        ).fetchall()


@pytest.fixture
def intact(dsn: str) -> Iterator[str]:
    """The test's database; its schema must come out as it went in."""
    before = schema_fingerprint(dsn)
    yield dsn
    assert schema_fingerprint(dsn) == before
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pdoflowd.schema_migrations"
        ).fetchone()
    assert row is not None and row[0] >= 2


def stored_posting(dsn: str, posting: uuid.UUID) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        row = cur.execute(
            "SELECT * FROM pdoflowd.postings WHERE uuid = %s", (posting,)
        ).fetchone()
    assert row is not None
    return dict(row)


def storable(text: str) -> bool:
    return "\x00" not in text and not any(
        0xD800 <= ord(c) <= 0xDFFF for c in text
    )


@FUZZ
@given(entry_point=hostile)
def test_hostile_entry_points(intact: str, entry_point: str) -> None:
    try:
        posting = Client(intact).post(entry_point, [[1]])
    except PostingError:
        return
    assert stored_posting(intact, posting.id)["entry_point"] == entry_point


@FUZZ
@given(name=hostile)
def test_hostile_job_names(intact: str, name: str) -> None:
    definition = JobDefinition(
        function=print, name=name, entry_point="fuzz.job"
    )
    try:
        posting = Client(intact).post(definition, [[1]])
    except PostingError:
        assert not name or not storable(name)
        return
    assert stored_posting(intact, posting.id)["target_function"] == name


@FUZZ
@given(requires=st.lists(hostile, max_size=4))
def test_hostile_requirements(intact: str, requires: list[str]) -> None:
    try:
        posting = Client(intact).post("fuzz.job", [[1]], requires=requires)
    except PostingError:
        assert not all(r.strip() and storable(r) for r in requires)
        return
    stored = stored_posting(intact, posting.id)["requires"]
    assert stored == list(dict.fromkeys(requires))


@FUZZ
@given(
    value=hostile,
    key=hostile,
    number=st.floats(allow_nan=True, allow_infinity=True),
)
def test_hostile_arguments(
    intact: str, value: str, key: str, number: float
) -> None:
    client = Client(intact)
    args = [value, {key: [value, number]}]
    try:
        posting = client.post("fuzz.job", [args])
    except PostingError:
        assert not (storable(value) and storable(key))
        return
    with psycopg.connect(intact) as conn:
        row = conn.execute(
            "SELECT posargs FROM pdoflowd.jobs WHERE uuid = %s",
            (posting.job_ids[0],),
        ).fetchone()
    assert row is not None
    from pdoflowd.arguments import decode

    back = decode(row[0])
    assert back[0] == value
    [(back_key, (back_value, back_number))] = back[1].items()
    assert (back_key, back_value) == (key, value)
    # Finite floats come back as jsonb kept them (1e16 and more as ints).
    assert float(back_number) == number or (
        math.isnan(number) and math.isnan(back_number)
    )


@FUZZ
@given(name=hostile, value=hostile)
def test_hostile_shared_variables(intact: str, name: str, value: str) -> None:
    client = Client(intact)
    shared = client.shared(client.post("fuzz.job", [[1]]).id)
    try:
        shared.set(name, {value: value})
    except SharedVariableError:
        assert not (name and storable(name) and storable(value)) or (
            len(name.encode()) > 1024
        )
        return
    assert shared.get(name) == {value: value}
    assert shared.update(name, lambda v: [v, value]) == [{value: value}, value]
    assert shared.all() == {name: [{value: value}, value]}


@FUZZ
@given(ident=hostile, status=hostile)
def test_hostile_posting_ids_and_statuses(
    intact: str, ident: str, status: str
) -> None:
    client = Client(intact)
    for call in (
        lambda: client.status(ident),
        lambda: client.cancel(ident),
        lambda: client.retry(ident),
        lambda: client.results(ident),
        lambda: client.shared(ident).get("x"),
        lambda: client.set_status(ident, status),
    ):
        with pytest.raises((KeyError, PostingStateError)):
            call()
    posting = client.post("fuzz.job", [[1]], paused=True)
    try:
        client.set_status(posting.id, status)
    except PostingStateError:
        assert (
            status
            not in (
                "paused",
                "executing",
                "finished",
                "errored_out",
                "cancelled",
            )
            or status == "paused"
        )
        return
    assert client.status(posting.id).status.value == status


def run_cli(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    stdin: bytes = b"",
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    try:
        code = main(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@FUZZ
@given(
    text=hostile,
    verb=st.sampled_from(
        [
            "status",
            "wait",
            "posting-status",
            "cancel",
            "pause",
            "resume",
            "retry",
            "results",
            "execute-job",
        ]
    ),
)
def test_hostile_cli_arguments(
    intact: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    verb: str,
) -> None:
    args = ["--dsn", intact, verb, text]
    if verb == "wait":
        args += ["--timeout", "0"]
    if verb == "execute-job":
        config = tmp_path / "pdoflowd.toml"
        config.write_text('[jobs]\nallowed_modules = ["jobfns"]\n')
        args += ["--config", str(config)]
    code, out, err = run_cli(monkeypatch, capsys, args)
    assert code == 64, err
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("pdoflow: ")
    assert "Traceback" not in err


@FUZZ
@given(entry_point=hostile, line=hostile, requires=hostile, status=hostile)
def test_hostile_cli_submissions(
    intact: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    entry_point: str,
    line: str,
    requires: str,
    status: str,
) -> None:
    import json

    payload = json.dumps([line]).encode("utf-8", "surrogatepass") + b"\n"
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        ["--dsn", intact, "submit", entry_point, "--requires", requires],
        payload,
    )
    if code != 0:
        assert code == 64, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        return
    posting = uuid.UUID(out.strip())
    stored = stored_posting(intact, posting)
    assert (stored["entry_point"], stored["requires"]) == (
        entry_point,
        [requires],
    )
    with psycopg.connect(intact) as conn:
        row = conn.execute(
            "SELECT posargs FROM pdoflowd.jobs WHERE posting_id = %s",
            (stored["id"],),
        ).fetchone()
    assert row == ([line],)
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        ["--dsn", intact, "set-posting-status", str(posting), status],
    )
    assert code in (0, 64), err
    assert len(err.splitlines()) <= 1 and "Traceback" not in err
