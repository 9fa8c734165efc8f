"""The scheduler: the database session's chore that posts schedules' runs.

Owns, for the ``[[schedules]]`` of the config the session started with:
publishing them (``pdoflowd.schedules``) once per connection, each pass
reading every schedule's newest run and the database's time, posting the
fire times :func:`pdoflowd.schedules.due_runs` says are due (each claimed
with its posting in one transaction, so each posts once across every
daemon), telling the supervisor what it posted, and when the next pass is
due. It runs inside the session process, on the session's connection,
with its statement and lock timeouts; a database error ends the pass and
the session reconnects, after which this scheduler watches anew.
It must not fork, sleep or speak to the supervisor but through ``send``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import errors

from pdoflowd import schedules
from pdoflowd.arguments import encode_value
from pdoflowd.config import ScheduleConfig
from pdoflowd.daemon.sessionpipe import Event
from pdoflowd.db import common
from pdoflowd.db import schedules as db
from pdoflowd.db.postings import KeyBusy
from pdoflowd.entrypoints import split_entry_point

log = logging.getLogger("pdoflowd.daemon.scheduler")

# A posting a schedule makes gets the client's default tries.
TRIES = 3
# Fire times one schedule posts in one pass at most; more wait for the
# next pass, which comes at once.
PASS_LIMIT = 100
# The longest wait between two passes: each pass reports the newest runs.
LONGEST_WAIT_S = 60.0
# A pass that left due fire times (too many, or a claim timed out) is
# followed this soon by the next.
RETRY_WAIT_S = 0.05
# Without schedules, a pass only notices a new connection.
IDLE_WAIT_S = 5.0
# A pass woken a hair before the fire time it waits for (clocks, timers)
# would find nothing due and wake again at once: wait this much more.
_LATE_S = 0.002
# How often runs older than RUNS_KEPT_S are pruned (each schedule's newest
# run is always kept).
PRUNE_INTERVAL_S = 3600.0
RUNS_KEPT_S = 7 * 86400.0


class Scheduler:
    """The schedules of one session, and what it has posted of them."""

    def __init__(
        self,
        configs: Sequence[ScheduleConfig],
        daemon_id: uuid.UUID,
        send: Callable[..., None],
    ) -> None:
        self.configs = tuple(configs)
        self.daemon_id = daemon_id
        self.send = send
        self.times = {c.name: c.fire_times() for c in self.configs}
        self.targets = {
            c.name: split_entry_point(c.entry_point)[1] for c in self.configs
        }
        self.arguments = {
            c.name: (
                encode_value(list(c.args), "args"),
                encode_value(dict(c.kwargs), "kwargs"),
            )
            for c in self.configs
        }
        self.conn: common.Connection | None = None
        self.watching_since: dt.datetime | None = None
        # Seconds from the end of the last pass to the next one.
        self.wait_s = 0.0
        self.pruned_at: float | None = None
        self.reported: dict[str, float] = {}

    def published(self) -> list[db.PublishedSchedule]:
        return [
            db.PublishedSchedule(
                name=c.name,
                entry_point=c.entry_point,
                cron=c.cron or None,
                every_s=None if c.cron else c.every_s,
                timezone=c.timezone,
                priority=c.priority,
                backfill=c.backfill,
                key_template=c.key_template,
                args_json=self.arguments[c.name][0],
                kwargs_json=self.arguments[c.name][1],
            )
            for c in self.configs
        ]

    def run(self, conn: common.Connection) -> None:
        """One pass: post what is due, report it, plan the next pass.

        A database error is raised (the session reconnects); any other
        failure is logged and the next pass tried a while later, so that
        a fault in one schedule never ends the session's other chores.
        """
        try:
            self.run_pass(conn)
        except psycopg.Error:
            raise
        except Exception:
            log.exception("schedules: the pass failed; trying again later")
            self.wait_s = LONGEST_WAIT_S

    def run_pass(self, conn: common.Connection) -> None:
        started = time.monotonic()
        if not self.configs:
            if conn is not self.conn:
                self.unpublish(conn)
            self.wait_s = IDLE_WAIT_S
            return
        if conn is not self.conn or self.watching_since is None:
            # A new connection: nobody here watched since the last one.
            self.watching_since = db.publish(
                conn, self.daemon_id, self.published()
            )
            self.conn = conn
            log.info(
                "watching %d schedule(s): %s",
                len(self.configs),
                ", ".join(c.name for c in self.configs),
            )
        now, newest = db.newest_runs(conn, list(self.times))
        posted: dict[str, int] = {}
        behind = False
        for config in self.configs:
            due = schedules.due_runs(
                self.times[config.name],
                last=newest.get(config.name),
                now=now,
                watching_since=self.watching_since,
                backfill=config.backfill,
                limit=PASS_LIMIT,
            )
            behind |= len(due) >= PASS_LIMIT
            for run_at in due:
                try:
                    claimed = self.post(conn, config, run_at, now)
                except (errors.LockNotAvailable, errors.QueryCanceled) as e:
                    # Another daemon's claim held on too long: its
                    # transaction rolled back, the connection is fine.
                    log.warning(
                        "schedule %s: fire time %s not posted this pass: %s",
                        config.name,
                        run_at.isoformat(),
                        str(e).strip(),
                    )
                    behind = True
                    break
                if claimed:
                    posted[config.name] = posted.get(config.name, 0) + 1
                    newest[config.name] = run_at
        self.report(posted, newest)
        self.prune(conn)
        elapsed = time.monotonic() - started
        if behind:
            self.wait_s = RETRY_WAIT_S
        else:
            self.wait_s = self.next_wait(now, elapsed)

    def unpublish(self, conn: common.Connection) -> None:
        """Without schedules: forget the ones this daemon published
        before a reload, once per connection. A role without the
        privileges schedules need runs on, without them."""
        try:
            db.publish(conn, self.daemon_id, [])
        except psycopg.errors.InsufficientPrivilege as exc:
            log.debug("no schedules to forget: %s", exc)
        self.conn = conn

    def post(
        self,
        conn: common.Connection,
        config: ScheduleConfig,
        run_at: dt.datetime,
        now: dt.datetime,
    ) -> bool:
        """Claim and post one fire time; False when another daemon had."""
        key: str | None = schedules.posting_key(
            config.key_template, config.name, run_at
        )
        if key is not None and not 1 <= len(key) <= schedules.KEY_MAX_CHARS:
            log.error(
                "schedule %s: the key template made a key of %d characters"
                " for %s; posting it without a key",
                config.name,
                len(key),
                run_at.isoformat(),
            )
            key = None
        args_json, kwargs_json = self.arguments[config.name]
        try:
            posting = db.claim_run(
                conn,
                schedule=config.name,
                run_at=run_at,
                daemon_id=self.daemon_id,
                entry_point=config.entry_point,
                target_function=self.targets[config.name],
                args_json=args_json,
                kwargs_json=kwargs_json,
                priority=config.priority,
                tries=TRIES,
                key=key,
            )
        except KeyBusy as exc:
            log.warning(
                "schedule %s: fire time %s not posted this pass: %s",
                config.name,
                run_at.isoformat(),
                exc,
            )
            return False
        if posting is None:
            return False
        late_s = (now - run_at).total_seconds()
        if posting.existed:
            log.info(
                "schedule %s: run of %s is posting %s, which held its key"
                " %r already",
                config.name,
                run_at.isoformat(),
                posting.uuid,
                key,
            )
        else:
            log.info(
                "schedule %s: posted %s for %s%s",
                config.name,
                posting.uuid,
                run_at.isoformat(),
                f" ({late_s:.0f} s late)" if late_s >= 1 else "",
            )
        return True

    def report(
        self, posted: dict[str, int], newest: dict[str, dt.datetime | None]
    ) -> None:
        """Tell the supervisor what was posted, and newest runs that
        changed (by anyone)."""
        last: dict[str, Any] = {}
        for name, run_at in newest.items():
            if run_at is None:
                continue
            stamp = run_at.timestamp()
            if self.reported.get(name) != stamp:
                last[name] = stamp
                self.reported[name] = stamp
        if posted or last:
            self.send(Event.SCHEDULE_RUNS, runs=posted, last=last)

    def prune(self, conn: common.Connection) -> None:
        at = time.monotonic()
        if self.pruned_at is not None and at - self.pruned_at < (
            PRUNE_INTERVAL_S
        ):
            return
        self.pruned_at = at
        deleted = db.prune_runs(conn, RUNS_KEPT_S)
        if deleted:
            log.info("forgot %d schedule run(s) older than a week", deleted)

    def next_wait(self, now: dt.datetime, elapsed_s: float) -> float:
        """Seconds until the next fire time of any schedule, from the end
        of a pass that started at ``now`` (database time) and took
        ``elapsed_s``."""
        nearest = min(times.next_after(now) for times in self.times.values())
        wait = (nearest - now).total_seconds() - elapsed_s + _LATE_S
        return min(LONGEST_WAIT_S, max(0.0, wait))
