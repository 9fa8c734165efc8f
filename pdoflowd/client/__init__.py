"""The client: define jobs, post work to the queue, follow it and steer it.

``@job`` and :data:`Registry` (the seed's way: ``Registry[f].post_work``),
:class:`Client` (post, status, wait, wait_for, pause, resume, cancel, retry,
results, shared variables) for code and tools. This module only gathers
the public names of its parts; it must hold no code of its own:

- :mod:`~pdoflowd.client.definitions`: ``@job``, ``Registry``,
  ``JobDefinition``, which functions may be jobs;
- :mod:`~pdoflowd.client.checks`: what a posting may be, checked before
  anything of it is written, and its jobs encoded as rows;
- :mod:`~pdoflowd.client.client`: the ``Client``, connecting, posting,
  reading, waiting and steering;
- :mod:`~pdoflowd.client.connection`: which database (explicit DSN,
  ``PDOFLOW_DSN``, libpq's environment, the seed's
  ``~/.config/pdoflow/db.conf``);
- :mod:`~pdoflowd.client.handles`: what the client hands back;
- :mod:`~pdoflowd.client.errors`: what it raises.

The client never imports the daemon nor the ``pdoflow`` command.
"""

from __future__ import annotations

from pdoflowd.arguments import ArgumentError
from pdoflowd.client.checks import MAX_PRIORITY as MAX_PRIORITY
from pdoflowd.client.checks import MAX_TRIES as MAX_TRIES
from pdoflowd.client.checks import MIN_PRIORITY as MIN_PRIORITY
from pdoflowd.client.checks import PostingJobs as PostingJobs
from pdoflowd.client.checks import check_key as check_key
from pdoflowd.client.checks import check_max_running as check_max_running
from pdoflowd.client.checks import check_posting as check_posting
from pdoflowd.client.checks import check_requires as check_requires
from pdoflowd.client.checks import when_to_run as when_to_run
from pdoflowd.client.client import MAX_PRUNE_BATCH as MAX_PRUNE_BATCH
from pdoflowd.client.client import Client
from pdoflowd.client.connection import (
    LIBPQ_TARGET_VARIABLES as LIBPQ_TARGET_VARIABLES,
)
from pdoflowd.client.connection import SEED_CONFIG as SEED_CONFIG
from pdoflowd.client.connection import (
    ConnectionTarget,
    resolve_connection,
)
from pdoflowd.client.connection import read_seed_config as read_seed_config
from pdoflowd.client.definitions import DEFAULT_TRIES as DEFAULT_TRIES
from pdoflowd.client.definitions import (
    JobDefinition,
    Registry,
    job,
)
from pdoflowd.client.definitions import (
    check_entry_point as check_entry_point,
)
from pdoflowd.client.definitions import entry_point_of as entry_point_of
from pdoflowd.client.errors import (
    ConnectionConfigError,
    PostingEnded,
    PostingError,
    PostingStateError,
    PruningNotAllowed,
    WaitTimeout,
)
from pdoflowd.client.handles import (
    ControlResult,
    JobControlResult,
    JobInfo,
    JobOutput,
    JobResult,
    Posting,
    PostingState,
)
from pdoflowd.client.handles import as_uuid as as_uuid
from pdoflowd.db.postings import KeyScope as KeyScope
from pdoflowd.sharedvars import SharedVariableError, SharedVariables

# ``from pdoflowd.client import *`` gives these. The names imported above
# ``as`` themselves (limits, defaults and helpers the command line, the
# benchmark and tools use) stay importable from here as well.
__all__ = [
    "ArgumentError",
    "Client",
    "ConnectionConfigError",
    "ConnectionTarget",
    "ControlResult",
    "JobControlResult",
    "JobDefinition",
    "JobInfo",
    "JobOutput",
    "JobResult",
    "KeyScope",
    "Posting",
    "PostingEnded",
    "PostingError",
    "PostingState",
    "PostingStateError",
    "PruningNotAllowed",
    "Registry",
    "SharedVariableError",
    "SharedVariables",
    "WaitTimeout",
    "job",
    "resolve_connection",
]
