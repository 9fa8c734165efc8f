"""``pdoflow submit``: a posting from JSON lines on stdin.

Owns reading those lines (a JSON array of positional arguments, or an
object with ``args``, ``kwargs`` and ``priority``) and checking every job
as the client would before anything is written, so that a problem is named
by its line rather than by the job's index. The posting itself is
:meth:`pdoflowd.client.Client.post`'s; this module must not write to the
database otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Iterable
from typing import Any

from pdoflowd.arguments import ArgumentError, encode_job, shown
from pdoflowd.cli.output import UserError, print_json
from pdoflowd.client import MAX_PRIORITY, MIN_PRIORITY, Client
from pdoflowd.exitcodes import EXIT_OK

__all__ = ["parse_job_lines", "submit"]

_JOB_KEYS = frozenset({"args", "kwargs", "priority"})


def parse_job_lines(
    lines: Iterable[str | bytes], default_priority: int
) -> tuple[list[list[Any]], list[dict[str, Any]], list[int]]:
    """Read ``submit``'s input; name the first malformed line.

    Every job is checked here as the client would check it, so a problem
    is reported by its line number rather than its index among the jobs.
    """
    posargs: list[list[Any]] = []
    kwargs: list[dict[str, Any]] = []
    priorities: list[int] = []
    for number, raw in enumerate(lines, start=1):
        line = _decode_line(raw, number)
        if not line.strip():
            continue
        args, kw, priority = _parse_job_line(line, number, default_priority)
        posargs.append(args)
        kwargs.append(kw)
        priorities.append(priority)
    if not posargs:
        raise UserError("no jobs on stdin")
    return posargs, kwargs, priorities


def _decode_line(raw: str | bytes, number: int) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"line {number}: not UTF-8 (byte {exc.start + 1}: {exc.reason})"
        ) from None


def _parse_job_line(
    line: str, number: int, default_priority: int
) -> tuple[list[Any], dict[str, Any], int]:
    try:
        # Without the line break, the column is the one the user sees.
        value = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        raise UserError(
            f"line {number}: not JSON: {exc.msg} at column {exc.colno}"
        ) from None
    except RecursionError:
        raise UserError(f"line {number}: nested too deeply") from None
    except ValueError as exc:  # a number too long for Python to read
        raise UserError(f"line {number}: not usable: {exc}") from None
    if isinstance(value, list):
        value = {"args": value}
    if not isinstance(value, dict):
        raise UserError(
            f"line {number}: expected a JSON array or object, got "
            f"{_json_type(value)}"
        )
    unknown = sorted(set(value) - _JOB_KEYS)
    if unknown:
        raise UserError(
            f"line {number}: unknown key {shown(unknown[0])} (expected "
            '"args", "kwargs" or "priority")'
        )
    args = value.get("args", [])
    kw = value.get("kwargs", {})
    priority = value.get("priority", default_priority)
    if not isinstance(args, list):
        raise UserError(
            f'line {number}: "args" must be an array, got {_json_type(args)}'
        )
    if not isinstance(kw, dict):
        raise UserError(
            f'line {number}: "kwargs" must be an object, got {_json_type(kw)}'
        )
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise UserError(
            f'line {number}: "priority" must be an integer, got '
            f"{_json_type(priority)}"
        )
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise UserError(
            f'line {number}: "priority" must be between {MIN_PRIORITY} and '
            f"{MAX_PRIORITY}"
        )
    try:
        encode_job(number - 1, args, kw)
    except ArgumentError as exc:
        raise UserError(f"line {number}: {exc.path}: {exc.problem}") from None
    return args, kw, priority


def _json_type(value: Any) -> str:
    """A value's type in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def submit(
    client: Client, args: argparse.Namespace, stdin: Iterable[str | bytes]
) -> int:
    """Post a job per line of ``stdin`` to ``args.entry_point``; print the
    posting's id (or ``--json``: its id and how many jobs)."""
    posargs, kwargs, priorities = parse_job_lines(stdin, args.priority)
    run_after: dt.datetime | float | None = args.run_after
    if args.delay is not None:
        run_after = args.delay
    posting = client.post(
        args.entry_point,
        posargs,
        kwargs,
        priorities,
        tries=args.tries,
        paused=args.paused,
        run_after=run_after,
        requires=args.requires,
        max_running=args.max_running,
        uses=args.uses,
        store_result=True if args.store_result else None,
        key=args.key,
        key_scope=args.key_scope,
        after=args.after,
        on_failure=args.on_failure,
    )
    if args.json:
        print_json(
            {
                "id": str(posting.id),
                "jobs": len(posting.job_ids),
                "existed": posting.existed,
            }
        )
    else:
        print(posting.id)
    if posting.existed:
        # Exit 0 all the same: a script re-run after a crash goes on.
        print(
            f"posting {posting.id} holds the key {args.key!r} already:"
            " nothing posted",
            file=sys.stderr,
        )
    return EXIT_OK
