"""The ``pdoflow`` command: submit work and follow it from a shell.

Owns the verbs' arguments, reading JSON lines for ``submit``, and the output:
plain lines for people, ``--json`` with stable keys for scripts, one line on
stderr and a non-zero exit for any error a user can make (never a
traceback). The work itself is done by :class:`pdoflowd.client.Client`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn, TextIO

import psycopg

from pdoflowd import __version__
from pdoflowd.client import (
    Client,
    PostingError,
    PostingState,
    WaitTimeout,
)
from pdoflowd.status import JobStatus, PostingStatus

EXIT_OK = 0
EXIT_ERRORED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 2
EXIT_FAILURE = 1


class UserError(Exception):
    """A mistake in what the user gave; printed as one line."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    wait.add_argument("--timeout", type=float, default=None)
    wait.add_argument("--interval", type=float, default=0.5)
    wait.add_argument("--json", action="store_true")
    return parser


_JOB_KEYS = frozenset({"args", "kwargs", "priority"})


def parse_job_lines(
    lines: Iterable[str], default_priority: int
) -> tuple[list[list[Any]], list[dict[str, Any]], list[int]]:
    """Read ``submit``'s input; name the first malformed line."""
    posargs: list[list[Any]] = []
    kwargs: list[dict[str, Any]] = []
    priorities: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise UserError(f"line {number}: not JSON: {exc}") from None
        if isinstance(value, list):
            value = {"args": value}
        if not isinstance(value, dict):
            raise UserError(
                f"line {number}: expected a JSON array or object, got "
                f"{type(value).__name__}"
            )
        unknown = sorted(set(value) - _JOB_KEYS)
        if unknown:
            raise UserError(f"line {number}: unknown key {unknown[0]!r}")
        args = value.get("args", [])
        kw = value.get("kwargs", {})
        priority = value.get("priority", default_priority)
        if not isinstance(args, list):
            raise UserError(f'line {number}: "args" must be an array')
        if not isinstance(kw, dict):
            raise UserError(f'line {number}: "kwargs" must be an object')
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise UserError(f'line {number}: "priority" must be an integer')
        posargs.append(args)
        kwargs.append(kw)
        priorities.append(priority)
    if not posargs:
        raise UserError("no jobs on stdin")
    return posargs, kwargs, priorities


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


def submit(client: Client, args: argparse.Namespace, stdin: TextIO) -> int:
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
            return submit(client, args, sys.stdin)
        if args.verb == "status":
            return status(client, args)
        return wait(client, args)
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
