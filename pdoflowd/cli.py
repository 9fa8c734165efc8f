"""The ``pdoflow`` command: submit work and follow it from a shell.

Owns the verbs' arguments, reading JSON lines for ``submit``, and the output:
plain lines for people, ``--json`` with stable keys for scripts, one line on
stderr and a non-zero exit for any error a user can make (never a
traceback). The work itself is done by :class:`pdoflowd.client.Client`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn, TextIO

import psycopg

from pdoflowd import __version__
from pdoflowd.arguments import ArgumentError, encode_job
from pdoflowd.client import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    Client,
    PostingError,
    PostingState,
    WaitTimeout,
)
from pdoflowd.status import JobStatus, PostingStatus

# 1 and 2 are what ``wait`` reports about the posting, so errors of the
# command itself use sysexits.h codes that cannot be mistaken for them.
EXIT_OK = 0
EXIT_ERRORED = 1
EXIT_TIMEOUT = 2
EXIT_USAGE = 64  # EX_USAGE: bad arguments or input, no such posting
EXIT_FAILURE = 69  # EX_UNAVAILABLE: the database cannot be reached or used
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class UserError(Exception):
    """A mistake in what the user gave; printed as one line."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors as one line and the usage exit code."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see {self.prog} --help)", EXIT_USAGE)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds, got {text!r}"
        ) from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds, at least 0, got {text!r}"
        )
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(
            f"expected a positive number of seconds, got {text!r}"
        )
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="pdoflow", description="Submit work to pdoflowd and follow it."
    )
    parser.add_argument(
        "--version", action="version", version=f"pdoflow {__version__}"
    )
    parser.add_argument(
        "--dsn",
        help="PostgreSQL connection string (default: $PDOFLOW_DSN, then "
        "libpq's PG* variables)",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)

    submit = verbs.add_parser(
        "submit",
        help="post a job per JSON line read from stdin",
        description="Each line is a JSON array of positional arguments or "
        'an object {"args": [...], "kwargs": {...}, "priority": n}. '
        "Prints the new posting's id.",
    )
    submit.add_argument("entry_point", help="package.module.function")
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--tries", type=int, default=None)
    submit.add_argument("--json", action="store_true")

    status = verbs.add_parser("status", help="a posting's status and counts")
    status.add_argument("posting_id")
    status.add_argument("--json", action="store_true")

    wait = verbs.add_parser(
        "wait",
        help="wait for a posting to end (exit 0 finished, 1 errored out, "
        "2 timeout)",
    )
    wait.add_argument("posting_id")
    wait.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        help="give up after this many seconds (exit 2)",
    )
    wait.add_argument(
        "--interval",
        type=_positive_seconds,
        default=0.5,
        help="seconds between two looks at the posting",
    )
    wait.add_argument("--json", action="store_true")
    return parser


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
            f"line {number}: unknown key {unknown[0]!r} (expected "
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


def _print_state(state: PostingState, as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json.dumps(state.as_json()), file=out)
        return
    print(f"posting {state.id}: {state.status.value}", file=out)
    width = max(len(s.value) for s in JobStatus)
    for status in JobStatus:
        print(
            f"  {status.value:<{width}}  {state.jobs.get(status, 0)}", file=out
        )


def submit(
    client: Client, args: argparse.Namespace, stdin: Iterable[str | bytes]
) -> int:
    posargs, kwargs, priorities = parse_job_lines(stdin, args.priority)
    posting = client.post(
        args.entry_point, posargs, kwargs, priorities, tries=args.tries
    )
    if args.json:
        print(json.dumps({"id": str(posting.id), "jobs": len(posting.job_ids)}))
    else:
        print(posting.id)
    return EXIT_OK


def status(client: Client, args: argparse.Namespace) -> int:
    _print_state(client.status(args.posting_id), args.json, sys.stdout)
    return EXIT_OK


def wait(client: Client, args: argparse.Namespace) -> int:
    try:
        state = client.wait(
            args.posting_id, timeout=args.timeout, poll_interval=args.interval
        )
    except WaitTimeout as exc:
        _print_state(exc.state, args.json, sys.stdout)
        print(f"pdoflow: timed out: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    _print_state(state, args.json, sys.stdout)
    return EXIT_OK if state.status is PostingStatus.FINISHED else EXIT_ERRORED


def _fail(message: str, code: int) -> NoReturn:
    print(f"pdoflow: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    client = Client(args.dsn)
    try:
        if args.verb == "submit":
            # Bytes, so that a line that is not UTF-8 is named like any
            # other malformed line; no stdin at all is no jobs.
            stdin = sys.stdin
            lines = [] if stdin is None else getattr(stdin, "buffer", stdin)
            return submit(client, args, lines)
        if args.verb == "status":
            return status(client, args)
        return wait(client, args)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except (UserError, PostingError) as exc:
        _fail(str(exc), EXIT_USAGE)
    except KeyError as exc:
        _fail(str(exc.args[0]) if exc.args else "not found", EXIT_USAGE)
    except psycopg.OperationalError as exc:
        _fail(f"cannot reach the database: {_first_line(exc)}", EXIT_FAILURE)
    except psycopg.Error as exc:
        _fail(f"database error: {_first_line(exc)}", EXIT_FAILURE)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
