"""CPU time spent by a tree of processes, read from /proc.

Owns the one fact that stays comparable on a shared, noisy machine: how
many CPU-seconds a phase cost, on the client side (the daemon's processes,
or pgbench) and on the server side (every process of the PostgreSQL
cluster). A process's own time and the time of its children that have
exited (and were waited for) are in its /proc stat; children still alive
are added from theirs.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces; the fields after it do not.
    return text.rsplit(")", 1)[1].split()


def _children() -> dict[int, set[int]]:
    found: dict[int, set[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        parent = int(fields[1])
        found.setdefault(parent, set()).add(int(entry.name))
    return found


def tree_seconds(root: int) -> float:
    """CPU-seconds of ``root`` and all its descendants, alive or reaped."""
    children = _children()
    total = 0
    pending = [root]
    while pending:
        pid = pending.pop()
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # utime, stime, cutime, cstime: fields 14-17 of stat, counted from
        # the pid; here indexes 11-14 after the name's closing parenthesis.
        total += sum(int(value) for value in fields[11:15])
        pending.extend(children.get(pid, ()))
    return total / _TICK


def own_seconds(pid: int) -> float:
    """CPU-seconds of ``pid`` alone (its children not counted)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return sum(int(value) for value in fields[11:13]) / _TICK


def postmaster_pid(data_dir: Path) -> int | None:
    """The pid of the cluster's postmaster (first line of postmaster.pid)."""
    try:
        return int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
