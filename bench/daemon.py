"""``pdoflowd run`` as a subprocess, ready when it says READY=1.

Owns writing the daemon's config, starting it with a notify socket of its
own (as systemd would give it), waiting for READY=1, reading its processes'
memory from /proc, and stopping it with SIGTERM. The workers import the job
module from this checkout (``bench.jobs``), found through PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DaemonSettings:
    """The knobs a benchmark turns; everything else keeps its default."""

    workers: int
    batch: int
    flush_ms: int | None = None

    def label(self) -> str:
        flush = "default" if self.flush_ms is None else f"{self.flush_ms}"
        return f"W={self.workers} B={self.batch} flush_ms={flush}"


def config_sections(
    dsn: str, settings: DaemonSettings
) -> dict[str, dict[str, Any]]:
    """The daemon's config: the bench's knobs, quiet logs, no HTTP port."""
    workers: dict[str, Any] = {
        "count": settings.workers,
        "batch_size": settings.batch,
    }
    if settings.flush_ms is not None:
        workers["outcome_flush_ms"] = settings.flush_ms
    return {
        "database": {"dsn": dsn},
        "workers": workers,
        "jobs": {"allowed_modules": ["bench.jobs"]},
        "metrics": {"listen": ""},
        "daemon": {"log_level": "warning"},
    }


def _toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        # JSON strings, numbers, booleans and arrays are valid TOML too.
        lines += [f"{key} = {json.dumps(v)}" for key, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise LookupError(f"Pss not in /proc/{pid}/smaps_rollup")


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


@dataclass(frozen=True)
class Memory:
    """Resident memory of one process, KiB: VmRSS and its proportional share."""

    rss_kib: int
    pss_kib: int

    @classmethod
    def of(cls, pid: int) -> Memory:
        return cls(_status_kib(pid, "VmRSS"), _pss_kib(pid))


class Daemon:
    """One ``pdoflowd run`` with its config, log and notify socket."""

    def __init__(
        self,
        work_dir: Path,
        dsn: str,
        settings: DaemonSettings,
    ) -> None:
        self.settings = settings
        work_dir.mkdir(parents=True, exist_ok=True)
        stamp = f"{time.time_ns()}"
        self.config_path = work_dir / f"pdoflowd-{stamp}.toml"
        self.config_path.write_text(_toml(config_sections(dsn, settings)))
        self.log_path = work_dir / f"pdoflowd-{stamp}.log"
        notify_path = work_dir / f"notify-{stamp}.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(notify_path))
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
        )
        self.env["NOTIFY_SOCKET"] = str(notify_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.last_status = ""
        self._closing = threading.Event()
        # After READY=1 the socket is read on, as systemd would: a reader
        # that stops reading lets the datagram queue fill up, and then the
        # daemon's next notification blocks.
        self._reader = threading.Thread(target=self._read_notify, daemon=True)

    def start(self, timeout_s: float = 60.0) -> Daemon:
        """Start the daemon and wait for READY=1."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pdoflowd",
                    "run",
                    "--config",
                    str(self.config_path),
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        self.notify.settimeout(0.1)
        while time.monotonic() < deadline:
            try:
                message = self.notify.recv(65536).decode(errors="replace")
            except TimeoutError:
                message = ""
            if "READY=1" in message.split("\n"):
                self._reader.start()
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"pdoflowd run exited with {self.proc.returncode}:\n"
                    f"{self.log()}"
                )
        raise RuntimeError(f"no READY=1 within {timeout_s:g} s:\n{self.log()}")

    def _read_notify(self) -> None:
        while not self._closing.is_set():
            try:
                message = self.notify.recv(65536).decode(errors="replace")
            except TimeoutError:
                continue
            except OSError:
                return
            for field in message.split("\n"):
                if field.startswith("STATUS="):
                    self.last_status = field.removeprefix("STATUS=")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def workers(self) -> list[int]:
        return children_of(self.pid)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, wait for the drain; the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._closing.set()
        if self._reader.is_alive():
            self._reader.join(5)
        self.notify.close()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is None:
                code = self.stop()
                if code != 0:
                    raise RuntimeError(
                        f"pdoflowd exited with {code}:\n{self.log()}"
                    )
        finally:
            self.close()
