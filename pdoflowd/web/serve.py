"""The ``pdoflowd web`` process: config, database check, TLS, the server.

Owns turning a loaded :class:`~pdoflowd.config.Config` into a running
console (its database role and password, the schema check, uvicorn with
TLS and client certificates as for the metrics endpoint) and ``--add-user``.
Exit statuses as the daemon's: 0 stopped, 4 schema not current, 64 usage,
69 database unreachable at start, 78 configuration. It must not parse
TOML or arguments (the command does) or hold page logic.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
import sys
from collections.abc import Mapping
from typing import IO, Any

import psycopg
import uvicorn

from pdoflowd.config import (
    Config,
    ConfigError,
    ConfigProblem,
    connection_kwargs,
    resolve_password,
)
from pdoflowd.db.common import Connection
from pdoflowd.db.migrate import SchemaNotCurrent, check_current
from pdoflowd.exitcodes import (
    EXIT_CONFIG,
    EXIT_SCHEMA,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from pdoflowd.web import auth
from pdoflowd.web.app import create_app
from pdoflowd.web.pages import ConsoleSettings

__all__ = ["add_user", "connection_settings", "serve"]

log = logging.getLogger("pdoflowd.web")


def connection_settings(
    config: Config, environ: Mapping[str, str]
) -> dict[str, Any]:
    """psycopg.connect's arguments for the console: ``web.dsn`` and
    ``web.password_file`` where set, else the daemon's database settings."""
    web = config.web
    database = config.database
    if web.dsn:
        database = dataclasses.replace(
            database, dsn=web.dsn, listen_dsn="", password_file=None
        )
    if web.password_file is not None:
        database = dataclasses.replace(
            database, password_file=web.password_file
        )
    password = resolve_password(database, environ)
    kwargs = connection_kwargs(database, password)
    kwargs["autocommit"] = True
    kwargs["fallback_application_name"] = "pdoflowd-web"
    return kwargs


def _tls(config: Config) -> dict[str, Any]:
    web = config.web
    if web.tls_cert_file is None:
        return {}
    settings: dict[str, Any] = {"ssl_certfile": str(web.tls_cert_file)}
    if web.tls_key_file is not None:
        settings["ssl_keyfile"] = str(web.tls_key_file)
    if web.tls_client_ca_file is not None:
        settings["ssl_ca_certs"] = str(web.tls_client_ca_file)
        settings["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return settings


def serve(config: Config, environ: Mapping[str, str]) -> int:
    """Run the console until SIGTERM or SIGINT."""
    web = config.web
    try:
        kwargs = connection_settings(config, environ)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{problem.key}: {problem.message}", file=sys.stderr)
        return EXIT_CONFIG
    if web.users_file is not None:
        try:
            auth.read_users(web.users_file)
        except auth.UsersFileError as exc:
            print(f"web.users_file: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    try:
        with psycopg.connect(**kwargs) as conn:
            check_current(conn)
    except psycopg.errors.InsufficientPrivilege:
        # A submitter's role may not read the schema's version; its pages
        # then show what that role may see.
        log.warning("this role may not read the schema version: not checked")
    except psycopg.Error as exc:
        log.error("the database cannot be reached: %s", exc)
        return EXIT_UNAVAILABLE
    except SchemaNotCurrent as exc:
        log.error("%s", exc)
        return EXIT_SCHEMA

    def connect() -> Connection:
        return psycopg.connect(**kwargs)

    server: uvicorn.Server | None = None

    def stopping() -> bool:
        return server is not None and server.should_exit

    settings = ConsoleSettings(
        connect=connect,
        users_file=web.users_file,
        client_certificates=web.tls_client_ca_file is not None,
        allow_actions=web.allow_actions,
        refresh_s=web.refresh_s,
        statement_timeout_s=config.database.statement_timeout_s,
        stopping=stopping,
    )
    scheme = "https" if web.tls_cert_file is not None else "http"
    log.info(
        "web console on %s://%s (actions %s)",
        scheme,
        web.listen,
        "allowed" if web.allow_actions else "off",
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host=web.host,
            port=web.port,
            log_config=None,
            access_log=False,
            lifespan="off",
            proxy_headers=False,
            server_header=False,
            **_tls(config),
        )
    )
    server.run()
    return 0


def add_user(config: Config, name: str, *, admin: bool, stdin: IO[str]) -> int:
    """``--add-user NAME [--admin]``: the password is stdin's first line."""
    path = config.web.users_file
    if path is None:
        problem = ConfigProblem(
            "web.users_file", "not set: name the file --add-user writes"
        )
        print(f"{problem.key}: {problem.message}", file=sys.stderr)
        return EXIT_CONFIG
    password = stdin.readline().rstrip("\r\n")
    try:
        auth.add_user(path, name, password, admin=admin)
    except ValueError as exc:
        print(f"pdoflowd web: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, auth.UsersFileError) as exc:
        print(f"pdoflowd web: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    role = "admin" if admin else "viewer"
    print(f"{path}: {name} is a {role}")
    return 0
