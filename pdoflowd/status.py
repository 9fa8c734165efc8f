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
    """Where a posting (a batch of related jobs) stands.

    ``cancelled`` is a status of its own, set only by a cancel: the jobs it
    ended are ``errored_out`` with the error ``cancelled``.
    """

    PAUSED = "paused"
    EXECUTING = "executing"
    FINISHED = "finished"
    ERRORED_OUT = "errored_out"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """Whether the posting has ended (no job of it will be claimed).

        An errored-out posting may still have jobs running that were
        claimed before it errored out; a cancelled one has none.
        """
        return self in (
            PostingStatus.FINISHED,
            PostingStatus.ERRORED_OUT,
            PostingStatus.CANCELLED,
        )
