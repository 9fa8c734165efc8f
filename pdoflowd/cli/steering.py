"""The verbs that steer a posting: ``pause``, ``resume``, ``cancel``,
``retry`` and ``set-posting-status``.

Owns what they print: the posting's status after the control and, for
those that change jobs, how many; ``--json`` with the same keys for each.
The controls themselves are :class:`pdoflowd.client.Client`'s (checked in
the database by ``pdoflowd.control_posting``); this module must not
decide whether one is allowed.
"""

from __future__ import annotations

import argparse

from pdoflowd.cli.output import print_json
from pdoflowd.client import Client, ControlResult
from pdoflowd.exitcodes import EXIT_OK
from pdoflowd.status import PostingStatus

__all__ = ["cancel", "pause", "resume", "retry", "set_posting_status"]


def _print_control(result: ControlResult, as_json: bool, what: str) -> int:
    if as_json:
        print_json(
            {
                "id": str(result.id),
                "status": result.status.value,
                "jobs_changed": result.jobs_changed,
            }
        )
    else:
        line = f"posting {result.id}: {result.status.value}"
        if what:
            line += f" ({result.jobs_changed} jobs {what})"
        print(line)
    return EXIT_OK


def pause(client: Client, args: argparse.Namespace) -> int:
    return _print_control(client.pause(args.posting_id), args.json, "")


def resume(client: Client, args: argparse.Namespace) -> int:
    return _print_control(client.resume(args.posting_id), args.json, "")


def cancel(client: Client, args: argparse.Namespace) -> int:
    return _print_control(client.cancel(args.posting_id), args.json, "ended")


def retry(client: Client, args: argparse.Namespace) -> int:
    result = client.retry(args.posting_id, tries=args.tries)
    return _print_control(result, args.json, "back to waiting")


def set_posting_status(client: Client, args: argparse.Namespace) -> int:
    result = client.set_status(args.posting_id, args.status)
    what = "ended" if result.status is PostingStatus.CANCELLED else ""
    return _print_control(result, args.json, what)
