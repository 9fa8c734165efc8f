"""The ``pdoflowd`` command: arguments, config, logging, then the supervisor.

Owns the command line (``run``, ``check-config``, ``migrate``), turning a
config error into its report and exit status 78, the optional detach from
the terminal (``--daemonize`` with a locked pidfile, for hosts without
systemd), and the exit statuses. It must not hold queue logic.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg

from pdoflowd import __version__, logs
from pdoflowd.config import (
    DEFAULT_CONFIG_PATH,
    EX_CONFIG,
    Config,
    ConfigError,
    connection_kwargs,
    load,
    resolve_password,
)
from pdoflowd.migrate import SchemaNotCurrent, upgrade_connection
from pdoflowd.supervisor import Supervisor

log = logging.getLogger("pdoflowd")

EX_UNAVAILABLE = 69


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdoflowd",
        description="PostgreSQL job queue daemon for Python functions.",
    )
    parser.add_argument(
        "--version", action="version", version=f"pdoflowd {__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument(
            "--config",
            type=Path,
            default=DEFAULT_CONFIG_PATH,
            help=f"the TOML config file (default {DEFAULT_CONFIG_PATH})",
        )
        return sub

    run = with_config("run", "run the daemon (in the foreground by default)")
    run.add_argument(
        "--daemonize",
        action="store_true",
        help="detach from the terminal (for hosts without systemd)",
    )
    run.add_argument(
        "--pidfile", type=Path, help="with --daemonize: a locked pidfile"
    )
    with_config("check-config", "validate the config; exit 78 if invalid")
    with_config("migrate", "bring the database schema up to date")
    return parser


def _report(error: ConfigError) -> int:
    for problem in error.problems:
        print(f"{problem.key}: {problem.message}", file=sys.stderr)
    return EX_CONFIG


def _load(path: Path) -> tuple[Config, str | None]:
    config = load(path)
    return config, resolve_password(config.database, os.environ)


def check_config(path: Path) -> int:
    try:
        _load(path)
    except ConfigError as exc:
        return _report(exc)
    print(f"{path}: valid")
    return 0


def migrate(path: Path) -> int:
    try:
        config, password = _load(path)
    except ConfigError as exc:
        return _report(exc)
    logs.configure(config.daemon.log_level)
    kwargs = connection_kwargs(config.database, password, listen=True)
    try:
        with psycopg.connect(**kwargs) as conn:  # type: ignore[arg-type]
            applied = upgrade_connection(conn)
    except psycopg.Error as exc:
        log.error("migration failed: %s", exc)
        return EX_UNAVAILABLE
    except SchemaNotCurrent as exc:
        log.error("%s", exc)
        return 1
    if applied:
        log.info("schema migrated to version %d", applied[-1])
    else:
        log.info("schema already current")
    return 0


@contextlib.contextmanager
def _detached(pidfile: Path | None) -> Iterator[None]:
    import daemon  # python-daemon, only needed here
    import daemon.pidfile

    lock = daemon.pidfile.TimeoutPIDLockFile(str(pidfile)) if pidfile else None
    with daemon.DaemonContext(
        pidfile=lock,
        stderr=sys.stderr,
        working_directory="/",
        umask=0o027,
        detach_process=True,
    ):
        yield


def run(path: Path, *, daemonize: bool, pidfile: Path | None) -> int:
    try:
        config, password = _load(path)
    except ConfigError as exc:
        return _report(exc)
    context = _detached(pidfile) if daemonize else contextlib.nullcontext()
    with context:
        logs.configure(config.daemon.log_level)
        if not config.jobs.allowed_modules:
            log.warning(
                "jobs.allowed_modules is empty: every job will be refused"
            )
        supervisor = Supervisor(
            config, password, reload_config=lambda: load(path)
        )
        return supervisor.run()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.config)
    if args.command == "migrate":
        return migrate(args.config)
    if args.pidfile and not args.daemonize:
        print("--pidfile goes with --daemonize", file=sys.stderr)
        return 2
    return run(args.config, daemonize=args.daemonize, pidfile=args.pidfile)


if __name__ == "__main__":
    sys.exit(main())
