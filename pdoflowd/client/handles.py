"""What the client hands back: a posting made, a posting's state, the
result of a control, a job's result; and the ids they are asked by.

Owns these frozen values and :func:`as_uuid`, which reads a posting's or a
job's id from a UUID or its text. They are plain data: this module must
not connect, post or wait.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pdoflowd.arguments import shown
from pdoflowd.status import JobStatus, PostingStatus

__all__ = [
    "ControlResult",
    "JobControlResult",
    "JobInfo",
    "JobOutput",
    "JobResult",
    "Posting",
    "PostingState",
    "as_uuid",
]


@dataclass(frozen=True)
class Posting:
    """A posting just made: its id and the ids of its jobs, in order.

    The job ids are consecutive version 7 UUIDs of one millisecond, held
    as the first and how many (:class:`pdoflowd.ids.UuidRun`). ``existed``
    is true when a post with a key found the posting that holds the key
    and returned it instead (its id and job ids, nothing written).
    """

    id: uuid.UUID
    job_ids: Sequence[uuid.UUID]
    existed: bool = False


@dataclass(frozen=True)
class PostingState:
    """A posting's status, how many of its jobs are in each status, and
    the postings it waits for that have not ended yet."""

    id: uuid.UUID
    status: PostingStatus
    jobs: Mapping[JobStatus, int]
    waiting_for: tuple[uuid.UUID, ...] = ()

    @property
    def total(self) -> int:
        return sum(self.jobs.values())

    @property
    def ended(self) -> int:
        """Jobs done or errored out."""
        return self.jobs.get(JobStatus.DONE, 0) + self.jobs.get(
            JobStatus.ERRORED_OUT, 0
        )

    @property
    def fraction_ended(self) -> float:
        """The share of jobs that ended, from 0.0 to 1.0."""
        return self.ended / self.total if self.total else 0.0

    @property
    def finished(self) -> bool:
        return self.status.is_final

    def as_json(self) -> dict[str, Any]:
        """The stable JSON form (``pdoflow status --json``)."""
        return {
            "id": str(self.id),
            "status": self.status.value,
            "jobs": {s.value: self.jobs.get(s, 0) for s in JobStatus},
            "waiting_for": [str(u) for u in self.waiting_for],
        }


@dataclass(frozen=True)
class ControlResult:
    """A posting after pause, resume, cancel, retry or a status change:
    its status, and how many jobs were ended (cancel) or requeued (retry).
    """

    id: uuid.UUID
    status: PostingStatus
    jobs_changed: int


@dataclass(frozen=True)
class JobResult:
    """A job's end and its return value (``stored`` False: none was kept,
    because the job is not done or its posting does not store results)."""

    job_id: uuid.UUID
    status: JobStatus
    stored: bool
    value: Any
    error: str | None


@dataclass(frozen=True)
class JobInfo:
    """One job whole, as :meth:`Client.job` reads it: its posting, status,
    arguments (decoded), last error and traceback, its stored return value
    (``result_stored`` False: none kept), progress, timings (all
    timezone-aware, None where not reached) and the host and process id of
    the daemon that claimed it last."""

    id: uuid.UUID
    posting_id: uuid.UUID
    target_function: str
    entry_point: str
    status: JobStatus
    posting_status: PostingStatus
    priority: int
    attempt: int
    tries_remaining: int
    args: list[Any]
    kwargs: dict[str, Any]
    error: str | None
    traceback: str | None
    result_stored: bool
    result: Any
    progress: float | None
    progress_note: str | None
    created_at: dt.datetime
    run_after: dt.datetime | None
    claimed_at: dt.datetime | None
    started_at: dt.datetime | None
    completed_at: dt.datetime | None
    daemon_host: str | None
    daemon_pid: int | None


@dataclass(frozen=True)
class JobOutput:
    """What one attempt of a job wrote to stdout and stderr: the end of it
    (as text; at most the daemon's ``jobs.output_tail_bytes``) and how many
    bytes in all (``truncated``: more than was kept)."""

    job_id: uuid.UUID
    attempt: int
    output: str
    total_bytes: int
    written_at: dt.datetime

    @property
    def truncated(self) -> bool:
        return self.total_bytes > len(self.output.encode("utf-8"))


@dataclass(frozen=True)
class JobControlResult:
    """What a job's cancel or retry left: the job's status and its
    posting's."""

    id: uuid.UUID
    status: JobStatus
    posting_status: PostingStatus


def as_uuid(value: uuid.UUID | str, what: str = "posting") -> uuid.UUID:
    """A posting (or job) id from a UUID or its text; KeyError if not one."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise KeyError(f"{shown(value)} is not a {what} id") from None
