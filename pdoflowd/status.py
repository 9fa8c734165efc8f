"""The statuses of postings and jobs, as stored in the database.

This module owns the vocabulary only: which states exist and which are final.
It must not know how states change; that is the queue's SQL and the policies.
"""

from __future__ import annotations

import enum


class JobStatus(str, enum.Enum):
    """Where one job stands."""

    WAITING = "waiting"
    EXECUTING = "executing"
    DONE = "done"
    ERRORED_OUT = "errored_out"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.ERRORED_OUT)


class PostingStatus(str, enum.Enum):
    """Where a posting (a batch of related jobs) stands."""

    PAUSED = "paused"
    EXECUTING = "executing"
    FINISHED = "finished"
    ERRORED_OUT = "errored_out"

    @property
    def is_final(self) -> bool:
        return self in (PostingStatus.FINISHED, PostingStatus.ERRORED_OUT)
