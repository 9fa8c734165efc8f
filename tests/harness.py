"""Drive the real daemon as a subprocess: config, start, signals, stop.

Readiness is learnt the way systemd learns it: the harness binds a real
AF_UNIX datagram socket, passes it as NOTIFY_SOCKET, and reads READY=1
(devtools.daemonproc, shared with the benchmark and the demo).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

# SESSION_NAME and children_of stay importable from the harness.
from devtools.daemonproc import SESSION_NAME as SESSION_NAME
from devtools.daemonproc import (
    DaemonProcess,
    NotifySocket,
    pdoflowd_command,
    write_config,
)
from devtools.daemonproc import children_of as children_of
from pdoflowd.db import migrate

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def daemon_config(dsn: str, **overrides: Any) -> dict[str, Any]:
    """A config for tests: short intervals, the test job module allowed.

    An override is a section's keys, or a list of tables for an array of
    tables (``schedules=[{...}, ...]``), which it replaces.
    """
    sections: dict[str, Any] = {
        "database": {"dsn": dsn},
        "workers": {
            "count": 2,
            "batch_size": 5,
            "poll_interval_s": 0.2,
            "drain_timeout_s": 10.0,
        },
        "jobs": {"allowed_modules": ["jobfns"]},
        "metrics": {"listen": ""},
        "daemon": {
            "heartbeat_interval_s": 0.5,
            "host_lease_s": 3.0,
            "maintenance_interval_s": 0.2,
            "log_level": "info",
        },
    }
    for section, values in overrides.items():
        if isinstance(values, (list, tuple)):
            sections[section] = list(values)
        else:
            sections.setdefault(section, {}).update(values)
    return sections


class Daemon(DaemonProcess):
    """One ``pdoflowd run`` subprocess with a notify socket of its own
    (``notify``, when given: the test's own), its config, log and socket
    in ``tmp`` under ``name``."""

    def __init__(
        self,
        tmp: Path,
        config: Mapping[str, Any],
        *,
        effects_dsn: str = "",
        env: Mapping[str, str] | None = None,
        name: str = "daemon",
        notify: NotifySocket | None = None,
    ) -> None:
        self.tmp = tmp
        self.config_path = write_config(tmp / f"{name}.toml", config)
        environ = dict(os.environ)
        environ.update(
            {
                "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT)]),
                "PDOFLOWD_TEST_EFFECTS_DSN": effects_dsn,
            }
        )
        super().__init__(
            pdoflowd_command("run", "--config", str(self.config_path)),
            NotifySocket(tmp / f"{name}.notify") if notify is None else notify,
            output=tmp / f"{name}.log",
            env=environ,
            cwd=tmp,
        )
        self.env.update(env or {})

    @property
    def messages(self) -> list[str]:
        """Every notification read so far, as sent."""
        return [message.text for message in self.notify.received]

    def read_notifications(self, timeout: float) -> Iterator[str]:
        """Notifications as they come, until none for ``timeout`` s."""
        while (message := self.notify.receive(timeout)) is not None:
            yield message.text

    def wait_for_message(self, needle: str, timeout: float = 30.0) -> str:
        """The first notification (already read or new) carrying the
        ``KEY=value`` ``needle``."""
        return self.wait_for(needle, timeout).text

    def wait_for_text(self, text: str, timeout: float = 30.0) -> str:
        """The first message (already read or new) containing ``text``."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages:
                if text in message:
                    return message
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {text!r} within {timeout} s")
            for _ in self.read_notifications(0.2):
                pass

    def kill_host(self) -> None:
        """SIGKILL the supervisor and every worker at once: a dead host."""
        self.kill()


def wait_until(
    predicate: Any, timeout: float = 30.0, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def job_counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT status, count(*) FROM pdoflowd.jobs GROUP BY status"
        ).fetchall()
    return {status: count for status, count in rows}


def create_effects_table(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE effects (id bigserial PRIMARY KEY, key text, "
            "pid int, note text, at timestamptz DEFAULT clock_timestamp())"
        )


class TcpRelay:
    """A TCP relay to ``target``, listening on ``host`` (a free port): the
    path a test can cut, with nftables, or by overriding :meth:`relay`."""

    def __init__(
        self, target: tuple[str, int], host: str = "127.0.0.1"
    ) -> None:
        self.target = target
        self.listener = socket.create_server((host, 0))
        self.host = host
        self.port: int = self.listener.getsockname()[1]
        self.closing = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                if self.closing:
                    return
                continue
            server.settimeout(None)
            self.sockets += [client, server]
            for source, sink, reply in (
                (client, server, False),
                (server, client, True),
            ):
                threading.Thread(
                    target=self._pump, args=(source, sink, reply), daemon=True
                ).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, reply: bool
    ) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not self.relay(data, source, sink, reply):
                    return
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def relay(
        self,
        data: bytes,
        source: socket.socket,
        sink: socket.socket,
        reply: bool,
    ) -> bool:
        """Pass ``data`` on (``reply``: from the server); False ends it."""
        sink.sendall(data)
        return True

    def close(self) -> None:
        self.closing = True
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


# ---------------------------------------------------------------- partitions


def nft(*args: str) -> None:
    subprocess.run(["nft", *args], check=True, capture_output=True, timeout=10)


def nft_unusable(table: str) -> str:
    """Why nftables cannot cut a path here, or "" when it can."""
    if shutil.which("nft") is None:
        return "nft is not installed (Debian: apt-get install nftables)"
    try:
        nft("add", "table", "inet", table)
        nft("delete", "table", "inet", table)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"nft cannot change the firewall here: {exc}"
    return ""


@contextlib.contextmanager
def dropped(table: str, host: str, port: int) -> Iterator[None]:
    """Drop (not refuse) the packets of every connection to host:port, both
    ways, in the nftables table ``table`` (removed afterwards): the replies
    leave from host:port to whatever address the client had, so they are
    matched by their source."""
    nft("add", "table", "inet", table)
    try:
        nft(
            "add chain inet",
            table,
            "out { type filter hook output priority 0 ; }",
        )
        nft(
            "add rule inet",
            table,
            "out",
            f"ip daddr {host} tcp dport {port} drop",
        )
        nft(
            "add rule inet",
            table,
            "out",
            f"ip saddr {host} tcp sport {port} drop",
        )
        yield
    finally:
        nft("delete", "table", "inet", table)


# ---------------------------------------------------------------- roles


class Roles:
    """Login roles made for one test, dropped with everything they own."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.made: list[str] = []
        self.passwords: dict[str, str] = {}

    def make(self, name: str | None = None) -> str:
        role = name or "pdoflowd_t_" + uuid.uuid4().hex[:10]
        password = secrets.token_hex(8)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(password)
                )
            )
        self.made.append(role)
        self.passwords[role] = password
        return role

    def dsn_of(self, role: str) -> str:
        return make_conninfo(self.dsn, user=role, password=self.passwords[role])

    def drop(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for role in self.made:
                conn.execute(
                    sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role))
                )
                conn.execute(
                    sql.SQL("DROP ROLE {}").format(sql.Identifier(role))
                )


def grant(dsn: str, **grants: list[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate.apply_grants(conn, migrate.Grants(**grants))


# What `pdoflowd migrate --grant-submitter` granted at schema version 6.
SUBMITTER_GRANTS_AT_6 = (
    "GRANT USAGE ON SCHEMA pdoflowd TO {role}",
    "GRANT SELECT ON pdoflowd.postings, pdoflowd.jobs,"
    " pdoflowd.shared_variables TO {role}",
    "GRANT INSERT (uuid, target_function, entry_point, status, timeout_s,"
    " requires, store_result, tries) ON pdoflowd.postings TO {role}",
    "GRANT INSERT (uuid, posting_id, priority, posargs, kwargs,"
    " tries_remaining, run_after) ON pdoflowd.jobs TO {role}",
    "GRANT INSERT, UPDATE, DELETE ON pdoflowd.shared_variables TO {role}",
    "GRANT SELECT (provides, posters, stopped_at) ON pdoflowd.daemons"
    " TO {role}",
    "GRANT EXECUTE ON FUNCTION"
    " pdoflowd.control_posting(uuid, text, integer) TO {role}",
)


def migrate_before(conn: psycopg.Connection[Any], marker: str) -> list[int]:
    """Bring an empty database to the schema just before the migration
    whose SQL first mentions ``marker``, as an older pdoflowd left it;
    return the versions an upgrade still has to apply."""
    steps = migrate.migrations()
    at = next(i for i, m in enumerate(steps) if marker in m.sql)
    conn.execute("CREATE SCHEMA pdoflowd")
    conn.execute(
        "CREATE TABLE pdoflowd.schema_migrations (version integer"
        " PRIMARY KEY, name text NOT NULL, applied_at timestamptz"
        " NOT NULL DEFAULT now())"
    )
    for step in steps[:at]:
        conn.execute(step.sql.encode())
        conn.execute(
            "INSERT INTO pdoflowd.schema_migrations (version, name)"
            " VALUES (%s, %s)",
            (step.version, step.name),
        )
    return [m.version for m in steps[at:]]


def run_pdoflow(
    dsn: str, *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """``python -m pdoflowd.cli --dsn DSN ARGS`` with ``stdin``; text
    results."""
    return subprocess.run(
        [sys.executable, "-m", "pdoflowd.cli", "--dsn", dsn, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
