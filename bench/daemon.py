"""``pdoflowd run`` as a subprocess, ready when it says READY=1.

Owns the benchmark's config for the daemon and reading its processes'
memory from /proc; starting it with a notify socket of its own (as systemd
would give it), waiting for READY=1 and stopping it with SIGTERM are
devtools.daemonproc's. The workers import the job module from this
checkout (``bench.jobs``), found through PYTHONPATH.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from devtools.daemonproc import (
    DaemonProcess,
    NotifySocket,
    pdoflowd_command,
    write_config,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
_READY_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DaemonSettings:
    """The knobs a benchmark turns; everything else keeps its default."""

    workers: int
    batch: int
    flush_ms: int | None = None
    # jobs.limits, for postings that use resources.
    limits: Mapping[str, int] = field(default_factory=dict)

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
        "jobs": {
            "allowed_modules": ["bench.jobs"],
            "limits": dict(settings.limits),
        },
        "metrics": {"listen": ""},
        "daemon": {"log_level": "warning"},
    }


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


@dataclass(frozen=True)
class Memory:
    """Resident memory of one process, KiB: VmRSS and its proportional share."""

    rss_kib: int
    pss_kib: int

    @classmethod
    def of(cls, pid: int) -> Memory:
        return cls(_status_kib(pid, "VmRSS"), _pss_kib(pid))


class Daemon(DaemonProcess):
    """One ``pdoflowd run`` with its config, log and notify socket: started
    and ready (READY=1) in a ``with`` block, stopped with SIGTERM at its
    end."""

    def __init__(
        self,
        work_dir: Path,
        dsn: str,
        settings: DaemonSettings,
    ) -> None:
        self.settings = settings
        work_dir.mkdir(parents=True, exist_ok=True)
        stamp = f"{time.time_ns()}"
        self.config_path = write_config(
            work_dir / f"pdoflowd-{stamp}.toml", config_sections(dsn, settings)
        )
        super().__init__(
            pdoflowd_command("run", "--config", str(self.config_path)),
            NotifySocket(work_dir / f"notify-{stamp}.sock", errors="replace"),
            output=work_dir / f"pdoflowd-{stamp}.log",
            new_session=True,
        )

    def __enter__(self) -> Daemon:
        self.start().wait_ready(_READY_TIMEOUT_S)
        # After READY=1 the socket is read on, as systemd would.
        self.notify.read_in_background()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is None:
                code = self.stop(timeout=_STOP_TIMEOUT_S)
                if code != 0:
                    raise RuntimeError(
                        f"pdoflowd exited with {code}:\n{self.log_tail()}"
                    )
        finally:
            self.close()
