"""The PostgreSQL the tests stand on: fixtures and the throwaway cluster."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from devtools.devcluster import LocalCluster

_seen_empty_databases: list[str] = []


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[LocalCluster]:
    """A cluster of this module's own, so the session's stays undisturbed."""
    base_dir = Path(tempfile.mkdtemp(prefix="pdoflowd-pg-"))
    try:
        with LocalCluster(base_dir, settings={"work_mem": "8MB"}) as cluster:
            yield cluster
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


def _dbname(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


@pytest.mark.parametrize("turn", ["first", "second"])
def test_each_test_gets_its_own_empty_database(
    empty_dsn: str, pg_server: Any, turn: str
) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone()
        assert tables == (0,)
        conn.execute("CREATE TABLE marker (turn text)")
    name = _dbname(empty_dsn)
    assert name not in _seen_empty_databases
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        leftovers = conn.execute(
            "SELECT datname FROM pg_database WHERE datname = ANY(%s)",
            (_seen_empty_databases,),
        ).fetchall()
    assert leftovers == [], "a previous test's database was not dropped"
    _seen_empty_databases.append(name)


def test_dsn_has_the_pdoflowd_schema(dsn: str) -> None:
    pytest.importorskip("pdoflowd.db.migrate")
    with psycopg.connect(dsn) as conn:
        found = conn.execute(
            "SELECT 1 FROM pg_namespace WHERE nspname = 'pdoflowd'"
        ).fetchone()
    assert found == (1,)


def test_drop_database_ends_lingering_sessions(pg_server: Any) -> None:
    name = "t_lingering_" + uuid.uuid4().hex[:12]
    lingering = psycopg.connect(pg_server.create_database(name))
    try:
        pg_server.drop_database(name)
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            found = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
        assert found is None
    finally:
        lingering.close()


def test_dsn_connects_over_tcp_to_the_chosen_port(
    own_cluster: LocalCluster,
) -> None:
    with psycopg.connect(own_cluster.dsn()) as conn:
        row = conn.execute(
            "SELECT host(inet_server_addr()), inet_server_port()"
        ).fetchone()
    assert row == ("127.0.0.1", own_cluster.port)


def test_settings_are_applied_over_the_defaults(
    own_cluster: LocalCluster,
) -> None:
    with psycopg.connect(own_cluster.dsn()) as conn:
        work_mem = conn.execute("SHOW work_mem").fetchone()
        max_connections = conn.execute("SHOW max_connections").fetchone()
        fsync = conn.execute("SHOW fsync").fetchone()
    assert (work_mem, max_connections, fsync) == (("8MB",), ("200",), ("on",))


def test_restart_keeps_committed_data_and_port(
    own_cluster: LocalCluster,
) -> None:
    dsn = own_cluster.create_database("t_restart")
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE kept (v int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    port = own_cluster.port
    own_cluster.restart()
    with psycopg.connect(own_cluster.dsn("t_restart")) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [(42,)]
    assert own_cluster.port == port
    own_cluster.drop_database("t_restart")


def test_kill_then_start_recovers_committed_data(
    own_cluster: LocalCluster,
) -> None:
    dsn = own_cluster.create_database("t_crash")
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE kept (v int)")
        conn.execute("INSERT INTO kept VALUES (7)")
    own_cluster.kill()
    assert not own_cluster.running
    own_cluster.start()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [(7,)]
    own_cluster.drop_database("t_crash")


def test_start_failure_reports_the_server_log(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "pg", settings={"work_mem": "lots"})
    cluster.init()
    with pytest.raises(RuntimeError, match="work_mem"):
        cluster.start()
    assert not cluster.running
