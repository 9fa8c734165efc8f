"""The ``pdoflow`` command: submit work, follow it and steer it from a shell.

Owns the verbs' arguments, reading JSON lines for ``submit``, and the output:
tables and plain lines for people (a progress bar for ``wait`` on a
terminal), ``--json`` with stable keys for scripts, one line on stderr and a
non-zero exit for any error a user can make (never a traceback, never a
password: every error passes through :func:`pdoflowd.redaction.redact`, and
a connection string libpq would misread is refused before it is used).
The work itself is done by :class:`pdoflowd.client.Client`, and
``execute-job`` by :mod:`pdoflowd.daemon.foreground`.

This module only gathers the public names of its parts; it must hold no
code of its own:

- :mod:`~pdoflowd.cli.command`: ``main``, the verbs by name, and which
  error ends with which exit status;
- :mod:`~pdoflowd.cli.parser`: the command line's verbs and options;
- :mod:`~pdoflowd.cli.submitting`: ``submit`` and its JSON lines;
- :mod:`~pdoflowd.cli.following`: the verbs that read and ``wait``;
- :mod:`~pdoflowd.cli.steering`: the verbs that control a posting;
- :mod:`~pdoflowd.cli.jobverbs`: ``job``, ``cancel-job``, ``retry-job``;
- :mod:`~pdoflowd.cli.executing`: ``execute-job``;
- :mod:`~pdoflowd.cli.output`: JSON out, errors as one line;
- :mod:`~pdoflowd.cli.display`: tables and the progress bar.
"""

from __future__ import annotations

from pdoflowd.cli import display
from pdoflowd.cli.command import VERBS, main
from pdoflowd.cli.executing import execute_job
from pdoflowd.cli.following import (
    list_postings,
    posting_status,
    priority_stats,
    results,
    status,
    wait,
)
from pdoflowd.cli.output import UserError
from pdoflowd.cli.steering import (
    cancel,
    pause,
    resume,
    retry,
    set_posting_status,
)
from pdoflowd.cli.submitting import parse_job_lines, submit
from pdoflowd.redaction import redact

__all__ = [
    "VERBS",
    "UserError",
    "cancel",
    "display",
    "execute_job",
    "list_postings",
    "main",
    "parse_job_lines",
    "pause",
    "posting_status",
    "priority_stats",
    "redact",
    "results",
    "resume",
    "retry",
    "set_posting_status",
    "status",
    "submit",
    "wait",
]
