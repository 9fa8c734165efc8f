"""The statuses of postings and jobs, and the kinds of a claim's end.

This module owns the vocabulary only: which states exist and which are
final, and how a worker may say a claimed job's attempt ended. It must not
know how states change; that is the queue's SQL and the policies.
"""

from __future__ import annotations

import enum


class JobStatus(str, enum.Enum):
    """Where one job stands.

    ``held``: its posting waits for other postings to end (not claimable
    until they do; see :mod:`pdoflowd.db.dependencies`).
    """

    WAITING = "waiting"
    EXECUTING = "executing"
    DONE = "done"
    ERRORED_OUT = "errored_out"
    # Last, so that what lists the statuses in order lists the four that
    # postings without dependencies have as it always did.
    HELD = "held"

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


class OutcomeKind(str, enum.Enum):
    """How a claimed job's attempt ended, as its outcome is written.

    The values are what the SQL function ``pdoflowd.end_job`` receives
    (see schema.sql), and the ``outcome`` label values of the same name in
    the metrics: they must not change. ``done``: the function returned.
    ``failed`` and ``timeout``: it raised, or ran past its timeout (a try
    used; the job waits again while tries remain). ``refused``: its entry
    point names nothing a job may run (errored out at once). ``released``:
    never started (back to waiting, no try used).
    """

    DONE = "done"
    FAILED = "failed"
    TIMEOUT = "timeout"
    REFUSED = "refused"
    RELEASED = "released"


# Each kind by its value: a dict lookup, several times cheaper per outcome
# on the hot path than calling OutcomeKind(value).
OUTCOME_KINDS: dict[str, OutcomeKind] = {k.value: k for k in OutcomeKind}


def outcome_kind(kind: str) -> OutcomeKind:
    """``kind`` as an :class:`OutcomeKind`; ValueError if it is none."""
    if type(kind) is OutcomeKind:
        return kind
    try:
        return OUTCOME_KINDS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"{kind!r} is not a valid OutcomeKind") from None
