"""One ``Client.post`` of N no-op jobs, timed, in a process of its own.

``python -m bench.enqueue DSN N`` prints one JSON object: the seconds the
call took and the process's resident memory before it and at its peak
(VmRSS, then VmHWM with the high-water mark reset to VmRSS just before the
call), so the growth is the call's own. Not ``ru_maxrss``: Linux carries
it over from the parent through fork and exec, so a large parent would
show as growth here. The arguments are built before the first reading:
they are the caller's, not the client's. The posting is paused, so no
daemon runs it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

from pdoflowd.client import Client


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Set VmHWM to VmRSS (Linux 4.0 and later; else it stays the peak of
    this process so far, warm-up included)."""
    with (
        contextlib.suppress(OSError),
        open("/proc/self/clear_refs", "w") as clear_refs,
    ):
        clear_refs.write("5")


def measure(dsn: str, count: int) -> dict[str, float]:
    """Post ``count`` jobs in one call; seconds and memory in KiB."""
    client = Client(dsn)
    posargs = [[index] for index in range(count)]
    # A warm-up post: connections, imports and caches are not per job.
    client.post("bench.jobs.noop", [[0]], paused=True)
    _reset_peak()
    before = _status_kib("VmRSS")
    started = time.perf_counter()
    client.post("bench.jobs.noop", posargs, paused=True)
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM")
    return {
        "jobs": count,
        "seconds": seconds,
        "rss_before_kib": before,
        "rss_peak_kib": peak,
        "rss_growth_kib": max(0, peak - before),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.enqueue DSN N", file=sys.stderr)
        return 2
    print(json.dumps(measure(argv[0], int(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
