"""The verbs of retention: ``prune`` and ``export``.

Owns what they print: ``prune`` says how many postings and jobs it
removed (or, with ``--dry-run``, would), ``--json`` as one object;
``export`` writes a posting as JSON lines to stdout or to a file that
appears only once the export is complete. Which postings may go, and
how, is :meth:`pdoflowd.client.Client.prune`'s; the lines are
:meth:`pdoflowd.client.Client.export`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from pdoflowd.cli.output import UserError, fail, print_json
from pdoflowd.client import Client
from pdoflowd.durations import duration_text
from pdoflowd.exitcodes import EXIT_ERRORED, EXIT_OK, EXIT_UNAVAILABLE

__all__ = ["export", "prune"]


def prune(client: Client, args: argparse.Namespace) -> int:
    statuses = [s.value for s in args.status]
    try:
        count = client.prune(
            args.older_than, args.status, dry_run=args.dry_run, batch=args.batch
        )
    except TimeoutError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    if args.json:
        print_json(
            {
                "dry_run": args.dry_run,
                "older_than_s": args.older_than,
                "statuses": statuses,
                "postings": count.postings,
                "jobs": count.jobs,
            }
        )
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(
            f"{verb} {count.postings} postings and {count.jobs} jobs "
            f"({', '.join(statuses)}, ended more than "
            f"{duration_text(args.older_than)} ago)"
        )
    return EXIT_OK


def export(client: Client, args: argparse.Namespace) -> int:
    if args.output is None:
        out = sys.stdout
        try:
            client.export(args.posting_id, lambda line: out.write(line + "\n"))
            out.flush()
        except BrokenPipeError:
            # The reader left (e.g. head): nothing more can go to it, and
            # the interpreter must not try again as it exits.
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
            fail(
                "stdout was closed before the export was complete",
                EXIT_ERRORED,
            )
        return EXIT_OK
    _export_to(client, args.posting_id, args.output)
    return EXIT_OK


def _export_to(client: Client, posting_id: str, path: Path) -> None:
    """Write the export next to ``path`` and rename it there when whole: a
    file at ``path`` is always a complete export."""
    directory = path.parent
    try:
        fd, name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".tmp", dir=directory
        )
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with open(fd, "w", encoding="utf-8") as out:
            client.export(posting_id, lambda line: out.write(line + "\n"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(name, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise UserError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
