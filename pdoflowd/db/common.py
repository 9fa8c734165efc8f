"""What every statement module of the database layer shares.

Owns the notification channels, the rule that makes one statement its own
transaction, the connection type, and how text becomes storable. Knows
nothing of processes, signals or configuration.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

NOTIFY_CHANNEL = "pdoflowd_jobs"
# Sent when a posting is cancelled (the posting's internal id as payload):
# its claimed jobs must not start, and their runs must stop.
CANCEL_CHANNEL = "pdoflowd_cancel"

Connection = psycopg.Connection[Any]


@contextlib.contextmanager
def one_statement(conn: Connection) -> Iterator[None]:
    """Make one statement its own committed transaction.

    On a connection in autocommit mode outside any transaction the
    statement already is one: sending it alone saves the round trips of
    BEGIN and COMMIT. Anywhere else it runs in a transaction block (or a
    savepoint of the caller's) that commits, or releases, when it ends.
    """
    idle = conn.info.transaction_status == TransactionStatus.IDLE
    if conn.autocommit and idle:
        yield
    else:
        with conn.transaction():
            yield


JSON_ENCODER = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":")
)


def storable_text(text: str) -> str:
    """``text`` as PostgreSQL can store it: NUL and lone surrogates (from
    undecodable bytes) spelt out as backslash escapes instead of refused."""
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\x00", "\\x00")
