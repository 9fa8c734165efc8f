"""Which database the client uses: an explicit DSN, ``$PDOFLOW_DSN``,
libpq's environment, the seed's ``~/.config/pdoflow/db.conf``, else libpq's
defaults.

Owns that order, reading the seed's INI file (its password kept apart from
the connection string) and refusing a string libpq cannot parse without
ever repeating it. It reads only the environment it is given and that one
file; it must not connect, and no error of it may show a password.
"""

from __future__ import annotations

import configparser
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pdoflowd.client.errors import ConnectionConfigError

__all__ = [
    "LIBPQ_TARGET_VARIABLES",
    "SEED_CONFIG",
    "ConnectionTarget",
    "check_conninfo",
    "read_seed_config",
    "resolve_connection",
]

# Any of these in the environment means libpq has been told where to go.
LIBPQ_TARGET_VARIABLES = (
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGSERVICE",
)
SEED_CONFIG = Path(".config", "pdoflow", "db.conf")
_SEED_KEYS = {
    "user": "user",
    "password": "password",
    "host": "host",
    "port": "port",
    "database": "dbname",
}


@dataclass(frozen=True)
class ConnectionTarget:
    """Where the client connects: a libpq string (or "" for libpq's own
    defaults and environment), a password kept out of it, and whence."""

    dsn: str
    password: str | None = field(default=None, repr=False)
    source: str = "libpq defaults"


def _home(environ: Mapping[str, str]) -> Path | None:
    if environ.get("HOME"):
        return Path(environ["HOME"])
    try:
        return Path.home()
    except RuntimeError:
        return None


def read_seed_config(path: Path) -> ConnectionTarget:
    """The seed's ``db.conf``: INI, section ``[postgresql]`` with ``user``,
    ``password``, ``host``, ``port`` and ``database``, all optional.

    Errors name the file and the key, never a value.
    """
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not valid UTF-8"
        raise ConnectionConfigError(f"cannot read {path}: {reason}") from None
    except configparser.Error:
        raise ConnectionConfigError(
            f"{path} is not an INI file with a [postgresql] section"
        ) from None
    if not parser.has_section("postgresql"):
        raise ConnectionConfigError(f"{path} has no [postgresql] section")
    section = parser["postgresql"]
    unknown = sorted(set(section) - set(_SEED_KEYS))
    if unknown:
        raise ConnectionConfigError(
            f"{path}: unknown key {unknown[0]!r} in [postgresql] (expected "
            "user, password, host, port, database)"
        )
    params = {
        _SEED_KEYS[key]: value
        for key, value in section.items()
        if key != "password" and value
    }
    port = params.get("port")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConnectionConfigError(f"{path}: port must be from 1 to 65535")
    return ConnectionTarget(
        make_conninfo("", **params),
        section.get("password") or None,
        str(path),
    )


def resolve_connection(
    dsn: str | None, environ: Mapping[str, str]
) -> ConnectionTarget:
    """Where to connect, in order: an explicit DSN, ``$PDOFLOW_DSN``,
    libpq's environment (any of :data:`LIBPQ_TARGET_VARIABLES`), the seed's
    ``~/.config/pdoflow/db.conf``, and last libpq's defaults."""
    if dsn:
        return ConnectionTarget(dsn, None, "--dsn")
    if environ.get("PDOFLOW_DSN"):
        return ConnectionTarget(environ["PDOFLOW_DSN"], None, "PDOFLOW_DSN")
    present = [name for name in LIBPQ_TARGET_VARIABLES if environ.get(name)]
    if present:
        return ConnectionTarget("", None, f"${present[0]}")
    home = _home(environ)
    if home is not None and (home / SEED_CONFIG).is_file():
        return read_seed_config(home / SEED_CONFIG)
    return ConnectionTarget("", None, "libpq defaults")


def check_conninfo(dsn: str) -> None:
    try:
        conninfo_to_dict(dsn)
    except psycopg.Error:
        # libpq's message may quote the string, password and all.
        raise ConnectionConfigError(
            "not a valid libpq connection string or URI (details withheld: "
            "it may hold a password)"
        ) from None
