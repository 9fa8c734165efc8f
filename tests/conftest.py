"""PostgreSQL for the tests: one server per session, one database per test.

The server is, in order of preference:

1. the one named by ``PDOFLOWD_TEST_DSN`` (its user needs CREATEDB; it cannot
   be restarted from the tests, so outage tests skip);
2. a testcontainers PostgreSQL when a Docker engine answers (set
   ``PDOFLOWD_TEST_DOCKER=0`` to skip the probe; it cannot be restarted either);
3. a throwaway ``devtools.devcluster.LocalCluster`` in a temp directory,
   removed at the end of the session.

Fixtures: ``pg_server`` (session), ``pdoflowd_template`` (session: a template
database migrated to the current schema), ``empty_dsn`` (a fresh database
without the schema) and ``dsn`` (a fresh database with the schema current).
Tests that stop or crash the server call ``pytest.skip`` unless
``pg_server.can_restart``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from devtools import devcluster

TEMPLATE_DATABASE = "pdoflowd_template"
_DOCKER_IMAGE = "postgres:15"
_DOCKER_PROBE_TIMEOUT_S = 5


class RemoteServer:
    """A server reached through a DSN: databases yes, restarts no."""

    can_restart = False

    def __init__(
        self,
        admin_dsn: str,
        description: str,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._admin_dsn = admin_dsn
        self.description = description
        self._on_close = on_close

    def dsn(self, dbname: str | None = None) -> str:
        if dbname is None:
            return self._admin_dsn
        return make_conninfo(self._admin_dsn, dbname=dbname)

    def create_database(self, name: str, template: str | None = None) -> str:
        devcluster.create_database(self._admin_dsn, name, template)
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        devcluster.drop_database(self._admin_dsn, name)

    @property
    def running(self) -> bool:
        return True

    def start(self) -> None:
        raise NotImplementedError(f"{self.description} is not ours to start")

    def restart(self) -> None:
        raise NotImplementedError(f"{self.description} is not ours to restart")

    def kill(self) -> None:
        raise NotImplementedError(f"{self.description} is not ours to kill")

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()


class SessionCluster(devcluster.LocalCluster):
    """The throwaway local cluster, with the interface of RemoteServer."""

    can_restart = True

    @property
    def description(self) -> str:
        return f"local cluster at 127.0.0.1:{self.port} ({self.bin_dir})"

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)


@dataclass(frozen=True)
class _Choice:
    kind: str  # "dsn", "docker" or "local"
    header: str
    dsn: str = ""
    port: int = 0


def _docker_engine_answers() -> bool:
    if os.environ.get("PDOFLOWD_TEST_DOCKER", "1") == "0":
        return False
    try:
        import docker
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=_DOCKER_PROBE_TIMEOUT_S)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def _redacted(dsn: str) -> str:
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable DSN)"
    params.pop("password", None)
    return make_conninfo("", **params)


@functools.cache
def _choose_server() -> _Choice:
    """Decide once per process which server the session uses."""
    explicit = os.environ.get("PDOFLOWD_TEST_DSN", "").strip()
    if explicit:
        return _Choice(
            "dsn",
            f"explicit DSN from PDOFLOWD_TEST_DSN: {_redacted(explicit)}",
            dsn=explicit,
        )
    if _docker_engine_answers():
        return _Choice("docker", f"testcontainers ({_DOCKER_IMAGE})")
    try:
        bin_dir = devcluster.find_bin_dir()
    except RuntimeError as error:
        return _Choice("local", f"local cluster unavailable: {error}")
    port = devcluster.free_port()
    return _Choice(
        "local", f"local cluster at 127.0.0.1:{port} ({bin_dir})", port=port
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f"pdoflowd PostgreSQL: {_choose_server().header}"


def _start_container() -> RemoteServer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:
            from testcontainers.postgres import PostgresContainer
    container: Any = PostgresContainer(_DOCKER_IMAGE)
    container.with_command("postgres -c max_connections=200")
    container.start()
    # The URL names a SQLAlchemy driver; libpq wants the bare scheme.
    url = re.sub(
        r"^postgresql\+\w+://", "postgresql://", container.get_connection_url()
    )
    return RemoteServer(
        url, f"testcontainers {_DOCKER_IMAGE}", on_close=container.stop
    )


def _start_local_cluster(port: int) -> SessionCluster:
    base_dir = Path(tempfile.mkdtemp(prefix="pdoflowd-pg-"))
    cluster = SessionCluster(base_dir, port=port or None)
    try:
        cluster.init()
        cluster.start()
    except BaseException:
        shutil.rmtree(base_dir, ignore_errors=True)
        raise
    return cluster


@pytest.fixture(scope="session")
def pg_server() -> Iterator[RemoteServer | SessionCluster]:
    """The session's PostgreSQL server (see the module docstring)."""
    choice = _choose_server()
    server: RemoteServer | SessionCluster
    if choice.kind == "dsn":
        server = RemoteServer(choice.dsn, choice.header)
    elif choice.kind == "docker":
        server = _start_container()
    else:
        server = _start_local_cluster(choice.port)
    try:
        yield server
    finally:
        server.close()


def _unique_name(prefix: str = "t_") -> str:
    return prefix + uuid.uuid4().hex[:12]


def _drop_template(server: RemoteServer | SessionCluster, name: str) -> None:
    # A template database cannot be dropped until it is an ordinary one.
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if exists:
            conn.execute(
                sql.SQL(
                    "ALTER DATABASE {} WITH IS_TEMPLATE false"
                    " ALLOW_CONNECTIONS true"
                ).format(sql.Identifier(name))
            )
    server.drop_database(name)


@pytest.fixture(scope="session")
def pdoflowd_template(
    pg_server: RemoteServer | SessionCluster,
) -> Iterator[str]:
    """Name of a template database migrated to the current schema."""
    try:
        from pdoflowd.db.migrate import upgrade
    except ModuleNotFoundError as error:
        if error.name not in ("pdoflowd", "pdoflowd.db.migrate"):
            raise
        pytest.skip(f"no schema to test against: {error}")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    name = f"{TEMPLATE_DATABASE}_{worker}" if worker else TEMPLATE_DATABASE
    _drop_template(pg_server, name)
    template_dsn = pg_server.create_database(name)
    try:
        upgrade(template_dsn)
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            # No session may linger in a template while it is being copied.
            conn.execute(
                sql.SQL(
                    "ALTER DATABASE {} WITH IS_TEMPLATE true"
                    " ALLOW_CONNECTIONS false"
                ).format(sql.Identifier(name))
            )
        yield name
    finally:
        if pg_server.can_restart and not pg_server.running:
            pg_server.start()
        _drop_template(pg_server, name)


def _fresh_database(
    server: RemoteServer | SessionCluster, template: str | None
) -> Iterator[str]:
    name = _unique_name()
    database_dsn = server.create_database(name, template=template)
    try:
        yield database_dsn
    finally:
        # A test may leave the server stopped or crashed; bring it back.
        if server.can_restart and not server.running:
            server.start()
        server.drop_database(name)


@pytest.fixture
def empty_dsn(pg_server: RemoteServer | SessionCluster) -> Iterator[str]:
    """DSN of a fresh database without the pdoflowd schema."""
    yield from _fresh_database(pg_server, template=None)


@pytest.fixture
def dsn(
    pg_server: RemoteServer | SessionCluster, pdoflowd_template: str
) -> Iterator[str]:
    """DSN of a fresh database with the pdoflowd schema current."""
    yield from _fresh_database(pg_server, template=pdoflowd_template)


@pytest.fixture(scope="session")
def promtool() -> str:
    """The path of promtool; the test is skipped, loudly, without it."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "PROMTOOL MISSING: the Prometheus format is not checked; install"
            " it (Debian: apt-get install prometheus)"
        )
    return path


@pytest.fixture
def effects_dsn(dsn: str) -> str:
    """``dsn`` with the ``effects`` table the test job functions write."""
    from harness import create_effects_table

    create_effects_table(dsn)
    return dsn


@pytest.fixture
def daemons(tmp_path: Path, effects_dsn: str) -> Iterator[Any]:
    """Start real daemons on ``effects_dsn``: ``daemons(**overrides)``.

    Each waits for READY=1 unless ``ready=False``; all are stopped (and
    their workers killed) at the end of the test.
    """
    from harness import Daemon, daemon_config

    made: list[Daemon] = []

    def make(ready: bool = True, **overrides: Any) -> Daemon:
        daemon = Daemon(
            tmp_path,
            daemon_config(effects_dsn, **overrides),
            effects_dsn=effects_dsn,
            name=f"daemon{len(made)}",
        )
        made.append(daemon)
        daemon.start()
        return daemon.wait_ready() if ready else daemon

    yield make
    for daemon in made:
        daemon.close()


@pytest.fixture
def roles(dsn: str) -> Iterator[Any]:
    """Login roles made for one test, dropped with what they own after."""
    from harness import Roles

    made = Roles(dsn)
    try:
        yield made
    finally:
        made.drop()


@pytest.fixture
def empty_roles(empty_dsn: str) -> Iterator[Any]:
    """Roles for tests of a database without the schema (migrated later)."""
    from harness import Roles

    made = Roles(empty_dsn)
    try:
        yield made
    finally:
        made.drop()


@pytest.fixture
def submitters(dsn: str, roles: Any) -> tuple[str, str]:
    """The DSNs of two roles granted a submitter's privileges."""
    from harness import grant

    alice, bob = roles.make(), roles.make()
    grant(dsn, submitters=[alice, bob])
    return roles.dsn_of(alice), roles.dsn_of(bob)
