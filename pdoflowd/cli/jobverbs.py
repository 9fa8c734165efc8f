"""The verbs of one job: ``job``, ``cancel-job``, ``retry-job``, ``logs``.

Owns what they print: for people, a job's fields one per line (its
traceback last) and a line after a control; for scripts ``--json`` with
stable keys, every key always present. Reading and controlling are
:class:`pdoflowd.client.Client`'s (checked in the database by
``pdoflowd.control_job``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from pdoflowd.arguments import encode_value
from pdoflowd.cli import display
from pdoflowd.cli.output import UserError, print_json
from pdoflowd.client import Client, JobControlResult, JobInfo
from pdoflowd.exitcodes import EXIT_OK

__all__ = ["cancel_job", "job", "logs", "retry_job"]


def _when(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _stored(value: Any) -> Any:
    """A value as stored: non-finite floats tagged, so strict JSON."""
    return json.loads(encode_value(value, "value"))


def job_json(info: JobInfo) -> dict[str, Any]:
    """``pdoflow job --json``: every key always present."""
    return {
        "id": str(info.id),
        "posting_id": str(info.posting_id),
        "target_function": info.target_function,
        "entry_point": info.entry_point,
        "status": info.status.value,
        "posting_status": info.posting_status.value,
        "priority": info.priority,
        "attempt": info.attempt,
        "tries_remaining": info.tries_remaining,
        "args": _stored(info.args),
        "kwargs": _stored(info.kwargs),
        "error": info.error,
        "traceback": info.traceback,
        "result_stored": info.result_stored,
        "result": _stored(info.result) if info.result_stored else None,
        "progress": info.progress,
        "progress_note": info.progress_note,
        "created_at": _when(info.created_at),
        "run_after": _when(info.run_after),
        "claimed_at": _when(info.claimed_at),
        "started_at": _when(info.started_at),
        "completed_at": _when(info.completed_at),
        "daemon_host": info.daemon_host,
        "daemon_pid": info.daemon_pid,
    }


def job_lines(info: JobInfo) -> list[str]:
    """``pdoflow job``: a field a line, the traceback last."""
    ran = None
    if info.started_at and info.completed_at:
        ran = (info.completed_at - info.started_at).total_seconds()
    worker = "-"
    if info.daemon_host is not None:
        worker = f"{info.daemon_host} (daemon pid {info.daemon_pid})"
    fields = [
        ("job", str(info.id)),
        ("posting", f"{info.posting_id} ({info.posting_status.value})"),
        ("function", f"{info.target_function} ({info.entry_point})"),
        ("status", info.status.value),
        ("priority", str(info.priority)),
        ("attempts", f"{info.attempt} ({info.tries_remaining} tries left)"),
        ("args", json.dumps(_stored(info.args))),
        ("kwargs", json.dumps(_stored(info.kwargs))),
        ("created", display.timestamp(info.created_at)),
        ("run after", display.timestamp(info.run_after)),
        ("claimed", display.timestamp(info.claimed_at)),
        ("started", display.timestamp(info.started_at)),
        ("completed", display.timestamp(info.completed_at)),
        ("ran for", display.duration(ran) if ran is not None else "-"),
        ("worker host", worker),
    ]
    if info.progress is not None:
        note = f" {info.progress_note}" if info.progress_note else ""
        fields.append(("progress", f"{info.progress:.0%}{note}"))
    if info.result_stored:
        fields.append(("result", json.dumps(_stored(info.result))))
    fields.append(("error", info.error or "-"))
    lines = [f"{name + ':':<13}{value}" for name, value in fields]
    if info.traceback:
        lines += ["", info.traceback.rstrip("\n")]
    return lines


def job(client: Client, args: argparse.Namespace) -> int:
    info = client.job(args.job_id)
    if args.json:
        print_json(job_json(info))
    else:
        for line in job_lines(info):
            print(line)
    return EXIT_OK


def _print_control(result: JobControlResult, as_json: bool) -> int:
    if as_json:
        print_json(
            {
                "id": str(result.id),
                "status": result.status.value,
                "posting_status": result.posting_status.value,
            }
        )
    else:
        print(
            f"job {result.id}: {result.status.value}"
            f" (posting {result.posting_status.value})"
        )
    return EXIT_OK


def cancel_job(client: Client, args: argparse.Namespace) -> int:
    return _print_control(client.cancel_job(args.job_id), args.json)


def retry_job(client: Client, args: argparse.Namespace) -> int:
    result = client.retry_job(args.job_id, tries=args.tries)
    return _print_control(result, args.json)


def logs(client: Client, args: argparse.Namespace) -> int:
    """Print what one attempt of a job wrote (default: its last attempt)."""
    info = client.job(args.job_id)
    attempt = info.attempt if args.attempt is None else args.attempt
    if not 1 <= attempt <= max(info.attempt, 1):
        raise UserError(
            f"job {info.id} has had {info.attempt} attempt(s): no attempt"
            f" {attempt}"
        )
    found = {o.attempt: o for o in client.job_output(info.id)}
    output = found.get(attempt)
    if args.json:
        print_json(
            {
                "id": str(info.id),
                "attempt": attempt,
                "output": None if output is None else output.output,
                "total_bytes": 0 if output is None else output.total_bytes,
                "truncated": output is not None and output.truncated,
            }
        )
        return EXIT_OK
    if output is None:
        print(
            f"attempt {attempt} of job {info.id} wrote nothing that was kept",
            file=sys.stderr,
        )
        return EXIT_OK
    if output.truncated:
        print(
            f"(the last {len(output.output.encode('utf-8'))} of"
            f" {output.total_bytes} bytes attempt {attempt} wrote)",
            file=sys.stderr,
        )
    sys.stdout.write(output.output)
    return EXIT_OK
