"""The supervisor's database session, in a process of its own.

Owns everything the supervisor needs from PostgreSQL: the LISTEN for new
work, the heartbeat (with the owner tokens of the live workers, read from
the scoreboard), the maintenance (taking back jobs that have no live owner,
finding running jobs that were cancelled, settling postings), the
queue gauges, pruning ended postings (:mod:`~pdoflowd.daemon.pruner`), and
taking back a dead worker's jobs when asked. It runs in
a process the supervisor forks (holding no connection when it does), with
statement and lock timeouts on its session and a TCP user timeout and
keepalives on its connection, so a poster's lock or a network path that
drops packets costs this process time, never the supervisor's loop: the
loop only exchanges lines with it over two pipes
(:mod:`~pdoflowd.daemon.sessionpipe`), and gunicorn-style holds no
database at all; the supervisor's side of it is
:class:`~pdoflowd.daemon.sessionkeeper.SessionHandle`. It heartbeats only
while the supervisor's pulse is fresh, so a frozen supervisor is a lost
daemon, and its jobs are rescued.
It must not fork, speak to systemd, or run jobs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

import psycopg

from pdoflowd import __version__, policy
from pdoflowd.config import Config, connection_kwargs
from pdoflowd.daemon import forked, logs
from pdoflowd.daemon.pruner import Pruner
from pdoflowd.daemon.scheduler import Scheduler
from pdoflowd.daemon.scoreboard import Scoreboard, WorkerState
from pdoflowd.daemon.sessionpipe import (
    Event,
    Request,
    TakeBack,
    decode_lines,
    encode,
)
from pdoflowd.db import common, dependencies, queue, upkeep
from pdoflowd.db.migrate import SchemaNotCurrent, check_current
from pdoflowd.status import JobStatus

log = logging.getLogger("pdoflowd.daemon.session")

# The process name the session takes (ps, top, /proc/PID/comm).
PROCESS_NAME = b"pdoflowd-db"
_RECONNECT_DELAY_S = (0.5, 10.0)
_LONGEST_WAIT_S = 1.0

# ---------------------------------------------------------------- the process


@dataclass(frozen=True)
class SessionSpec:
    """Everything the database session is given by the supervisor at fork."""

    daemon_id: uuid.UUID
    hostname: str
    config: Config
    password: str | None = field(repr=False)
    scoreboard: Scoreboard
    request_fd: int
    event_fd: int
    parent_pid: int
    inherited_fds: tuple[int, ...]


class _Gone(Exception):
    """The supervisor is gone or asked the session to end."""


class Session:
    """The database session's state, inside its own process."""

    def __init__(self, spec: SessionSpec) -> None:
        self.spec = spec
        self.config = spec.config
        self.conn: psycopg.Connection[Any] | None = None
        self.connected_since = 0.0
        self.retry_at = 0.0
        self.failures = 0
        self.outage = False
        self.take_backs: list[TakeBack] = []
        # Channels notified and not yet acted on.
        self.notified: set[str] = set()
        self.stopping = False
        self.request_buffer = b""
        self.due: dict[str, float] = {}
        self.pulse_warned = False
        # The differences of jobs.limits already logged: (daemon, limits).
        self.limits_told: set[tuple[uuid.UUID, str]] = set()
        self.scheduler = Scheduler(
            self.config.schedules, spec.daemon_id, self.send
        )
        self.pruner = Pruner()

    # ------------------------------------------------------------ plumbing

    def send(self, kind: Event, **fields: Any) -> None:
        """Tell the supervisor (whole lines; a supervisor gone ends us)."""
        data = encode({"event": kind.value, **fields})
        while data:
            try:
                written = os.write(self.spec.event_fd, data)
            except InterruptedError:
                continue
            except BrokenPipeError as exc:
                raise _Gone("the supervisor is gone") from exc
            data = data[written:]

    def read_requests(self) -> None:
        try:
            data = os.read(self.spec.request_fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            raise _Gone("the supervisor is gone")
        messages, self.request_buffer = decode_lines(self.request_buffer + data)
        for message in messages:
            kind = message.get("request")
            if kind == Request.TAKE_BACK.value:
                self.take_backs.append(TakeBack.from_line(message))
            elif kind == Request.STOP.value:
                self.stopping = True

    # ------------------------------------------------------------ connection

    def connect(self) -> None:
        kwargs = connection_kwargs(
            self.config.database, self.spec.password, listen=True
        )
        conn: psycopg.Connection[Any] = psycopg.connect(
            autocommit=True,
            **kwargs,  # type: ignore[arg-type]
        )
        try:
            database = self.config.database
            upkeep.set_session_deadlines(
                conn,
                statement_timeout_s=database.statement_timeout_s,
                lock_timeout_s=database.lock_timeout_s,
            )
            check_current(conn)
            # A notification that arrives while a chore's statement runs is
            # read off the socket by that statement: it comes here, not
            # through the socket's readiness (see read_notifications).
            conn.add_notify_handler(self.note_notification)
            conn.execute(f"LISTEN {common.NOTIFY_CHANNEL}")
            conn.execute(f"LISTEN {common.CANCEL_CHANNEL}")
            self.conn = conn
            self.heartbeat()
        except BaseException:
            self.conn = None
            conn.close()
            raise
        if self.outage or not self.connected_since:
            # A real outage: others' heartbeats went unseen meanwhile.
            self.connected_since = time.monotonic()
        if self.outage:
            log.info("database connection restored")
        self.outage = False
        self.failures = 0
        self.send(Event.CONNECTED)

    def ensure_connection(self) -> bool:
        if self.conn is not None:
            return True
        if time.monotonic() < self.retry_at:
            return False
        try:
            self.connect()
        except SchemaNotCurrent as exc:
            log.error("%s", exc)
            self.send(Event.SCHEMA_NOT_CURRENT, message=str(exc))
            self.failed("reconnecting", exc, quiet=True)
            return False
        except psycopg.Error as exc:
            self.failed("reconnecting", exc)
            return False
        return True

    def failed(self, what: str, exc: Exception, *, quiet: bool = False) -> None:
        self.failures += 1
        delay = policy.backoff_delay(self.failures, *_RECONNECT_DELAY_S)
        if not quiet:
            doing = f"{what} failed"
            if what == "reconnecting":
                doing = "database unreachable"
            log.warning("%s, retrying in %.1f s: %s", doing, delay, exc)
        self.send(Event.DB_ERROR, operation=what)
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None
            self.send(Event.DISCONNECTED)
        self.outage = True
        self.retry_at = time.monotonic() + delay

    def chore(self, what: str, action: Callable[[], None]) -> None:
        """Run ``action`` on the connection; a failure drops it."""
        if self.conn is None:
            return
        try:
            action()
        except psycopg.Error as exc:
            self.failed(what, exc)

    # ------------------------------------------------------------ chores

    def heartbeat(self) -> None:
        assert self.conn is not None
        age = self.spec.scoreboard.pulse_age()
        if age > self.config.daemon.host_lease_s / 2:
            # A frozen supervisor reaps, times out and watches nothing: let
            # the daemon be declared lost rather than vouch for it.
            if not self.pulse_warned:
                log.error(
                    "no heartbeat: the supervisor's loop has not turned for "
                    "%.1f s",
                    age,
                )
                self.pulse_warned = True
            return
        self.pulse_warned = False
        # Read before the statement is sent: see take_back_ownerless_jobs.
        owners = self.spec.scoreboard.live_owners()
        lost_at = upkeep.heartbeat(
            self.conn,
            daemon_id=self.spec.daemon_id,
            hostname=self.spec.hostname,
            pid=self.spec.parent_pid,
            version=__version__,
            lease_s=self.config.daemon.host_lease_s,
            live_owners=owners,
            provides=self.config.workers.provides,
            posters=self.config.workers.posters,
            resource_limits=self.config.jobs.limits,
        )
        if lost_at is not None:
            log.error(
                "this daemon had been declared lost at %s (no heartbeat "
                "within daemon.host_lease_s); its jobs then were taken back",
                lost_at,
            )
        self.compare_limits()

    def compare_limits(self) -> None:
        """Tell (once per difference) of live daemons whose jobs.limits
        differ from ours: caps hold cluster-wide only if all agree."""
        assert self.conn is not None
        ours = dict(self.config.jobs.limits)
        differing = upkeep.differing_resource_limits(
            self.conn, daemon_id=self.spec.daemon_id, resource_limits=ours
        )
        seen = set()
        for hostname, daemon_id, theirs in differing:
            key = (daemon_id, json.dumps(theirs, sort_keys=True))
            seen.add(key)
            if key not in self.limits_told:
                log.error(
                    "jobs.limits differ from those of the daemon on %s (%s):"
                    " here %s, there %s; set the same on every host",
                    hostname,
                    daemon_id,
                    json.dumps(ours, sort_keys=True),
                    key[1],
                )
        self.limits_told = seen
        self.send(Event.LIMITS_DIFFER, daemons=len(differing))

    def take_back(self) -> None:
        """Take back the jobs of workers that ended, oldest request first."""
        while self.take_backs and self.conn is not None:
            request = self.take_backs[0]
            requeued = queue.requeue_owner(
                self.conn,
                daemon_id=self.spec.daemon_id,
                owner=request.owner,
                running_job_id=request.running,
                reason=request.reason,
            )
            self.take_backs.pop(0)
            running = sum(1 for j in requeued if j.was_running)
            self.after_requeue(requeued)
            self.send(
                Event.TAKEN_BACK,
                seq=request.seq,
                running=running,
                released=len(requeued) - running,
                waiting=any(j.status is JobStatus.WAITING for j in requeued),
            )
            if requeued:
                log.info(
                    "took back %d job(s) of a worker that ended (%s)",
                    len(requeued),
                    request.reason,
                )

    def maintenance(self) -> None:
        assert self.conn is not None
        lease = self.config.daemon.host_lease_s
        rescued = upkeep.take_back_ownerless_jobs(
            self.conn,
            may_declare_lost=policy.may_rescue(
                time.monotonic() - self.connected_since, lease
            ),
        )
        if rescued:
            running = sum(1 for j in rescued if j.was_running)
            log.warning(
                "took back %d job(s) without a live owner (%d of lost hosts)",
                len(rescued),
                running,
            )
            self.after_requeue(rescued)
            self.send(
                Event.RESCUED,
                running=running,
                released=len(rescued) - running,
                waiting=any(j.status is JobStatus.WAITING for j in rescued),
            )
        self.find_cancelled()
        decided = dependencies.review_holds(self.conn)
        if decided:
            log.info(
                "released or cancelled %d held posting(s) that their "
                "upstream postings' end had not reached",
                decided,
            )
        unsettled = queue.unsettled_postings(self.conn)
        if unsettled:
            queue.settle_postings(
                self.conn,
                unsettled,
                error_threshold=self.config.jobs.posting_error_threshold,
            )

    def find_cancelled(self) -> None:
        """Tell the supervisor which running jobs' postings were cancelled,
        and which workers hold claims a cancel ended (not started yet)."""
        assert self.conn is not None
        board = self.spec.scoreboard
        running = [
            view.job_id
            for view in (board.read(slot) for slot in range(board.capacity))
            if view.state is WorkerState.RUNNING and view.job_id is not None
        ]
        if running:
            cancelled = queue.cancelled_among(self.conn, running)
            if cancelled:
                self.send(Event.CANCELLED, jobs=sorted(cancelled))
        owners = upkeep.cancelled_claim_owners(
            self.conn, daemon_id=self.spec.daemon_id
        )
        if owners:
            self.send(Event.CLAIMS_CANCELLED, owners=sorted(map(str, owners)))

    def after_requeue(self, jobs: list[queue.RequeuedJob]) -> None:
        assert self.conn is not None
        errored = {
            j.posting_id for j in jobs if j.status is JobStatus.ERRORED_OUT
        }
        if errored:
            queue.settle_postings(
                self.conn,
                errored,
                error_threshold=self.config.jobs.posting_error_threshold,
            )

    def queue_stats(self) -> None:
        assert self.conn is not None
        counts, oldest = upkeep.queue_stats(self.conn)
        self.send(Event.QUEUE, counts=counts, oldest=oldest)

    def schedules(self) -> None:
        assert self.conn is not None
        self.scheduler.run(self.conn)
        # Not an interval: the next pass is due at the next fire time.
        self.due["schedules"] = time.monotonic() + self.scheduler.wait_s

    def prune(self) -> None:
        assert self.conn is not None
        done = self.pruner.prune(self.conn, self.config)
        self.due["pruning"] = time.monotonic() + done.next_in_s
        if done.removed.postings or done.removed.jobs:
            self.send(
                Event.PRUNED,
                postings=done.removed.postings,
                jobs=done.removed.jobs,
            )

    def note_notification(self, notify: psycopg.Notify) -> None:
        """A notification the driver read during a statement."""
        self.notified.add(notify.channel)

    def read_notifications(self) -> None:
        """Read the notifications waiting on the socket."""
        conn = self.conn
        if conn is None:
            return
        try:
            conn.pgconn.consume_input()
            while (notice := conn.pgconn.notifies()) is not None:
                self.notified.add(notice.relname.decode())
        except psycopg.Error as exc:
            self.failed("listening", exc)
            return
        if conn.pgconn.status != psycopg.pq.ConnStatus.OK:
            self.failed("listening", psycopg.OperationalError("lost"))
            return
        self.act_on_notifications()

    def act_on_notifications(self) -> None:
        """Tell the supervisor of the notifications read so far."""
        channels, self.notified = self.notified, set()
        if common.CANCEL_CHANNEL in channels:
            # At once, not at the next maintenance: running jobs of the
            # cancelled posting are ended, claimed ones are not started.
            self.chore("maintenance", self.find_cancelled)
        if channels - {common.CANCEL_CHANNEL}:
            self.send(Event.NOTIFIED)

    # ------------------------------------------------------------ the loop

    def intervals(self) -> Iterator[tuple[str, float, Callable[[], None]]]:
        daemon = self.config.daemon
        yield "heartbeat", daemon.heartbeat_interval_s, self.heartbeat
        yield "maintenance", daemon.maintenance_interval_s, self.maintenance
        if self.config.metrics.enabled:
            interval = self.config.metrics.queue_stats_interval_s
            yield "queue_stats", interval, self.queue_stats
        yield "schedules", self.scheduler.wait_s, self.schedules
        if self.config.retention.enabled:
            yield "pruning", self.config.retention.interval_s, self.prune

    def run(self) -> None:
        """Serve the supervisor until it asks us to stop, or is gone."""
        while not self.stopping:
            self.wait()
            if not self.ensure_connection():
                continue
            self.chore("taking_back_jobs", self.take_back)
            now = time.monotonic()
            for name, interval, action in self.intervals():
                if self.conn is not None and now >= self.due.get(name, 0.0):
                    self.due[name] = now + interval
                    self.chore(name, action)
            if self.notified:
                # Read by a chore's statement: the socket will not say so.
                self.act_on_notifications()

    def wait(self) -> None:
        """Until a request, a notification or the next chore is due."""
        now = time.monotonic()
        if self.conn is None:
            # Nothing can be done before the next attempt to connect.
            wake = self.retry_at
        elif self.take_backs or self.notified:
            wake = now
        else:
            wake = min(
                [self.due.get(name, 0.0) for name, _, _ in self.intervals()]
            )
        timeout = max(0.0, wake - now)
        fds = [self.spec.request_fd]
        if self.conn is not None:
            fds.append(self.conn.fileno())
        try:
            readable, _, _ = select.select(
                fds, [], [], min(timeout, _LONGEST_WAIT_S)
            )
        except InterruptedError:
            return
        if self.spec.request_fd in readable:
            self.read_requests()
        if self.conn is not None and self.conn.fileno() in readable:
            self.read_notifications()
        if os.getppid() != self.spec.parent_pid:
            raise _Gone("the supervisor is gone")

    def finish(self) -> None:
        """Write what was asked before the stop, then the stop itself (a
        session that never connected has registered nothing to stop)."""
        if not self.connected_since and not self.take_backs:
            return
        while True:
            if self.ensure_connection():
                self.chore("taking_back_jobs", self.take_back)
                if not self.take_backs and self.conn is not None:
                    try:
                        upkeep.mark_daemon_stopped(
                            self.conn, self.spec.daemon_id
                        )
                    except psycopg.Error as exc:
                        self.failed("stopping", exc)
                        continue
                    return
            time.sleep(max(0.05, min(1.0, self.retry_at - time.monotonic())))

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None


def _detach(spec: SessionSpec) -> None:
    """Undo what the fork inherited that belongs to the supervisor."""
    forked.leave_supervisor(
        spec.inherited_fds,
        set_signals=_set_signals,
        on_parent_death=signal.SIGKILL,
        name=PROCESS_NAME,
    )
    os.set_blocking(spec.request_fd, False)
    logs.set_process_label("database session")


def _set_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for signum in (
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGHUP,
        signal.SIGTTIN,
        signal.SIGTTOU,
    ):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def main(spec: SessionSpec) -> NoReturn:
    """The body of a freshly forked database session; never returns."""
    code = 0
    session = Session(spec)
    try:
        _detach(spec)
        if os.getppid() != spec.parent_pid:
            raise _Gone("the supervisor exited before the session started")
        session.run()
        session.finish()
    except _Gone as gone:
        log.info("database session ending: %s", gone)
    except BaseException:
        log.exception("database session failed")
        code = 1
    finally:
        session.close()
        with contextlib.suppress(Exception):
            logging.shutdown()
    os._exit(code)
