"""The verbs that read: ``status``, ``wait``, ``list-postings``,
``posting-status``, ``priority-stats`` and ``results``.

Owns what they print: plain lines and tables for people (``wait`` draws a
progress bar on a terminal, a line per change elsewhere), and for scripts
``--json`` with stable keys, every key always present; and ``wait``'s exit
status, which says how the posting ended. The reading is
:class:`pdoflowd.client.Client`'s and the shapes of tables
:mod:`pdoflowd.cli.display`'s; this module must not change a posting.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from typing import Any, TextIO

from pdoflowd.arguments import encode_value
from pdoflowd.cli import display
from pdoflowd.cli.output import print_json
from pdoflowd.client import Client, JobResult, PostingState, WaitTimeout
from pdoflowd.db.postings import JobRow, PostingSummary
from pdoflowd.exitcodes import (
    EXIT_CANCELLED,
    EXIT_ERRORED,
    EXIT_OK,
    EXIT_TIMEOUT,
)
from pdoflowd.status import JobStatus, PostingStatus

__all__ = [
    "list_postings",
    "posting_status",
    "priority_stats",
    "results",
    "status",
    "wait",
]


def _print_state(state: PostingState, as_json: bool, out: TextIO) -> None:
    if as_json:
        print_json(state.as_json(), out)
        return
    print(f"posting {state.id}: {state.status.value}", file=out)
    width = max(len(s.value) for s in JobStatus)
    for status in JobStatus:
        count = state.jobs.get(status, 0)
        if status is JobStatus.HELD and not count:
            continue
        print(f"  {status.value:<{width}}  {count}", file=out)
    if state.waiting_for:
        print(
            "  waiting for " + ", ".join(str(u) for u in state.waiting_for),
            file=out,
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


def _key_line(summary: PostingSummary) -> str:
    if summary.key is None:
        return "-"
    return f"{summary.key!r} (held {summary.key_scope})"


def _dependency_lines(summary: PostingSummary) -> list[tuple[str, str]]:
    lines = []
    if summary.after:
        lines.append(
            (
                "after",
                ", ".join(str(u) for u in summary.after)
                + f" (on failure: {summary.on_failure})",
            )
        )
        lines.append(
            (
                "waiting for",
                ", ".join(str(u) for u in summary.waiting_for) or "-",
            )
        )
    if summary.cancel_reason:
        lines.append(("cancelled", summary.cancel_reason))
    return lines


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
        "key": summary.key,
        "key_scope": summary.key_scope if summary.key is not None else None,
        "after": [str(u) for u in summary.after],
        "waiting_for": [str(u) for u in summary.waiting_for],
        "on_failure": summary.on_failure,
        "cancel_reason": summary.cancel_reason,
        "max_running": summary.max_running,
        "uses": list(summary.uses),
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
        print_json([_summary_json(s) for s in found])
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
        uses = ", ".join(summary.uses) or "no resource"
        return (
            "no running daemon would claim these jobs (they require: "
            f"{needs}; use: {uses}; poster {summary.poster})"
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
        print_json(shape)
        return EXIT_OK
    counts = summary.jobs
    waiting = counts.get(JobStatus.WAITING, 0)
    lines = [
        ("poster", summary.poster),
        ("target", f"{summary.target_function} ({summary.entry_point})"),
        ("created", display.timestamp(summary.created_at)),
        ("finished", display.timestamp(summary.finished_at)),
        ("requires", ", ".join(summary.requires) or "-"),
        (
            "max running",
            "-" if summary.max_running is None else str(summary.max_running),
        ),
        ("uses", ", ".join(summary.uses) or "-"),
        ("results", "stored" if summary.store_result else "not stored"),
        ("tries", str(summary.tries)),
        ("key", _key_line(summary)),
        *_dependency_lines(summary),
        ("jobs", str(summary.total)),
        *(
            [("  held", str(counts[JobStatus.HELD]))]
            if counts.get(JobStatus.HELD)
            else []
        ),
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
        print_json(
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
        print_json([_result_json(r) for r in found])
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
