"""One job run by hand, in this process, the way a worker runs it.

Owns ``pdoflow execute-job``'s work: it resolves the job's entry point
as a worker would (see entrypoints) before claiming anything, registers this
process as a short-lived daemon (with a heartbeat, so that a run which
dies is rescued like a lost host's), claims the job with a fresh owner
token, and then runs it and records its outcome with the worker's own
parts (:mod:`~pdoflowd.daemon.runner`), fenced like any other; it enforces
the job's timeout as the supervisor does a worker's, and gives the job
back unharmed when Ctrl-C cuts its run short. It must not run more than
the one job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg

from pdoflowd import __version__
from pdoflowd.config import Config, DaemonConfig, JobsConfig, connection_kwargs
from pdoflowd.daemon.runner import (
    Interrupted,
    JobRunner,
    JobTimeout,
    OutcomeBuffer,
    with_reconnects,
)
from pdoflowd.db import onejob, queue, upkeep
from pdoflowd.entrypoints import EntryPointRefused
from pdoflowd.exitcodes import EXIT_ERRORED
from pdoflowd.status import JobStatus

log = logging.getLogger("pdoflowd.daemon.foreground")

Connect = Callable[[], psycopg.Connection[Any]]
T = TypeVar("T")

# The exit status of a run ended by its watchdog: the job was deaf to its
# timeout (pdoflow's EXIT_ERRORED: the job did not get done).
# How often the alarm looks again while the job is not (or no longer) in
# its call: a job's deadline is set by the runner as it starts it.
_ALARM_RECHECK_S = 0.01


class JobRefused(Exception):
    """The job cannot be run here; nothing was changed."""


@dataclass(frozen=True)
class ForegroundRun:
    """What became of a job run by hand: the claim, the outcome written,
    the job's status afterwards, and whether Ctrl-C cut it short (then it
    was given back, waiting, without using a try)."""

    job: queue.ClaimedJob
    outcome: queue.Outcome
    status: JobStatus
    seconds: float
    interrupted: bool


def _register(
    conn: psycopg.Connection[Any],
    daemon_id: uuid.UUID,
    owner: uuid.UUID,
    lease_s: float,
) -> None:
    """Register or renew this run's daemon row, its one owner token live."""
    upkeep.heartbeat(
        conn,
        daemon_id=daemon_id,
        hostname=socket.gethostname(),
        pid=os.getpid(),
        version=f"{__version__} (pdoflow execute-job)",
        lease_s=lease_s,
        live_owners=(owner,),
    )


class _Database:
    """This run's connection, reconnected with backoff as a worker's is
    (there is no stop to heed here: Ctrl-C ends the wait)."""

    def __init__(self, config: Config, password: str | None) -> None:
        self.config = config
        self.password = password
        self.conn: psycopg.Connection[Any] | None = None

    def connect(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed:
            kwargs = connection_kwargs(self.config.database, self.password)
            self.conn = psycopg.connect(autocommit=True, **kwargs)  # type: ignore[arg-type]
        return self.conn

    def drop(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = None

    def with_database(self, what: str, action: Callable[[], T]) -> T:
        return with_reconnects(
            what, action, drop=self.drop, wait=_sleep, logger=log
        )


def _sleep(delay: float, exc: Exception) -> None:
    time.sleep(delay)


class _Heartbeat(threading.Thread):
    """Renews this process's daemon row while the job runs."""

    def __init__(
        self,
        connect: Connect,
        daemon_id: uuid.UUID,
        owner: uuid.UUID,
        daemon: DaemonConfig,
    ) -> None:
        super().__init__(name="pdoflow-heartbeat", daemon=True)
        self.connect = connect
        self.daemon_id = daemon_id
        self.owner = owner
        self.lease_s = daemon.host_lease_s
        self.every = daemon.heartbeat_interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self.stopped.wait(self.every):
            try:
                if conn is None or conn.closed:
                    conn = self.connect()
                _register(conn, self.daemon_id, self.owner, self.lease_s)
            except psycopg.Error:
                conn = None
        if conn is not None:
            conn.close()


class _TimeoutEnforcer:
    """The job's timeout, enforced here as the supervisor does a worker's.

    At the deadline SIGALRM raises :class:`JobTimeout` inside the job, as
    SIGTERM does in a worker, and the run records a timeout. A job deaf to
    it (stuck in a C call that does not return to Python) is abandoned
    after ``jobs.timeout_grace_s`` more: a watchdog thread takes the job
    back as the supervisor takes back a worker it killed for overrunning
    (the try used, the reason recorded), marks this run's daemon stopped
    and ends the process with EXIT_ERRORED.
    """

    def __init__(
        self,
        runner: JobRunner,
        job: queue.ClaimedJob,
        connect: Connect,
        *,
        daemon_id: uuid.UUID,
        owner: uuid.UUID,
        jobs: JobsConfig,
    ) -> None:
        self.runner = runner
        self.job = job
        self.connect = connect
        self.daemon_id = daemon_id
        self.owner = owner
        self.error_threshold = jobs.posting_error_threshold
        self.timeout = runner.timeout_for(job)
        self.grace = jobs.timeout_grace_s
        self.lock = threading.Lock()
        self.ended = False
        self.watchdog = threading.Timer(self.timeout + self.grace, self.abandon)
        self.watchdog.daemon = True

    @contextlib.contextmanager
    def enforced(self) -> Iterator[None]:
        """Enforce the timeout (if any) around the job's run."""
        if not self.timeout:
            yield
            return
        alarm = threading.current_thread() is threading.main_thread()
        if alarm:
            previous = signal.signal(signal.SIGALRM, self.on_alarm)
            signal.setitimer(signal.ITIMER_REAL, self.timeout)
        self.watchdog.start()
        try:
            yield
        finally:
            with self.lock:  # an abandon under way ends the process
                self.ended = True
            self.watchdog.cancel()
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous or signal.SIG_DFL)

    def on_alarm(self, signum: int, frame: object) -> None:
        deadline = self.runner.deadline
        now = time.monotonic()
        if not deadline or now < deadline:
            left = deadline - now if deadline else _ALARM_RECHECK_S
            signal.setitimer(signal.ITIMER_REAL, max(left, _ALARM_RECHECK_S))
            return
        self.runner.deadline = 0.0
        raise JobTimeout

    def abandon(self) -> None:
        with self.lock:
            if self.ended:
                return
            reason = f"timeout after {self.timeout:g} s"
            try:
                with self.connect() as conn:
                    requeued = queue.requeue_owner(
                        conn,
                        daemon_id=self.daemon_id,
                        owner=self.owner,
                        running_job_id=self.job.id,
                        reason=reason,
                    )
                    errored = {
                        j.posting_id
                        for j in requeued
                        if j.status is JobStatus.ERRORED_OUT
                    }
                    if errored:
                        queue.settle_postings(
                            conn,
                            errored,
                            error_threshold=self.error_threshold,
                        )
                    upkeep.mark_daemon_stopped(conn, self.daemon_id)
                recorded = "the timeout was recorded (a try used)"
            except psycopg.Error as exc:
                recorded = (
                    f"the timeout could not be recorded ({exc}); the job "
                    "is taken back once this run's heartbeat lapses"
                )
            print(
                f"pdoflow: job {self.job.uuid} ran past its timeout of "
                f"{self.timeout:g} s and did not stop within "
                "jobs.timeout_grace_s "
                f"({self.grace:g} s); ended: {recorded}",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_ERRORED)


def execute_job(
    config: Config,
    *,
    dsn: str,
    password: str | None,
    job_uuid: uuid.UUID,
) -> ForegroundRun:
    """Claim the job, run it, and record its outcome as a worker would.

    ``config`` gives ``[jobs]`` (allowed modules, result size, profiling)
    and the heartbeat interval; the database is ``dsn``. Raises KeyError
    for an unknown job and :class:`JobRefused` when its entry point is not
    allowed or it is executing already.
    """
    config = dataclasses.replace(
        config, database=dataclasses.replace(config.database, dsn=dsn)
    )
    database = _Database(config, password)
    try:
        return _run(database, config, password, job_uuid)
    finally:
        database.drop()


def _check_runnable(runner: JobRunner, entry_point: str) -> None:
    """Refuse, before claiming, what the worker would refuse to run.

    An import that fails is left to the run, which records it as a failure.
    """
    try:
        runner.resolve(entry_point)
    except EntryPointRefused as refusal:
        raise JobRefused(f"refused: {refusal}; nothing was run") from None
    except Exception:
        return


def _run(
    database: _Database,
    config: Config,
    password: str | None,
    job_uuid: uuid.UUID,
) -> ForegroundRun:
    runner = JobRunner(config, password, database.connect)
    outcomes = OutcomeBuffer(
        database,
        flush_window_s=config.workers.outcome_flush_ms / 1000,
        error_threshold=config.jobs.posting_error_threshold,
    )
    daemon_id = uuid.uuid4()
    # The one claim of this run, under one owner token.
    owner = outcomes.new_claim()
    conn = database.connect()
    target = onejob.job_target(conn, job_uuid)
    if target is None:
        raise KeyError(f"no job {job_uuid}")
    _check_runnable(runner, target.entry_point)
    if target.status is JobStatus.EXECUTING:
        raise JobRefused(f"job {job_uuid} is executing already")
    kwargs = connection_kwargs(config.database, password)
    heartbeat = _Heartbeat(
        lambda: psycopg.connect(autocommit=True, **kwargs),  # type: ignore[arg-type]
        daemon_id,
        owner,
        config.daemon,
    )
    _register(conn, daemon_id, owner, config.daemon.host_lease_s)
    heartbeat.start()
    try:
        job = onejob.claim_job(
            conn, job_uuid=job_uuid, owner=owner, daemon_id=daemon_id
        )
        if job is None:
            raise JobRefused(f"job {job_uuid} is executing already")
        begin = time.monotonic()
        enforcer = _TimeoutEnforcer(
            runner,
            job,
            heartbeat.connect,
            daemon_id=daemon_id,
            owner=owner,
            jobs=config.jobs,
        )
        with enforcer.enforced():
            result = runner.run(job, owner)
        seconds = time.monotonic() - begin
        interrupted = isinstance(result, Interrupted)
        # Cut short by Ctrl-C: the job waits again, no try used.
        outcome = (
            result.given_back
            if isinstance(result, Interrupted)
            else result.outcome
        )
        outcomes.add(outcome)
        outcomes.flush()
        outcomes.settle()
        after = onejob.job_target(database.connect(), job_uuid)
        assert after is not None
        return ForegroundRun(job, outcome, after.status, seconds, interrupted)
    finally:
        heartbeat.stopped.set()
        heartbeat.join()
        with contextlib.suppress(psycopg.Error):
            # A claim whose outcome was not written goes back unharmed;
            # after a written outcome this changes nothing.
            queue.requeue_owner(
                database.connect(),
                daemon_id=daemon_id,
                owner=owner,
                running_job_id=None,
                reason="pdoflow execute-job ended",
            )
            upkeep.mark_daemon_stopped(database.connect(), daemon_id)
