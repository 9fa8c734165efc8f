"""The ``pdoflowd`` command: arguments, config, logging, then the supervisor.

Owns the command line (``run``, ``check-config``, ``migrate``, and
``web``, which hands over to :mod:`pdoflowd.web`), turning a
config error into its report and exit status 78, the optional detach from
the terminal (``--daemonize`` with a locked pidfile, for hosts without
systemd), and the exit statuses. It must not hold queue logic.

Exit statuses: 0 stopped cleanly, 1 failure (a crash loop of the workers, or
a pidfile held by a running daemon), 4 the database schema is not the one
this version needs, 69 the database cannot be reached by ``migrate``, 78 the
configuration is invalid or names a metrics address this host cannot serve.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import fcntl
import logging
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import psycopg

from pdoflowd import __version__, redaction
from pdoflowd.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    ConfigProblem,
    MetricsConfig,
    connection_kwargs,
    load,
    resolve_password,
)
from pdoflowd.daemon import logs
from pdoflowd.daemon.notify import Notifier
from pdoflowd.daemon.supervisor import Supervisor
from pdoflowd.db.migrate import (
    Grants,
    SchemaNotCurrent,
    add_grant_arguments,
    apply_grants,
    upgrade_connection,
)
from pdoflowd.exitcodes import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)

log = logging.getLogger("pdoflowd")


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
    check = with_config(
        "check-config", "validate the config; exit 78 if invalid"
    )
    check.add_argument(
        "--show-schedules",
        action="store_true",
        help="print each schedule's next three fire times",
    )
    add_grant_arguments(
        with_config("migrate", "bring the database schema up to date")
    )
    web = with_config(
        "web", "run the web console (the [web] section of the config)"
    )
    web.add_argument(
        "--add-user",
        metavar="NAME",
        help="add NAME to web.users_file (its password from stdin), then exit",
    )
    web.add_argument(
        "--admin",
        action="store_true",
        help="with --add-user: the user may pause, resume, cancel, retry",
    )
    return parser


def _report(error: ConfigError) -> int:
    # Before logging is set up: mark each line as an error for the journal.
    prefix = "<3>" if logs.stderr_is_journal(os.environ, 2) else ""
    for problem in error.problems:
        print(f"{prefix}{problem.key}: {problem.message}", file=sys.stderr)
    return EXIT_CONFIG


def _load(path: Path) -> tuple[Config, str | None]:
    """The config and the password, both remembered as secrets."""
    config = load(path)
    password = resolve_password(config.database, os.environ)
    database = config.database
    redaction.remember(
        [
            password,
            *redaction.dsn_secrets(database.dsn),
            *redaction.dsn_secrets(database.listen_dsn),
        ]
    )
    return config, password


# Resolver answers that no retry changes; any other failure may be a name
# server that does not answer yet, which must not fail a start or reload.
_UNKNOWN_NAME = {
    getattr(socket, name)
    for name in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY")
    if hasattr(socket, name)
}
# Bind errors that no restart fixes: the address is not this host's (or
# not usable as given), or the port is privileged.
_BIND_REFUSED = {
    errno.EADDRNOTAVAIL,
    errno.EAFNOSUPPORT,
    errno.EINVAL,
    errno.EACCES,
}


def listen_problems(metrics: MetricsConfig) -> list[ConfigProblem]:
    """Whether this host can serve ``metrics.listen``; [] when it can.

    This binds a socket, so it lives here beside the start-up rather than
    in config.py, whose parse stays pure (no network, no side effects);
    ``check-config``, ``run`` and a reload call it. The address is bound
    with its port and closed at once, never listened on. An address this
    host does not have (EADDRNOTAVAIL), a host name that does not exist or
    a port this user may not bind (EACCES) is refused; a port in use is
    not, since the running daemon holds it while a reload is checked, nor
    is a name server that does not answer now.
    """
    if not metrics.enabled:
        return []
    host, port = metrics.host, metrics.port
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        if exc.errno in _UNKNOWN_NAME:
            message = f"cannot resolve {host!r}: {exc.strerror}"
            return [ConfigProblem("metrics.listen", message)]
        return []
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.bind(address)
    except OSError as exc:
        if exc.errno not in _BIND_REFUSED:
            return []
        reason = (exc.strerror or str(exc)).lower()
        if exc.errno == errno.EADDRNOTAVAIL:
            reason = f"not an address of this host ({reason})"
        message = f"cannot listen on {where}: {reason}"
        return [ConfigProblem("metrics.listen", message)]
    return []


def _load_for_running(path: Path) -> tuple[Config, str | None]:
    """:func:`_load`, and refuse a metrics address this host cannot serve."""
    config, password = _load(path)
    problems = listen_problems(config.metrics)
    if problems:
        raise ConfigError(problems)
    return config, password


def check_config(
    path: Path, *, show_schedules: bool = False, now: dt.datetime | None = None
) -> int:
    try:
        config, _ = _load_for_running(path)
    except ConfigError as exc:
        return _report(exc)
    print(f"{path}: valid")
    if show_schedules:
        for line in schedule_lines(
            config, now or dt.datetime.now(dt.timezone.utc)
        ):
            print(line)
    return 0


def schedule_lines(config: Config, now: dt.datetime) -> list[str]:
    """Each schedule, and its next three fire times after ``now`` in its
    time zone (UTC for every_s)."""
    if not config.schedules:
        return ["no schedules"]
    lines = []
    for schedule in config.schedules:
        times = schedule.fire_times()
        zone = times.zone
        lines.append(
            f"schedule {schedule.name}: {schedule.entry_point},"
            f" {schedule.when}, backfill {schedule.backfill}"
        )
        for moment in times.upcoming(now, 3):
            lines.append(f"  next: {moment.astimezone(zone).isoformat()}")
    return lines


def migrate(path: Path, grants: Grants | None = None) -> int:
    try:
        config, password = _load(path)
    except ConfigError as exc:
        return _report(exc)
    logs.configure(config.daemon.log_level)
    kwargs = connection_kwargs(config.database, password, listen=True)
    try:
        with psycopg.connect(**kwargs) as conn:  # type: ignore[arg-type]
            applied = upgrade_connection(conn)
            if grants is not None:
                apply_grants(conn, grants)
    except psycopg.Error as exc:
        log.error("migration failed: %s", exc)
        return EXIT_UNAVAILABLE
    except SchemaNotCurrent as exc:
        log.error("%s", exc)
        return 1
    if applied:
        log.info("schema migrated to version %d", applied[-1])
    else:
        log.info("schema already current")
    return 0


class PidFileLocked(Exception):
    """Another process holds the pidfile: a daemon runs already."""


class PidFile:
    """A pidfile held under an exclusive ``flock`` for the daemon's life.

    The lock is taken before detaching, so a second start fails at once with
    a clear message and a non-zero status, and it dies with the process, so
    a pidfile left behind by a killed daemon never blocks the next start.
    The pid is written once detached (the context python-daemon enters); the
    file is removed on the way out.
    """

    def __init__(self, path: Path) -> None:
        self.path = path.absolute()
        self.fd = -1

    def acquire(self) -> None:
        """Take the lock, or raise PidFileLocked naming the holder."""
        while True:
            fd = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise PidFileLocked(
                    f"{self.path} is locked: pdoflowd runs already"
                    + (f" as pid {holder}" if holder else "")
                ) from None
            # The holder may have removed the file between our open and our
            # lock: then we locked an orphan and must try the path again.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)

    def __enter__(self) -> PidFile:
        pid = f"{os.getpid()}\n".encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, pid, 0)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1


@contextlib.contextmanager
def _detached(pidfile: PidFile | None) -> Iterator[None]:
    import daemon  # python-daemon, only needed here

    # python-daemon closes every other descriptor; the supervisor creates
    # its pipes and sockets only after this, inside the context.
    with daemon.DaemonContext(
        pidfile=pidfile,
        files_preserve=[pidfile.fd] if pidfile else [],
        stderr=sys.stderr,
        working_directory="/",
        umask=0o027,
        detach_process=True,
        # The supervisor installs its own handlers for every signal it uses.
        signal_map={},
    ):
        yield


def run(path: Path, *, daemonize: bool, pidfile: Path | None) -> int:
    try:
        config, password = _load_for_running(path)
    except ConfigError as exc:
        problems = "; ".join(f"{p.key}: {p.message}" for p in exc.problems)
        Notifier().status(f"invalid configuration: {problems}")
        return _report(exc)
    lock = PidFile(pidfile) if pidfile else None
    if lock is not None:
        try:
            lock.acquire()
        except (PidFileLocked, OSError) as exc:
            print(f"pdoflowd: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    context: contextlib.AbstractContextManager[object]
    if daemonize:
        context = _detached(lock)
    else:
        context = lock if lock is not None else contextlib.nullcontext()
    with context:
        logs.configure(config.daemon.log_level)
        if not config.jobs.allowed_modules:
            log.warning(
                "jobs.allowed_modules is empty: every job will be refused"
            )
        # A reload reads the password again (a rotated password_file):
        # workers started after it, and the supervisor's next connection,
        # log in with the new one.
        supervisor = Supervisor(
            config, password, reload_config=lambda: _load_for_running(path)
        )
        return supervisor.run()


def web(path: Path, *, add_user: str | None, admin: bool) -> int:
    """``pdoflowd web``: the console, or ``--add-user`` to its users file."""
    if admin and add_user is None:
        print("--admin goes with --add-user", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load(path)
    except ConfigError as exc:
        return _report(exc)
    try:
        from pdoflowd.web import serve
    except ImportError as exc:
        print(
            f"pdoflowd web needs {exc.name or 'its web stack'}: install"
            " python3-starlette python3-uvicorn python3-jinja2 (Debian) or"
            " pdoflowd[web]",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE
    if add_user is not None:
        return serve.add_user(config, add_user, admin=admin, stdin=sys.stdin)
    logs.configure(config.daemon.log_level)
    return serve.serve(config, os.environ)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "web":
        return web(args.config, add_user=args.add_user, admin=args.admin)
    if args.command == "check-config":
        return check_config(args.config, show_schedules=args.show_schedules)
    if args.command == "migrate":
        return migrate(args.config, Grants.from_args(args))
    if args.pidfile and not args.daemonize:
        print("--pidfile goes with --daemonize", file=sys.stderr)
        return 2
    return run(args.config, daemonize=args.daemonize, pidfile=args.pidfile)


if __name__ == "__main__":
    sys.exit(main())
