"""What the figures were measured on: the machine, the software, the server.

Owns reading /proc and asking the few programs that know (git for the
checkout's commit); it never changes anything.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import psycopg

import pdoflowd


def _first(path: str, prefix: str) -> str:
    try:
        with open(path) as source:
            for line in source:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _commit(repo: Path) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def describe(repo: Path, server: dict[str, str]) -> dict[str, Any]:
    """The machine, the software versions and the server's settings."""
    mem_kib = _first("/proc/meminfo", "MemTotal").split()[0]
    return {
        "nproc": os.cpu_count(),
        "cpu": _first("/proc/cpuinfo", "model name"),
        "memory_gib": round(int(mem_kib) / 1024 / 1024, 1)
        if mem_kib.isdigit()
        else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        # "python" (pure Python, as Debian ships it), "c" or "binary".
        "psycopg_impl": psycopg.pq.__impl__,
        "libpq": psycopg.pq.version(),
        "pdoflowd": pdoflowd.__version__,
        "commit": _commit(repo),
        "server": server,
    }


def summary(facts: dict[str, Any]) -> str:
    """One line for the top of the table."""
    server = facts["server"]
    return (
        f"{facts['nproc']} CPU ({facts['cpu']}), {facts['memory_gib']} GiB,"
        f" Linux {facts['kernel']}, Python {facts['python']},"
        f" psycopg {facts['psycopg']} ({facts.get('psycopg_impl', '?')});"
        " PostgreSQL"
        f" {server.get('server_version')} (fsync={server.get('fsync')},"
        f" synchronous_commit={server.get('synchronous_commit')},"
        f" wal_sync_method={server.get('wal_sync_method')},"
        f" shared_buffers={server.get('shared_buffers')});"
        f" pdoflowd {facts['pdoflowd']} at {facts['commit']}"
    )
