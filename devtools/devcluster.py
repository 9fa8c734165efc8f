"""A throwaway local PostgreSQL cluster for the demo, the tests and the bench.

Owns one data directory under a base directory it is given: initdb, a small
postgresql.conf overlay (loopback TCP on a free port, sockets inside the base
directory), start, stop, restart, crash (immediate stop), and creating or
dropping databases in it. As root it runs the server binaries as the
``postgres`` user, since the server refuses to run as root.

It must never be used for production: trust authentication, no tuning, no
backups. It does not delete its base directory (the caller owns that), and
nothing in the daemon imports it.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

__all__ = [
    "LocalCluster",
    "create_database",
    "drop_database",
    "find_bin_dir",
    "free_port",
]

_SERVER_USER = "postgres"
_START_TIMEOUT_S = 60
_COMMAND_TIMEOUT_S = 120
_LOG_TAIL_LINES = 40
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def find_bin_dir() -> Path:
    """Return the directory holding the PostgreSQL server binaries.

    ``pg_config --bindir`` wins when that directory has ``initdb`` (on Debian
    pg_config may come from libpq-dev alone); otherwise the highest
    ``/usr/lib/postgresql/*/bin`` that has one.
    """
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            found = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            pass
        else:
            bin_dir = Path(found.stdout.strip())
            if (bin_dir / "initdb").is_file():
                return bin_dir
    candidates = [
        path.parent
        for path in Path("/usr/lib/postgresql").glob("*/bin/initdb")
        if path.is_file()
    ]
    if not candidates:
        raise RuntimeError(
            "no PostgreSQL server binaries found (neither `pg_config --bindir`"
            " nor /usr/lib/postgresql/*/bin has initdb): install the"
            " postgresql package"
        )
    return max(candidates, key=lambda path: _version_key(path.parent.name))


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free at the time of asking."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def create_database(
    admin_conninfo: str, name: str, template: str | None = None
) -> None:
    """Create database ``name`` (optionally from ``template``) on a server."""
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        statement = sql.SQL("{} TEMPLATE {}").format(
            statement, sql.Identifier(template)
        )
    with psycopg.connect(admin_conninfo, autocommit=True) as conn:
        conn.execute(statement)


def drop_database(admin_conninfo: str, name: str) -> None:
    """Drop database ``name`` if it exists, ending its sessions first."""
    statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
        sql.Identifier(name)
    )
    with psycopg.connect(admin_conninfo, autocommit=True) as conn:
        conn.execute(statement)


class LocalCluster:
    """One PostgreSQL cluster in ``base_dir``, reachable on 127.0.0.1:port.

    Layout: ``base_dir/data`` (the cluster), ``base_dir/run`` (its Unix
    sockets), ``base_dir/postgresql.log`` (the server log).
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "run"
        self.log_file = self.base_dir / "postgresql.log"
        self.bin_dir = find_bin_dir()
        self.port = free_port() if port is None else port
        self.settings = dict(settings or {})
        for key in self.settings:
            if not _SETTING_NAME.fullmatch(key):
                raise ValueError(f"not a PostgreSQL setting name: {key!r}")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._as_root = os.geteuid() == 0

    @property
    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    @property
    def running(self) -> bool:
        if not self.initialised:
            return False
        # pg_ctl status: 0 running, 3 not running, 4 no usable data dir.
        status = self._run(
            [self._bin("pg_ctl"), "status", "-D", str(self.data_dir)],
            check=False,
        )
        return status.returncode == 0

    def init(self) -> None:
        """Create the cluster and write its configuration overlay."""
        if self.initialised:
            raise RuntimeError(f"{self.data_dir} already holds a cluster")
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self._hand_over_to_server_user()
        self._run(
            [
                self._bin("initdb"),
                "-D",
                str(self.data_dir),
                "-A",
                "trust",
                "-U",
                _SERVER_USER,
                "--no-sync",
                "-E",
                "UTF8",
                # The C locale exists everywhere and is compatible with UTF8.
                "--no-locale",
            ]
        )
        lines = [
            "",
            "# devtools.devcluster: a throwaway cluster, never for production",
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = {_quote(str(self.socket_dir))}",
            "max_connections = 200",
        ]
        lines += [f"{key} = {_quote(v)}" for key, v in self.settings.items()]
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n".join(lines) + "\n")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._hand_over_to_server_user()
        started = self._run(
            [
                self._bin("pg_ctl"),
                "start",
                "-w",
                "-t",
                str(_START_TIMEOUT_S),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
            ],
            check=False,
            timeout=_START_TIMEOUT_S + 30,
        )
        if started.returncode != 0:
            raise RuntimeError(
                f"PostgreSQL did not start on 127.0.0.1:{self.port}"
                f" (pg_ctl exit {started.returncode}):\n"
                f"{started.stderr.strip()}\n"
                f"--- tail of {self.log_file} ---\n{self._log_tail()}"
            )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``smart``, ``fast`` or ``immediate``) if running."""
        if not self.running:
            return
        self._run(
            [
                self._bin("pg_ctl"),
                "stop",
                "-w",
                "-t",
                str(_START_TIMEOUT_S),
                "-m",
                mode,
                "-D",
                str(self.data_dir),
            ],
            timeout=_START_TIMEOUT_S + 30,
        )

    def restart(self) -> None:
        """Stop (fast) and start again, on the same port."""
        self.stop("fast")
        self.start()

    def kill(self) -> None:
        """Stop at once, without a checkpoint, as a crash would."""
        self.stop("immediate")

    def dsn(self, dbname: str = "postgres") -> str:
        """A conninfo string over TCP, so namespaced processes reach it too."""
        return make_conninfo(
            "",
            host="127.0.0.1",
            port=str(self.port),
            user=_SERVER_USER,
            dbname=dbname,
        )

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create database ``name`` and return its dsn."""
        create_database(self.dsn(), name, template)
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, ending its sessions first."""
        drop_database(self.dsn(), name)

    def __enter__(self) -> LocalCluster:
        if not self.initialised:
            self.init()
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalCluster({str(self.base_dir)!r}, port={self.port})"

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = _COMMAND_TIMEOUT_S,
    ) -> subprocess.CompletedProcess[str]:
        if self._as_root:
            argv = ["runuser", "-u", _SERVER_USER, "--", *argv]
        # The server user may not be allowed into the caller's cwd.
        done = subprocess.run(
            list(argv),
            cwd=self.base_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed with exit {done.returncode}:\n"
                f"{done.stderr.strip() or done.stdout.strip()}"
            )
        return done

    def _hand_over_to_server_user(self) -> None:
        """As root, give the base directory to the server user."""
        if not self._as_root:
            return
        account = pwd.getpwnam(_SERVER_USER)
        if self.base_dir.stat().st_uid == account.pw_uid and self.initialised:
            return
        for parent in self.base_dir.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                # Traverse only; listing stays as restricted as it was.
                parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
        for path in [self.base_dir, *self.base_dir.rglob("*")]:
            os.chown(
                path, account.pw_uid, account.pw_gid, follow_symlinks=False
            )

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError as error:
            return f"(no log: {error})"
        return "\n".join(lines[-_LOG_TAIL_LINES:])


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
