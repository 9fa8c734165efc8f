"""``pdoflow schedules``: the schedules of the live daemons.

Owns listing each schedule as the live daemons published it (every daemon
publishes its ``[[schedules]]`` when its database session starts), with
its newest run, the posting that run made, and its next fire time as
computed here from the published definition and the database's time. It
must not write to the database.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from pdoflowd import schedules
from pdoflowd.cli import display
from pdoflowd.cli.output import fail, print_json
from pdoflowd.client import Client
from pdoflowd.db.schedules import ScheduleListing
from pdoflowd.exitcodes import EXIT_OK, EXIT_UNAVAILABLE

__all__ = ["list_schedules", "next_run"]


def next_run(listing: ScheduleListing, now: dt.datetime) -> dt.datetime | None:
    """The first fire time after ``now``; None when this host cannot
    tell (a time zone its database does not know)."""
    try:
        if listing.cron is not None:
            times = schedules.FireTimes(
                cron=schedules.cron_expression(listing.cron),
                zone=schedules.time_zone(listing.timezone),
            )
        else:
            times = schedules.FireTimes(every_s=listing.every_s)
        return times.next_after(now)
    except ValueError:
        return None


def _when(listing: ScheduleListing) -> str:
    if listing.cron is not None:
        return f"{listing.cron} ({listing.timezone})"
    return f"every {listing.every_s} s"


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _as_json(listing: ScheduleListing, now: dt.datetime) -> dict[str, Any]:
    return {
        "name": listing.name,
        "entry_point": listing.entry_point,
        "cron": listing.cron,
        "every_s": listing.every_s,
        "timezone": listing.timezone,
        "priority": listing.priority,
        "backfill": listing.backfill,
        "key": listing.key_template,
        "args": listing.args,
        "kwargs": listing.kwargs,
        "hosts": list(listing.hosts),
        "last_run_at": _iso(listing.last_run_at),
        "last_posted_at": _iso(listing.last_posted_at),
        "last_posting": (
            None if listing.last_posting is None else str(listing.last_posting)
        ),
        "last_posting_status": listing.last_posting_status,
        "next_run_at": _iso(next_run(listing, now)),
    }


def list_schedules(client: Client, args: argparse.Namespace) -> int:
    """Print the live daemons' schedules (``--json``: one array)."""
    try:
        now, listings = client.schedules()
    except PermissionError as exc:
        # As for any privilege the role lacks (docs/cli.md).
        fail(str(exc), EXIT_UNAVAILABLE)
    if args.json:
        print_json([_as_json(listing, now) for listing in listings])
        return EXIT_OK
    if not listings:
        print("no schedules: no live daemon runs any")
        return EXIT_OK
    rows = []
    for listing in listings:
        posting = "-"
        if listing.last_posting is not None:
            posting = f"{listing.last_posting} {listing.last_posting_status}"
        elif listing.last_run_at is not None:
            posting = "(deleted)"
        upcoming = next_run(listing, now)
        rows.append(
            [
                listing.name,
                listing.entry_point,
                _when(listing),
                ",".join(listing.hosts),
                display.timestamp(listing.last_run_at),
                "?" if upcoming is None else display.timestamp(upcoming),
                posting,
            ]
        )
    headers = ["NAME", "ENTRY POINT", "WHEN", "HOSTS", "LAST RUN", "NEXT RUN"]
    for line in display.table([*headers, "LAST POSTING"], rows):
        print(line)
    names = [listing.name for listing in listings]
    for name in sorted({n for n in names if names.count(n) > 1}):
        print(
            f"warning: daemons define schedule {name} differently; each"
            " definition is a row"
        )
    return EXIT_OK
