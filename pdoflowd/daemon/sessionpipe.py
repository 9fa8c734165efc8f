"""The pipe protocol between the supervisor and its database session.

Owns what the two say to each other as JSON lines over two pipes: the
requests the supervisor sends (:class:`Request`, a :class:`TakeBack` of a
dead worker's jobs), the events the session answers (:class:`Event`,
:class:`SessionEvent`), and how lines are encoded and split. It must not
read or write the pipes: each side does that with its own.
"""

from __future__ import annotations

import enum
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("pdoflowd.daemon.sessionpipe")


class Request(enum.Enum):
    """What the supervisor asks of its database session."""

    TAKE_BACK = "take_back"
    STOP = "stop"


class Event(enum.Enum):
    """What the database session tells the supervisor."""

    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    SCHEMA_NOT_CURRENT = "schema_not_current"
    NOTIFIED = "notified"
    TAKEN_BACK = "taken_back"
    RESCUED = "rescued"
    DB_ERROR = "db_error"
    QUEUE = "queue"
    CANCELLED = "cancelled"
    CLAIMS_CANCELLED = "claims_cancelled"
    SCHEDULE_RUNS = "schedule_runs"
    PRUNED = "pruned"
    LIMITS_DIFFER = "limits_differ"


@dataclass(frozen=True)
class TakeBack:
    """Jobs to take back from a worker that ended: those claimed under
    ``owner``; ``running`` is the one it was running, which uses a try."""

    seq: int
    owner: uuid.UUID
    running: int | None
    reason: str

    def as_line(self) -> dict[str, Any]:
        return {
            "request": Request.TAKE_BACK.value,
            "seq": self.seq,
            "owner": str(self.owner),
            "running": self.running,
            "reason": self.reason,
        }

    @classmethod
    def from_line(cls, line: dict[str, Any]) -> TakeBack:
        return cls(
            int(line["seq"]),
            uuid.UUID(str(line["owner"])),
            None if line["running"] is None else int(line["running"]),
            str(line["reason"]),
        )


@dataclass(frozen=True)
class SessionEvent:
    """One line from the database session: its kind and its fields."""

    kind: Event
    fields: dict[str, Any] = field(default_factory=dict)


def encode(message: dict[str, Any]) -> bytes:
    """One message as one line; whole messages below PIPE_BUF stay whole."""
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


def decode_lines(buffer: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """The whole lines in ``buffer`` as messages, and what is left."""
    *lines, rest = buffer.split(b"\n")
    messages = []
    for line in lines:
        try:
            message = json.loads(line)
        except ValueError:
            log.warning("unreadable line between supervisor and session")
            continue
        if isinstance(message, dict):
            messages.append(message)
    return messages, rest
