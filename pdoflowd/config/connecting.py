"""Connecting as the configuration says: the database password and the
arguments for ``psycopg.connect``.

Owns where the password comes from (a systemd credential, else
``database.password_file``; only the first line counts), the libpq
settings every connection gets (its timeout, its application name, the
network deadlines of ``database.tcp_user_timeout_s``) and which
connection keeps prepared statements. It reads only the environment it is
given and the password's file; it must not connect, log or exit.
"""

import math
from collections.abc import Mapping
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from pdoflowd.config.problems import ConfigError, ConfigProblem, reason
from pdoflowd.config.schema import DatabaseConfig

__all__ = [
    "APPLICATION_NAME",
    "CREDENTIAL_NAME",
    "connection_kwargs",
    "resolve_password",
]

APPLICATION_NAME = "pdoflowd"
CREDENTIAL_NAME = "db-password"


def _read_password(path: Path, key: str, *, missing_ok: bool) -> str | None:
    # "from None" throughout: a chained decode error would show the bytes.
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        if missing_ok:
            return None
        message = f"cannot read {path}: no such file"
        raise ConfigError([ConfigProblem(key, message)]) from None
    except OSError as exc:
        message = f"cannot read {path}: {reason(exc)}"
        raise ConfigError([ConfigProblem(key, message)]) from None
    except UnicodeDecodeError:
        message = f"{path} is not valid UTF-8"
        raise ConfigError([ConfigProblem(key, message)]) from None
    password = text.split("\n", 1)[0].removesuffix("\r")
    if not password:
        # PostgreSQL never accepts an empty password, so this is a mistake.
        message = f"{path} holds no password: its first line is empty"
        raise ConfigError([ConfigProblem(key, message)])
    return password


def resolve_password(
    database: DatabaseConfig, environ: Mapping[str, str]
) -> str | None:
    """The database password, or None to leave it to libpq (dsn, passfile).

    A systemd credential ($CREDENTIALS_DIRECTORY/db-password) wins over
    database.password_file. Only the first line counts.
    """
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        credential = Path(directory) / CREDENTIAL_NAME
        password = _read_password(credential, "(credentials)", missing_ok=True)
        if password is not None:
            return password
    if database.password_file is None:
        return None
    return _read_password(
        database.password_file, "database.password_file", missing_ok=False
    )


def _network_deadlines(
    dsn: str, tcp_user_timeout_s: float
) -> dict[str, object]:
    """libpq settings that end a connection on a path that drops packets:
    unacknowledged data after ``tcp_user_timeout_s``, and keepalives that
    notice a silent peer in about that time. The DSN's own values win."""
    if not tcp_user_timeout_s:
        return {}
    given = conninfo_to_dict(dsn) if dsn else {}
    probe_s = max(1, math.ceil(tcp_user_timeout_s / 3))
    settings: dict[str, object] = {
        "tcp_user_timeout": max(1, round(tcp_user_timeout_s * 1000)),
        "keepalives": 1,
        "keepalives_idle": probe_s,
        "keepalives_interval": max(1, math.ceil(probe_s / 3)),
        "keepalives_count": 3,
    }
    return {k: v for k, v in settings.items() if k not in given}


def connection_kwargs(
    database: DatabaseConfig, password: str | None, *, listen: bool = False
) -> dict[str, object]:
    """Keyword arguments for psycopg.connect.

    listen=True gives the supervisor's own connection (listen_dsn if set),
    which never goes through a transaction-mode pooler and so keeps
    prepared statements.
    """
    dsn = (database.listen_dsn or database.dsn) if listen else database.dsn
    kwargs: dict[str, object] = {
        "conninfo": dsn,
        # libpq takes whole seconds; 0 would mean "wait forever".
        "connect_timeout": max(1, math.ceil(database.connect_timeout_s)),
        # A fallback, so an application_name in the dsn or $PGAPPNAME wins.
        "fallback_application_name": APPLICATION_NAME,
    }
    if password is not None:
        kwargs["password"] = password
    kwargs.update(_network_deadlines(dsn, database.tcp_user_timeout_s))
    if not listen and not database.prepared_statements:
        kwargs["prepare_threshold"] = None
    return kwargs
