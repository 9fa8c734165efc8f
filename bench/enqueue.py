"""One ``Client.post`` of N no-op jobs, timed, in a process of its own.

``python -m bench.enqueue DSN N`` prints one JSON object: the seconds the
call took and the process's resident memory before it and at its peak
(VmRSS, ru_maxrss), so the growth is the call's own. The arguments are
built before the first reading: they are the caller's, not the client's.
The posting is paused, so no daemon runs it.
"""

from __future__ import annotations

import json
import resource
import sys
import time

from pdoflowd.client import Client


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise LookupError("VmRSS not in /proc/self/status")


def measure(dsn: str, count: int) -> dict[str, float]:
    """Post ``count`` jobs in one call; seconds and memory in KiB."""
    client = Client(dsn)
    posargs = [[index] for index in range(count)]
    # A warm-up post: connections, imports and caches are not per job.
    client.post("bench.jobs.noop", [[0]], paused=True)
    before = _rss_kib()
    started = time.perf_counter()
    client.post("bench.jobs.noop", posargs, paused=True)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
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
