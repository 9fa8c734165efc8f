"""How ``pdoflow`` speaks: JSON on stdout for scripts, and an error as one
line on stderr with its exit status.

Owns :class:`UserError` (a mistake in what the user gave), :func:`fail`,
which every error leaves by (through :func:`pdoflowd.redaction.redact`:
never a password, never more than one line), and :func:`print_json`. It
must not decide which exit status an error gets: its caller does.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn, TextIO

from pdoflowd.redaction import redact

__all__ = ["UserError", "fail", "print_json"]


class UserError(Exception):
    """A mistake in what the user gave; printed as one line."""


def fail(message: str, code: int) -> NoReturn:
    """Print ``pdoflow: message`` on stderr, redacted and on one line, and
    exit with ``code``."""
    line = " ".join(redact(message).split("\n"))
    print(f"pdoflow: {line}", file=sys.stderr)
    sys.exit(code)


def print_json(value: Any, out: TextIO | None = None) -> None:
    """One JSON value on one line, on ``out`` (default: stdout)."""
    print(json.dumps(value), file=out or sys.stdout)
