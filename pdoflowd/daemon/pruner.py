"""The pruning chore of the database session: retention, a pass at a time.

Owns one daemon's share of pruning ended postings
(:mod:`pdoflowd.db.retention` holds the SQL): taking the pruning lock
without waiting (one daemon at a time prunes, the one whose session took
it first, while its connection lives), then deleting a few chunks of
``retention.batch`` jobs, each its own transaction, and saying when the
next pass is due (:func:`pdoflowd.policy.next_prune_in`). A pass is
bounded (:func:`pdoflowd.policy.prune_goes_on`), and each statement of a
chunk (:func:`pdoflowd.policy.prune_statement_timeout`), so that the
session's heartbeat never waits behind it for long; a lock or statement
timeout ends the pass, not the connection. It must not fork, block on a lock,
or speak to the supervisor: the session reports what it returns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import psycopg

from pdoflowd import policy
from pdoflowd.config import Config
from pdoflowd.db import retention
from pdoflowd.db.common import Connection
from pdoflowd.db.retention import PruneCount

log = logging.getLogger("pdoflowd.daemon.pruner")

# Postings one pass looks at, at most.
_POSTINGS_PER_PASS = 100


@dataclass(frozen=True)
class PassResult:
    """What a pass removed, and in how many seconds the next one is due."""

    removed: PruneCount
    next_in_s: float


class Pruner:
    """Pruning for one database session; remembers the connection it holds
    the pruning lock on."""

    def __init__(self) -> None:
        self._locked_on: Connection | None = None

    def prune(self, conn: Connection, config: Config) -> PassResult:
        """One pass on ``conn``: nothing unless this session holds the
        pruning lock (taken here when free, never waited for)."""
        settings = config.retention
        interval = settings.interval_s
        if self._locked_on is not conn:
            if not retention.try_lock_pruning(conn):
                return PassResult(PruneCount(), interval)
            self._locked_on = conn
            log.info("this daemon prunes ended postings (retention)")
        ages = policy.retention_ages(
            settings.finished_after_s, settings.errored_after_s
        )
        heartbeat = config.daemon.heartbeat_interval_s
        started = time.monotonic()
        try:
            done = retention.prune_some(
                conn,
                ages,
                batch=settings.batch,
                postings=_POSTINGS_PER_PASS,
                go_on=lambda chunks: policy.prune_goes_on(
                    chunks, time.monotonic() - started, heartbeat
                ),
                statement_timeout_s=policy.prune_statement_timeout(
                    config.database.statement_timeout_s, heartbeat
                ),
            )
        except psycopg.Error:
            self._locked_on = None
            raise
        removed = done.removed
        if done.interrupted:
            log.warning("pruning paused, retrying later: %s", done.interrupted)
        if removed.postings or removed.jobs:
            log.info(
                "pruned %d posting(s) and %d job(s) that had ended",
                removed.postings,
                removed.jobs,
            )
        took = time.monotonic() - started
        next_in = policy.next_prune_in(done.more_left, took, interval)
        return PassResult(removed, next_in)
