"""``pdoflow``'s command line: its verbs, their options and the values
they take.

Owns the :mod:`argparse` parser (what ``--help`` shows) and the checks of
option values (durations, counts, times with an offset, statuses); a bad
command line ends as every error does, one line and the usage exit
status. It must not connect nor run a verb: :mod:`pdoflowd.cli.command`
does.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any, NoReturn

from pdoflowd import __version__
from pdoflowd.cli.output import fail
from pdoflowd.client import (
    MAX_PRUNE_BATCH,
    KeyScope,
    PostingError,
    check_key,
    check_max_running,
)
from pdoflowd.config import DEFAULT_CONFIG_PATH
from pdoflowd.durations import DurationError, parse_duration
from pdoflowd.exitcodes import EXIT_USAGE
from pdoflowd.status import PostingStatus

__all__ = ["build_parser"]


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors as one line and the usage exit code."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)", EXIT_USAGE)


def _seconds(text: str) -> float:
    """Seconds, as a number (the older spelling) or a duration (30s, 5m)."""
    try:
        return parse_duration(text, bare_seconds=True)
    except DurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _key(text: str) -> str:
    try:
        check_key(text)
    except PostingError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _max_running(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number, got {text!r}"
        ) from None
    try:
        check_max_running(value)
    except PostingError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(
            f"expected a positive duration, got {text!r}"
        )
    return value


def _age(text: str) -> float:
    """A duration with its unit: a bare number would be ambiguous here."""
    try:
        return parse_duration(text)
    except DurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_ENDED = [s.value for s in PostingStatus if s.is_final]


def _ended_statuses(text: str) -> list[PostingStatus]:
    """A comma-separated list of ended posting statuses."""
    names = [name.strip() for name in text.split(",")]
    wrong = [name for name in names if name not in _ENDED]
    if wrong or not names:
        raise argparse.ArgumentTypeError(
            f"expected ended posting statuses separated by commas "
            f"({', '.join(_ENDED)}), got {text!r}"
        )
    return [PostingStatus(name) for name in dict.fromkeys(names)]


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number, got {text!r}"
        ) from None
    if not 1 <= value <= 2**31 - 1:
        raise argparse.ArgumentTypeError(
            f"expected a number from 1 to {2**31 - 1}, got {text!r}"
        )
    return value


def _batch(text: str) -> int:
    value = _count(text)
    if value > MAX_PRUNE_BATCH:
        raise argparse.ArgumentTypeError(
            f"expected a number from 1 to {MAX_PRUNE_BATCH}, got {text!r}"
        )
    return value


def _moment(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time such as 2030-01-31T18:00:00+00:00, "
            f"got {text!r}"
        ) from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"give the time with its UTC offset (+00:00), got {text!r}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: the global options and every verb."""
    parser = _ArgumentParser(
        prog="pdoflow",
        description="Submit work to pdoflowd, follow it and steer it.",
    )
    parser.add_argument(
        "--version", action="version", version=f"pdoflow {__version__}"
    )
    parser.add_argument(
        "--dsn",
        help="PostgreSQL connection string (default: $PDOFLOW_DSN, then "
        "libpq's PG* variables, then ~/.config/pdoflow/db.conf)",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)

    def verb(name: str, text: str, **kwargs: Any) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=text, **kwargs)
        sub.add_argument(
            "--json", action="store_true", help="print JSON for scripts"
        )
        return sub

    submit = verb(
        "submit",
        "post a job per JSON line read from stdin",
        description="Each line is a JSON array of positional arguments or "
        'an object {"args": [...], "kwargs": {...}, "priority": n}. '
        "Prints the new posting's id.",
    )
    submit.add_argument("entry_point", help="package.module.function")
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--tries", type=int, default=None)
    submit.add_argument(
        "--requires",
        action="append",
        default=None,
        metavar="CAPABILITY",
        help="a capability the daemon must provide (repeat for more)",
    )
    submit.add_argument(
        "--max-running",
        type=_max_running,
        default=None,
        metavar="N",
        help="at most N of its jobs executing at once, across all hosts",
    )
    submit.add_argument(
        "--uses",
        action="append",
        default=None,
        metavar="NAME",
        help="a resource its jobs use, bounded cluster-wide by the daemons'"
        " jobs.limits (repeat for more)",
    )
    submit.add_argument(
        "--store-result",
        action="store_true",
        help="keep each job's return value (see `results`)",
    )
    submit.add_argument(
        "--paused", action="store_true", help="post it paused (see `resume`)"
    )
    submit.add_argument(
        "--key",
        type=_key,
        default=None,
        metavar="K",
        help="an idempotency key: while a posting of yours with key K has"
        " not ended, print its id instead of posting again",
    )
    submit.add_argument(
        "--key-scope",
        choices=[scope.value for scope in KeyScope],
        default=KeyScope.ACTIVE.value,
        help="how long the key stays taken: until the posting ends"
        " (active, the default) or as long as it exists (forever)",
    )
    submit.add_argument(
        "--after",
        action="append",
        default=None,
        metavar="POSTING",
        help="hold the jobs until this posting has finished (repeat for more)",
    )
    submit.add_argument(
        "--on-failure",
        choices=["cancel", "run"],
        default="cancel",
        help="when a posting of --after errors out or is cancelled: cancel "
        "this one too (the default), or run it once they have all ended",
    )
    when = submit.add_mutually_exclusive_group()
    when.add_argument(
        "--delay",
        type=_seconds,
        default=None,
        metavar="DURATION",
        help="run the jobs no sooner than DURATION from now (seconds, or "
        "e.g. 90s, 5m, 2h, 1d)",
    )
    when.add_argument(
        "--run-after",
        type=_moment,
        default=None,
        metavar="TIME",
        help="run the jobs no sooner than TIME (ISO 8601 with offset)",
    )

    status = verb("status", "a posting's status and counts")
    status.add_argument("posting_id")

    wait = verb(
        "wait",
        "wait for a posting to end (exit 0 finished, 1 errored out, "
        "2 timeout, 3 cancelled)",
    )
    wait.add_argument("posting_id")
    wait.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="DURATION",
        help="give up after DURATION (seconds, or e.g. 30s, 5m; exit 2)",
    )
    wait.add_argument(
        "--interval",
        type=_positive_seconds,
        default=0.5,
        metavar="DURATION",
        help="time between two looks at the posting (seconds, or e.g. 2s)",
    )

    listing = verb("list-postings", "the newest postings")
    listing.add_argument(
        "--status",
        choices=[s.value for s in PostingStatus],
        help="only postings of this status",
    )
    listing.add_argument("--limit", type=_count, default=50)

    detail = verb("posting-status", "one posting in full")
    detail.add_argument("posting_id")
    detail.add_argument(
        "--show-jobs", action="store_true", help="list its jobs too"
    )
    detail.add_argument(
        "--limit", type=_count, default=1000, help="jobs listed at most"
    )

    graph = verb(
        "graph",
        "the tree of postings a posting waits for (posted with --after)",
    )
    graph.add_argument("posting_id")
    graph.add_argument(
        "--depth", type=_count, default=20, help="levels shown at most"
    )

    verb("priority-stats", "unfinished jobs by priority")

    execute = verb(
        "execute-job",
        "run one job here, in the foreground, as a worker would",
        description="Claims the job with a fresh owner token, runs it in "
        "this process and records its outcome. Only entry points under "
        "jobs.allowed_modules of the daemon config are run.",
    )
    execute.add_argument("job_id")
    execute.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        help="the daemon config whose [jobs] applies (default "
        f"{DEFAULT_CONFIG_PATH})",
    )

    set_status = verb(
        "set-posting-status",
        "set a posting's status (paused, executing, cancelled, finished, "
        "errored_out)",
    )
    set_status.add_argument("posting_id")
    set_status.add_argument("status")

    for name, text in (
        ("pause", "stop claiming a posting's jobs"),
        ("resume", "claim a paused posting's jobs again"),
        ("cancel", "end a posting: its waiting and running jobs"),
    ):
        verb(name, text).add_argument("posting_id")
    retry = verb(
        "retry", "put a posting's errored-out jobs back with fresh tries"
    )
    retry.add_argument("posting_id")
    retry.add_argument(
        "--tries", type=_count, default=None, help="default: the posting's"
    )

    results = verb("results", "each job's end and stored return value")
    results.add_argument("posting_id")

    prune = verb(
        "prune",
        "delete ended postings older than a duration, with their jobs",
        description="Deletes postings that ended (finished, errored out or "
        "cancelled) longer ago than --older-than, with their jobs, results, "
        "profiles and shared variables, a batch of jobs per transaction. "
        "Postings with a job still running are kept. Needs a daemon's role.",
    )
    prune.add_argument(
        "--older-than",
        type=_age,
        required=True,
        metavar="DURATION",
        help="how long ago they ended: <number><s|m|h|d>, e.g. 30d",
    )
    prune.add_argument(
        "--status",
        type=_ended_statuses,
        default=[PostingStatus(name) for name in _ENDED],
        metavar="STATUSES",
        help="which ended postings, separated by commas (default: "
        f"{','.join(_ENDED)})",
    )
    prune.add_argument(
        "--dry-run",
        action="store_true",
        help="only count what would be deleted",
    )
    prune.add_argument(
        "--batch",
        type=_batch,
        default=1000,
        metavar="N",
        help="jobs per transaction (default 1000)",
    )

    export = verb(
        "export",
        "write a posting, its jobs and results as JSON lines",
        description="One JSON object per line: the posting, its shared "
        "variables, then each job with its arguments, outcome and stored "
        "result (in the stored encoding), in the order given.",
    )
    export.add_argument("posting_id")
    export.add_argument(
        "--output",
        type=Path,
        default=None,
        metavar="FILE",
        help="write to FILE (replaced only when the export is complete) "
        "instead of stdout",
    )

    one = verb("job", "one job in full: status, error, result, timings")
    one.add_argument("job_id")
    verb(
        "cancel-job", "end one job (a running one by ending its worker)"
    ).add_argument("job_id")
    retry_one = verb(
        "retry-job", "put one errored-out job back with fresh tries"
    )
    retry_one.add_argument("job_id")
    retry_one.add_argument(
        "--tries", type=_count, default=None, help="default: the posting's"
    )
    output = verb("logs", "what one attempt of a job wrote (its end)")
    output.add_argument("job_id")
    output.add_argument(
        "--attempt", type=_count, default=None, help="default: the last"
    )

    verb(
        "schedules",
        "the live daemons' schedules: last run, its posting, next run",
        description="Lists each [[schedules]] table the live daemons run "
        "(as published when their database session started), its newest "
        "run by any daemon, the posting that run made, and its next fire "
        "time. Needs the daemon's database role (or the schema owner).",
    )
    return parser
