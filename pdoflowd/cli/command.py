"""``pdoflow``'s ``main``: from a command line to an exit status.

Owns running one verb: finding the database (a connection string libpq
would misread is refused before it is used, and its secrets are remembered
so that no error shows them), dispatching to the verb, and mapping every
error a user can make to one line on stderr and its exit status from
:mod:`pdoflowd.exitcodes` (never a traceback). It must not print a verb's
output: each verb's module does.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import psycopg

from pdoflowd.cli.executing import ConfigUnusable, execute_job
from pdoflowd.cli.following import (
    list_postings,
    posting_status,
    priority_stats,
    results,
    status,
    wait,
)
from pdoflowd.cli.graphing import graph
from pdoflowd.cli.jobverbs import cancel_job, job, logs, retry_job
from pdoflowd.cli.output import UserError, fail
from pdoflowd.cli.parser import build_parser
from pdoflowd.cli.retaining import export, prune
from pdoflowd.cli.scheduling import list_schedules
from pdoflowd.cli.steering import (
    cancel,
    pause,
    resume,
    retry,
    set_posting_status,
)
from pdoflowd.cli.submitting import submit
from pdoflowd.client import (
    Client,
    ConnectionConfigError,
    ConnectionTarget,
    PostingError,
    PostingStateError,
    PruningNotAllowed,
)
from pdoflowd.config import dsn_problems
from pdoflowd.exitcodes import (
    EXIT_CONFIG,
    EXIT_INTERRUPTED,
    EXIT_NOPERM,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from pdoflowd.redaction import dsn_secrets, remember

__all__ = ["VERBS", "main"]

VERBS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "status": status,
    "wait": wait,
    "list-postings": list_postings,
    "posting-status": posting_status,
    "priority-stats": priority_stats,
    "graph": graph,
    "execute-job": execute_job,
    "set-posting-status": set_posting_status,
    "pause": pause,
    "resume": resume,
    "cancel": cancel,
    "retry": retry,
    "results": results,
    "prune": prune,
    "export": export,
    "job": job,
    "cancel-job": cancel_job,
    "retry-job": retry_job,
    "logs": logs,
    "schedules": list_schedules,
}


# ---------------------------------------------------------------- errors


def _secrets(target: ConnectionTarget | None) -> list[str]:
    """Passwords that must never be printed."""
    found = [os.environ.get("PGPASSWORD", "")]
    if target is not None:
        found.append(target.password or "")
        found.extend(dsn_secrets(target.dsn))
    return [s for s in found if s]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pdoflow`` on ``argv`` (default: the process's arguments) and
    return the exit status; an error exits with its own."""
    args = build_parser().parse_args(argv)
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
        fail("interrupted", EXIT_INTERRUPTED)
    except PruningNotAllowed as exc:
        fail(str(exc), EXIT_NOPERM)
    except ConfigUnusable as exc:
        fail(f"{args.config}: {exc}", EXIT_CONFIG)
    except (
        UserError,
        PostingError,
        PostingStateError,
        ConnectionConfigError,
    ) as exc:
        fail(str(exc), EXIT_USAGE)
    except KeyError as exc:
        fail(str(exc.args[0]) if exc.args else "not found", EXIT_USAGE)
    except psycopg.OperationalError as exc:
        fail(f"cannot reach the database: {_first_line(exc)}", EXIT_UNAVAILABLE)
    except psycopg.Error as exc:
        fail(f"database error: {_first_line(exc)}", EXIT_UNAVAILABLE)
