"""Every exit status pdoflowd's programs end with, in one place.

``pdoflowd`` (the daemon), ``pdoflow`` (the command line) and the worker
processes share these. Errors of a command itself use the sysexits.h codes
from :mod:`os` where they mean that, so a script or systemd can tell a bad
config (78) or an unreachable database (69) from a job's or a posting's
result (1 to 3, what ``pdoflow wait`` and ``execute-job`` report).
"""

from __future__ import annotations

import os

EXIT_OK = os.EX_OK

# What ``pdoflow wait`` reports about a posting, and ``execute-job`` about
# its job (1 also when the job was abandoned on its timeout).
EXIT_ERRORED = 1
EXIT_TIMEOUT = 2
EXIT_CANCELLED = 3

# The daemon's own ends.
EXIT_FAILURE = 1  # the supervisor failed, or a crash loop stopped it
EXIT_WORKER_BOOT_FAILED = (
    3  # a worker could not start (its supervisor reads it)
)
EXIT_SCHEMA = 4  # the database schema is not the version this code needs

# sysexits.h, for errors of the command itself.
EXIT_USAGE = os.EX_USAGE  # 64: bad arguments or input, no such posting
EXIT_UNAVAILABLE = os.EX_UNAVAILABLE  # 69: the database cannot be used
EXIT_NOPERM = os.EX_NOPERM  # 77: the role may not do that (prune)
EXIT_CONFIG = os.EX_CONFIG  # 78: the configuration is invalid

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
