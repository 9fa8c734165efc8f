"""The ``pdoflow`` command: submit work, follow it and steer it from a shell.

Owns the verbs' arguments, reading JSON lines for ``submit``, and the output:
tables and plain lines for people (a progress bar for ``wait`` on a
terminal), ``--json`` with stable keys for scripts, one line on stderr and a
non-zero exit for any error a user can make (never a traceback, never a
password: every error passes through :func:`pdoflowd.redaction.redact`, and
a connection string libpq would misread is refused before it is used).
The work itself is done by :class:`pdoflowd.client.Client`, and
``execute-job`` by :mod:`pdoflowd.daemon.foreground`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import psycopg

from pdoflowd import __version__
from pdoflowd.arguments import ArgumentError, encode_job, encode_value, shown
from pdoflowd.cli import display
from pdoflowd.client import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    Client,
    ConnectionConfigError,
    ConnectionTarget,
    ControlResult,
    JobResult,
    PostingError,
    PostingState,
    PostingStateError,
    WaitTimeout,
    as_uuid,
)
from pdoflowd.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    dsn_problems,
    load,
)
from pdoflowd.daemon import foreground
from pdoflowd.db.postings import JobRow, PostingSummary
from pdoflowd.exitcodes import (
    EXIT_CANCELLED,
    EXIT_CONFIG,
    EXIT_ERRORED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from pdoflowd.redaction import dsn_secrets, redact, remember
from pdoflowd.status import JobStatus, PostingStatus


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


def _parser() -> argparse.ArgumentParser:
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
        "--store-result",
        action="store_true",
        help="keep each job's return value (see `results`)",
    )
    submit.add_argument(
        "--paused", action="store_true", help="post it paused (see `resume`)"
    )
    when = submit.add_mutually_exclusive_group()
    when.add_argument(
        "--delay",
        type=_seconds,
        default=None,
        metavar="S",
        help="run the jobs no sooner than S seconds from now",
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
        help="give up after this many seconds (exit 2)",
    )
    wait.add_argument(
        "--interval",
        type=_positive_seconds,
        default=0.5,
        help="seconds between two looks at the posting",
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
    return parser


# ---------------------------------------------------------------- submit

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
        store_result=True if args.store_result else None,
    )
    if args.json:
        _print_json({"id": str(posting.id), "jobs": len(posting.job_ids)})
    else:
        print(posting.id)
    return EXIT_OK


# ---------------------------------------------------------------- following


def _print_json(value: Any, out: TextIO | None = None) -> None:
    print(json.dumps(value), file=out or sys.stdout)


def _print_state(state: PostingState, as_json: bool, out: TextIO) -> None:
    if as_json:
        _print_json(state.as_json(), out)
        return
    print(f"posting {state.id}: {state.status.value}", file=out)
    width = max(len(s.value) for s in JobStatus)
    for status in JobStatus:
        print(
            f"  {status.value:<{width}}  {state.jobs.get(status, 0)}", file=out
        )


def status(client: Client, args: argparse.Namespace) -> int:
    _print_state(client.status(args.posting_id), args.json, sys.stdout)
    return EXIT_OK


class _Progress:
    """``wait``'s running account: a bar redrawn in place on a terminal,
    a line per change otherwise, nothing with ``--json``."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out = out
        self.enabled = not as_json
        self.terminal = self.enabled and out.isatty()
        self.meter = display.RateMeter()
        self.last = ""

    def __call__(self, state: PostingState) -> None:
        if not self.enabled:
            return
        self.meter.add(time.monotonic(), state.ended)
        if self.terminal:
            line = display.progress_bar(
                state.ended,
                state.total,
                self.meter.rate(),
                state.status.value,
            )
            self.out.write("\r" + line + "\x1b[K")
            self.out.flush()
            self.last = line
            return
        jobs = state.jobs
        line = (
            f"posting {state.id}: {state.status.value}, "
            f"{state.ended}/{state.total} ended "
            f"({jobs.get(JobStatus.DONE, 0)} done, "
            f"{jobs.get(JobStatus.ERRORED_OUT, 0)} errored out, "
            f"{jobs.get(JobStatus.EXECUTING, 0)} executing)"
        )
        if line != self.last:
            print(line, file=self.out, flush=True)
            self.last = line

    def close(self) -> None:
        """End the bar's line; later calls print nothing more."""
        if self.terminal and self.last:
            self.out.write("\n")
            self.out.flush()
        self.enabled = self.terminal = False
        self.last = ""


_WAIT_EXITS = {
    PostingStatus.FINISHED: EXIT_OK,
    PostingStatus.ERRORED_OUT: EXIT_ERRORED,
    PostingStatus.CANCELLED: EXIT_CANCELLED,
}


def wait(client: Client, args: argparse.Namespace) -> int:
    progress = _Progress(sys.stdout, args.json)
    try:
        state = client.wait(
            args.posting_id,
            timeout=args.timeout,
            poll_interval=args.interval,
            on_progress=progress,
        )
    except WaitTimeout as exc:
        progress.close()
        _print_state(exc.state, args.json, sys.stdout)
        print(f"pdoflow: timed out: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    finally:
        progress.close()
    _print_state(state, args.json, sys.stdout)
    return _WAIT_EXITS.get(state.status, EXIT_ERRORED)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _percent_done(summary: PostingSummary) -> float:
    done = summary.jobs.get(JobStatus.DONE, 0)
    return round(100.0 * done / summary.total, 1) if summary.total else 0.0


def _summary_json(summary: PostingSummary) -> dict[str, Any]:
    return {
        "id": str(summary.uuid),
        "status": summary.status.value,
        "poster": summary.poster,
        "target_function": summary.target_function,
        "entry_point": summary.entry_point,
        "created_at": _iso(summary.created_at),
        "finished_at": _iso(summary.finished_at),
        "requires": list(summary.requires),
        "store_result": summary.store_result,
        "tries": summary.tries,
        "timeout_s": summary.timeout_s,
        "jobs": {s.value: summary.jobs.get(s, 0) for s in JobStatus},
        "delayed": summary.delayed,
        "percent_done": _percent_done(summary),
        "mean_progress": summary.mean_progress,
        "claimable_by": summary.claimable_by,
    }


def _job_json(job: JobRow) -> dict[str, Any]:
    return {
        "id": str(job.uuid),
        "status": job.status.value,
        "priority": job.priority,
        "attempt": job.attempt,
        "tries_remaining": job.tries_remaining,
        "run_after": _iso(job.run_after),
        "progress": job.progress,
        "progress_note": job.progress_note,
        "error": job.error,
        "completed_at": _iso(job.completed_at),
    }


def list_postings(client: Client, args: argparse.Namespace) -> int:
    found = client.postings(limit=args.limit, status=args.status)
    if args.json:
        _print_json([_summary_json(s) for s in found])
        return EXIT_OK
    rows = [
        [
            str(s.uuid),
            s.status.value,
            f"{_percent_done(s):.0f}%",
            str(s.total),
            display.timestamp(s.created_at),
            display.one_line(s.poster, 20),
            display.one_line(s.target_function, 40),
        ]
        for s in found
    ]
    headers = ["ID", "STATUS", "DONE", "JOBS", "CREATED", "POSTER", "TARGET"]
    for line in display.table(headers, rows):
        print(line)
    return EXIT_OK


def _waiting_note(summary: PostingSummary) -> str | None:
    """Why waiting jobs may not run, if it can be told."""
    if not summary.jobs.get(JobStatus.WAITING, 0):
        return None
    if summary.status is not PostingStatus.EXECUTING:
        status = summary.status.value
        return f"waiting jobs do not run while the posting is {status}"
    if summary.claimable_by == 0:
        needs = ", ".join(summary.requires) or "nothing"
        return (
            "no running daemon would claim these jobs (they require: "
            f"{needs}; poster {summary.poster})"
        )
    return None


def posting_status(client: Client, args: argparse.Namespace) -> int:
    summary = client.summary(args.posting_id)
    jobs = (
        client.jobs(args.posting_id, limit=args.limit) if args.show_jobs else []
    )
    if args.json:
        shape = _summary_json(summary)
        if args.show_jobs:
            shape["job_list"] = [_job_json(j) for j in jobs]
            shape["more_jobs"] = max(0, summary.total - len(jobs))
        _print_json(shape)
        return EXIT_OK
    counts = summary.jobs
    waiting = counts.get(JobStatus.WAITING, 0)
    lines = [
        ("poster", summary.poster),
        ("target", f"{summary.target_function} ({summary.entry_point})"),
        ("created", display.timestamp(summary.created_at)),
        ("finished", display.timestamp(summary.finished_at)),
        ("requires", ", ".join(summary.requires) or "-"),
        ("results", "stored" if summary.store_result else "not stored"),
        ("tries", str(summary.tries)),
        ("jobs", str(summary.total)),
        (
            "  waiting",
            f"{waiting}"
            + (f" ({summary.delayed} delayed)" if summary.delayed else ""),
        ),
        ("  executing", str(counts.get(JobStatus.EXECUTING, 0))),
        ("  done", str(counts.get(JobStatus.DONE, 0))),
        ("  errored_out", str(counts.get(JobStatus.ERRORED_OUT, 0))),
        ("done", f"{_percent_done(summary):.1f}%"),
    ]
    if summary.mean_progress is not None:
        lines.append(("running at", f"{summary.mean_progress:.0%} on average"))
    note = _waiting_note(summary)
    if note:
        lines.append(("note", note))
    print(f"posting {summary.uuid}: {summary.status.value}")
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"  {key:<{width}}  {value}")
    if args.show_jobs:
        print()
        rows = [
            [
                str(j.uuid),
                j.status.value,
                str(j.priority),
                str(j.attempt),
                str(j.tries_remaining),
                "-" if j.progress is None else f"{j.progress:.0%}",
                display.one_line(j.error or j.progress_note),
            ]
            for j in jobs
        ]
        headers = ["JOB", "STATUS", "PRI", "TRY", "LEFT", "PROGRESS", "NOTE"]
        for line in display.table(headers, rows):
            print(line)
        if summary.total > len(jobs):
            print(f"… and {summary.total - len(jobs)} more (see --limit)")
    return EXIT_OK


def priority_stats(client: Client, args: argparse.Namespace) -> int:
    stats = client.priority_stats()
    if args.json:
        _print_json(
            [
                {
                    "priority": s.priority,
                    "waiting": s.waiting,
                    "runnable": s.runnable,
                    "executing": s.executing,
                }
                for s in stats
            ]
        )
        return EXIT_OK
    rows = [
        [str(s.priority), str(s.waiting), str(s.runnable), str(s.executing)]
        for s in stats
    ]
    for line in display.table(
        ["PRIORITY", "WAITING", "RUNNABLE", "EXECUTING"], rows
    ):
        print(line)
    return EXIT_OK


# ---------------------------------------------------------------- steering


def _print_control(result: ControlResult, as_json: bool, what: str) -> int:
    if as_json:
        _print_json(
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


def _result_json(result: JobResult) -> dict[str, Any]:
    return {
        "id": str(result.job_id),
        "status": result.status.value,
        "stored": result.stored,
        "result": _stored_json(result.value) if result.stored else None,
        "error": result.error,
    }


def _stored_json(value: Any) -> Any:
    """A result as stored: non-finite floats tagged, so strict JSON."""
    return json.loads(encode_value(value, "result"))


def results(client: Client, args: argparse.Namespace) -> int:
    found = client.results(args.posting_id)
    if args.json:
        _print_json([_result_json(r) for r in found])
        return EXIT_OK
    rows = []
    for r in found:
        if r.stored:
            shown = json.dumps(_stored_json(r.value))
        else:
            shown = display.one_line(r.error) or "-"
        rows.append(
            [str(r.job_id), r.status.value, display.one_line(shown, 200)]
        )
    for line in display.table(["JOB", "STATUS", "RESULT"], rows):
        print(line)
    return EXIT_OK


def execute_job(client: Client, args: argparse.Namespace) -> int:
    job_uuid = as_uuid(args.job_id, "job")
    try:
        config = load(args.config)
    except ConfigError as exc:
        problems = "; ".join(f"{p.key}: {p.message}" for p in exc.problems)
        raise _ConfigProblem(problems) from None
    try:
        run = foreground.execute_job(
            config,
            dsn=client.dsn,
            password=client.target.password,
            job_uuid=job_uuid,
        )
    except foreground.JobRefused as exc:
        raise UserError(str(exc)) from None
    outcome = run.outcome
    if args.json:
        _print_json(
            {
                "id": str(run.job.uuid),
                "posting_id": str(run.job.posting_uuid),
                "entry_point": run.job.entry_point,
                "attempt": run.job.attempt,
                "status": run.status.value,
                "error": outcome.error,
                "seconds": round(run.seconds, 6),
                "result": None
                if outcome.result is None
                else json.loads(outcome.result),
            }
        )
    else:
        if outcome.traceback:
            print(outcome.traceback.rstrip(), file=sys.stderr)
        detail = f": {outcome.error}" if outcome.error else ""
        print(
            f"job {run.job.uuid} ({run.job.entry_point}, attempt "
            f"{run.job.attempt}): {run.status.value} after "
            f"{display.duration(run.seconds)}{detail}"
        )
    if run.interrupted:
        _fail("interrupted; the job is waiting again", EXIT_INTERRUPTED)
    return EXIT_OK if run.status is JobStatus.DONE else EXIT_ERRORED


class _ConfigProblem(Exception):
    """execute-job's daemon config cannot be used."""


VERBS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "status": status,
    "wait": wait,
    "list-postings": list_postings,
    "posting-status": posting_status,
    "priority-stats": priority_stats,
    "execute-job": execute_job,
    "set-posting-status": set_posting_status,
    "pause": pause,
    "resume": resume,
    "cancel": cancel,
    "retry": retry,
    "results": results,
}


# ---------------------------------------------------------------- errors


def _secrets(target: ConnectionTarget | None) -> list[str]:
    """Passwords that must never be printed."""
    found = [os.environ.get("PGPASSWORD", "")]
    if target is not None:
        found.append(target.password or "")
        found.extend(dsn_secrets(target.dsn))
    return [s for s in found if s]


def _fail(message: str, code: int) -> NoReturn:
    line = " ".join(redact(message).split("\n"))
    print(f"pdoflow: {line}", file=sys.stderr)
    sys.exit(code)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    remember(_secrets(None))
    try:
        client = Client(args.dsn)
        # Checked before its pieces become secrets, which would otherwise
        # mask parts of the message that says what is wrong with it.
        problems = dsn_problems(client.dsn)
        if problems:
            raise UserError(f"{client.target.source}: {'; '.join(problems)}")
        remember(_secrets(client.target))
        if args.verb == "submit":
            # Bytes, so that a line that is not UTF-8 is named like any
            # other malformed line; no stdin at all is no jobs.
            stdin = sys.stdin
            lines = [] if stdin is None else getattr(stdin, "buffer", stdin)
            return submit(client, args, lines)
        return VERBS[args.verb](client, args)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except _ConfigProblem as exc:
        _fail(f"{args.config}: {exc}", EXIT_CONFIG)
    except (
        UserError,
        PostingError,
        PostingStateError,
        ConnectionConfigError,
    ) as exc:
        _fail(str(exc), EXIT_USAGE)
    except KeyError as exc:
        _fail(str(exc.args[0]) if exc.args else "not found", EXIT_USAGE)
    except psycopg.OperationalError as exc:
        _fail(
            f"cannot reach the database: {_first_line(exc)}", EXIT_UNAVAILABLE
        )
    except psycopg.Error as exc:
        _fail(f"database error: {_first_line(exc)}", EXIT_UNAVAILABLE)
