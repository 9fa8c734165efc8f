"""pdoflowd: a PostgreSQL job queue daemon for Python functions.

The public face for people who submit work: decorate a function with
:func:`job`, post work through :data:`Registry` or :class:`Client`, and read
statuses as :class:`JobStatus` and :class:`PostingStatus`. Inside a running
job, :func:`current_job` tells the job about itself.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pdoflowd.client import Client, Posting, PostingState, Registry, job
from pdoflowd.jobcontext import JobContext, NoJobContext, current_job
from pdoflowd.status import JobStatus, PostingStatus

__all__ = [
    "Client",
    "JobContext",
    "JobStatus",
    "NoJobContext",
    "Posting",
    "PostingState",
    "PostingStatus",
    "Registry",
    "__version__",
    "current_job",
    "job",
]
