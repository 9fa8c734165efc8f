"""``pdoflowd run`` as a subprocess, driven the way systemd drives it.

Owns, for the tests, the benchmark and the demo alike: writing a config
file, the notify socket (an AF_UNIX datagram socket bound here and passed
as NOTIFY_SOCKET, read with each sender's pid, as systemd reads it),
starting the daemon with it, waiting for READY=1 (or any ``KEY=value``)
with an error that carries the tail of the daemon's log when it exits or
times out, signals, a stop with SIGTERM and SIGKILL after a deadline, and
the daemon's processes from /proc: its workers and its database session.
Development only: nothing in ``pdoflowd`` imports it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

__all__ = [
    "REPO_ROOT",
    "SESSION_NAME",
    "DaemonExited",
    "DaemonFailed",
    "DaemonProcess",
    "Notification",
    "NotifySocket",
    "NotifyTimeout",
    "checkout_environ",
    "children_of",
    "config_text",
    "is_session",
    "parse_notification",
    "pdoflowd_command",
    "toml_value",
    "write_config",
]

# The checkout this module belongs to: the daemon's workers import job
# modules (devtools.demojob, bench.jobs) from it.
REPO_ROOT = Path(__file__).resolve().parent.parent
# The process name the daemon's database session takes (/proc/PID/comm).
SESSION_NAME = "pdoflowd-db"
# How many of the daemon's last log lines an error carries.
TAIL_LINES = 200

_UCRED = struct.Struct("3i")  # pid, uid, gid
_DATAGRAM_MAX = 65536
_POLL_S = 0.1
_LATE_DATAGRAMS_S = 0.2
_REAP_S = 10.0
_OUTPUT_JOIN_S = 5.0

_D = TypeVar("_D", bound="DaemonProcess")


# ---------------------------------------------------------------- config


def toml_value(value: Any) -> str:
    """``value`` as TOML: a boolean, number, string, or an array or inline
    table of them."""
    if isinstance(value, Mapping):
        items = ", ".join(
            f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items()
        )
        return "{" + items + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def config_text(sections: Mapping[str, Any]) -> str:
    """A TOML config file: one table per section, and an array of tables
    ([[name]]) for a section given as a list of mappings."""
    lines = []
    for section, values in sections.items():
        tables = values if isinstance(values, (list, tuple)) else [values]
        header = f"[[{section}]]" if tables is values else f"[{section}]"
        for table in tables:
            lines.append(header)
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
            lines.append("")
    return "\n".join(lines)


def write_config(path: Path, sections: Mapping[str, Any]) -> Path:
    path.write_text(config_text(sections))
    return path


# ---------------------------------------------------------------- processes


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces; the fields after it do not.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def is_session(pid: int) -> bool:
    """Whether ``pid`` is a daemon's database session (by its name)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == SESSION_NAME
    except OSError:
        return False


def pdoflowd_command(*args: str) -> list[str]:
    """``python -m pdoflowd ARGS`` with this interpreter."""
    return [sys.executable, "-m", "pdoflowd", *args]


def checkout_environ() -> dict[str, str]:
    """This process's environment with this checkout first on PYTHONPATH
    (installed or not, its modules are the ones imported) and without the
    caller's own NOTIFY_SOCKET."""
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), environ.get("PYTHONPATH")])
    )
    environ.pop("NOTIFY_SOCKET", None)
    return environ


# ---------------------------------------------------------------- notify


def parse_notification(text: str) -> dict[str, str]:
    """The ``KEY=value`` lines of one sd_notify datagram."""
    return dict(line.split("=", 1) for line in text.split("\n") if "=" in line)


@dataclass(frozen=True)
class Notification:
    """One sd_notify datagram and the pid the kernel says sent it."""

    pid: int
    fields: dict[str, str]
    text: str = field(default="", compare=False)

    def __contains__(self, assignment: str) -> bool:
        """Whether the datagram carries ``KEY=value``."""
        key, _, value = assignment.partition("=")
        return self.fields.get(key) == value


class DaemonFailed(AssertionError):
    """The daemon did not do what was awaited; the message says what it did
    instead and carries the tail of its log. An AssertionError: to a test,
    this is a failed expectation."""


class DaemonExited(DaemonFailed):
    """The daemon exited before it said what was awaited."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class NotifyTimeout(DaemonFailed):
    """What was awaited did not come in time."""


class NotifySocket:
    """What systemd listens on: a datagram socket that learns senders.

    ``address`` is a file path or, with a leading ``@``, an abstract name;
    it is what NOTIFY_SOCKET says. Every datagram read is kept, in order,
    in :attr:`received`. ``errors`` is how undecodable bytes are decoded.
    """

    def __init__(self, address: str | Path, *, errors: str = "strict") -> None:
        self.address = str(address)
        self.errors = errors
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if self.address.startswith("@"):
            self.sock.bind("\0" + self.address[1:])
        else:
            self.sock.bind(self.address)
        self.received: list[Notification] = []
        self._closing = threading.Event()
        self._reader: threading.Thread | None = None

    def receive(self, timeout: float) -> Notification | None:
        """The next datagram, or None when none comes within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(
                _DATAGRAM_MAX, socket.CMSG_SPACE(_UCRED.size)
            )
        except (TimeoutError, BlockingIOError):
            return None
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        text = data.decode(errors=self.errors)
        message = Notification(pid, parse_notification(text), text)
        self.received.append(message)
        return message

    def poll(self, timeout: float) -> list[Notification]:
        """Datagrams arriving within ``timeout`` seconds (kept as well)."""
        got: list[Notification] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is None:
                break
            got.append(message)
        return got

    def wait_for(
        self,
        assignment: str,
        timeout: float = 30.0,
        daemon: DaemonProcess | None = None,
        after: Notification | None = None,
    ) -> Notification:
        """The first datagram carrying ``KEY=value`` (after ``after``).

        Raises :class:`NotifyTimeout` after ``timeout`` seconds and, when
        ``daemon`` has exited without sending it, :class:`DaemonExited`.
        """
        deadline = time.monotonic() + timeout
        seen = self.received.index(after) + 1 if after is not None else 0
        while True:
            for message in self.received[seen:]:
                if assignment in message:
                    return message
            seen = len(self.received)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # Each datagram is looked at as soon as it comes: a test that
            # acts on READY=1 acts at once.
            if self.receive(min(_POLL_S, left)) is not None or daemon is None:
                continue
            code = daemon.poll()
            # Its last datagrams may still be on their way.
            if code is not None and not self.poll(_LATE_DATAGRAMS_S):
                raise DaemonExited(
                    f"daemon exited ({code}) before {assignment}:\n"
                    f"{daemon.log_tail()}",
                    code,
                )
        tail = daemon.log_tail() if daemon is not None else ""
        raise NotifyTimeout(f"no {assignment} within {timeout:g} s:\n{tail}")

    def after(self, message: Notification) -> list[Notification]:
        """The datagrams read after ``message``."""
        return self.received[self.received.index(message) + 1 :]

    def read_in_background(self) -> None:
        """Keep reading, as systemd does, until :meth:`close`: a reader that
        stops lets the queue fill up, and the daemon's next notifications
        are lost."""
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()

    def _read(self) -> None:
        while not self._closing.is_set():
            try:
                self.receive(_POLL_S)
            except OSError:
                return

    def close(self) -> None:
        """Stop reading, close the socket and remove its file (if any)."""
        self._closing.set()
        if self._reader is not None and self._reader.is_alive():
            self._reader.join(_OUTPUT_JOIN_S)
        self.sock.close()
        if not self.address.startswith("@"):
            Path(self.address).unlink(missing_ok=True)


# ---------------------------------------------------------------- the daemon


class DaemonProcess:
    """One daemon subprocess with a notify socket of its own.

    ``argv`` is usually ``pdoflowd_command("run", "--config", path)``; it
    runs with ``env`` (default :func:`checkout_environ`) and NOTIFY_SOCKET
    set to ``notify``, which it closes with itself. Its stdout and stderr
    go to ``output``: a log file (appended to), or a function called with
    each line (the last lines are kept for :meth:`log`). With
    ``new_session`` it runs in a session of its own (a Ctrl-C at the
    terminal does not reach it) and a SIGKILL goes to the whole session.
    """

    def __init__(
        self,
        argv: Sequence[str],
        notify: NotifySocket,
        *,
        output: Path | Callable[[str], None],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        new_session: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.notify = notify
        self.env = dict(checkout_environ() if env is None else env)
        self.env["NOTIFY_SOCKET"] = notify.address
        self.cwd = cwd
        self.new_session = new_session
        self.log_path = output if isinstance(output, Path) else None
        self._on_line = None if isinstance(output, Path) else output
        self._lines: collections.deque[str] = collections.deque(
            maxlen=TAIL_LINES
        )
        self._copier: threading.Thread | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False

    def start(self: _D) -> _D:
        """Start it (without waiting for READY=1)."""
        log: IO[bytes] | None = None
        if self.log_path is not None:
            log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=subprocess.PIPE if log is None else log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                start_new_session=self.new_session,
            )
        finally:
            if log is not None:
                log.close()
        if log is None:
            self._copier = threading.Thread(target=self._copy, daemon=True)
            self._copier.start()
        return self

    def _copy(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self._lines.append(line)
            if self._on_line is not None:
                self._on_line(line)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- what it says

    def wait_for(
        self,
        assignment: str,
        timeout: float = 30.0,
        after: Notification | None = None,
    ) -> Notification:
        """The first notification carrying ``KEY=value`` (see
        :meth:`NotifySocket.wait_for`)."""
        return self.notify.wait_for(assignment, timeout, self, after)

    def wait_ready(self: _D, timeout: float = 30.0) -> _D:
        """Wait for READY=1 (read before or now)."""
        self.wait_for("READY=1", timeout)
        return self

    def log(self) -> str:
        """What it wrote (from a pipe: the last lines of it)."""
        if self.log_path is None:
            return "\n".join(self._lines)
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    # -- its processes

    def workers(self) -> list[int]:
        """The worker processes (children other than the database
        session)."""
        return [pid for pid in children_of(self.pid) if not is_session(pid)]

    def session_pid(self) -> int | None:
        """The database session process, if one is running."""
        sessions = [pid for pid in children_of(self.pid) if is_session(pid)]
        return sessions[0] if sessions else None

    # -- signals and the end

    def send(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def poll(self) -> int | None:
        """The exit status once it has exited (its output read), or None
        (also before it has started)."""
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is not None:
            self._join_output()
        return code

    def wait(self, timeout: float = 30.0) -> int:
        """The exit status; subprocess.TimeoutExpired after ``timeout``."""
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._join_output()
        return code

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``signum`` (SIGTERM: drain and exit) and return the exit
        status; after ``timeout`` seconds, :meth:`kill` (see
        :attr:`killed`)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.send(signum)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.wait(_REAP_S)

    def kill(self) -> None:
        """SIGKILL it and every process under it at once (a dead host), and
        reap it."""
        assert self.proc is not None
        self.killed = True
        if self.new_session:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        else:
            _kill_all([self.pid, *children_of(self.pid)])
        self.wait(_REAP_S)

    def close(self) -> None:
        """SIGKILL it if it still runs (its workers follow it), and any
        child left; release the notify socket. Safe to call again."""
        if self.proc is not None:
            if self.proc.poll() is None:
                if self.new_session:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.pid, signal.SIGKILL)
                else:
                    self.proc.kill()
                self.proc.wait(_REAP_S)
            _kill_all(children_of(self.pid))
            self._join_output()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        self.notify.close()

    def _join_output(self) -> None:
        if self._copier is not None and self._copier.is_alive():
            self._copier.join(_OUTPUT_JOIN_S)


def _kill_all(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
