"""One worker process: the shell around the job runner.

Owns the life of a forked worker: it drops what belongs to the supervisor
(systemd's sockets, signal wake-up fd, other workers' pipes), handles its
signals (SIGTERM: stop, or the running job's timeout; CLAIMS_SIGNAL),
connects to PostgreSQL after the fork and reconnects with backoff, claims
batches of jobs (each claim under a fresh owner token, written to the
scoreboard first, so a claim whose reply is lost belongs to no live worker
and is taken back; the claim's statement also writes the last batch's
outcomes, whose token the slot keeps beside the new one meanwhile), hands
each job to the :mod:`~pdoflowd.daemon.runner` and its outcomes to the
runner's buffer, and retires at
``max_jobs_per_worker`` or ``max_memory_mb``. It tells the supervisor what
it runs through the scoreboard and sends it a report
(:mod:`~pdoflowd.daemon.reports`) on its pipe when something changes;
what it counted for the metrics at most every
:data:`~pdoflowd.daemon.tally.REPORT_INTERVAL_S` while busy, at once when
it goes idle or exits, with a copy in its scoreboard slot before each job
should the job kill it. What its jobs write to stdout and stderr is
captured (:mod:`~pdoflowd.daemon.capture`) and each attempt's end stored.
It must not import the supervisor, speak to systemd, or outlive its parent
by more than its current job; how a job is run and its outcome written is
the runner's.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import random
import select
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, NoReturn, TypeVar

import psycopg

from pdoflowd import policy
from pdoflowd.config import Config, connection_kwargs
from pdoflowd.daemon import forked, logs, reports
from pdoflowd.daemon.capture import CapturedOutput, OutputCapture
from pdoflowd.daemon.runner import (
    RECORD_OUTCOMES,
    JobRunner,
    JobTimeout,
    OutcomeBuffer,
    with_reconnects,
)
from pdoflowd.daemon.scoreboard import Scoreboard, WorkerState
from pdoflowd.daemon.tally import REPORT_INTERVAL_S, WorkerTally
from pdoflowd.db import queue, singlejob
from pdoflowd.db.common import storable_text
from pdoflowd.exitcodes import EXIT_OK, EXIT_WORKER_BOOT_FAILED
from pdoflowd.redaction import redact

log = logging.getLogger("pdoflowd.daemon.worker")


# The supervisor sends this when some claim of the worker may have been
# cancelled: before its next job starts, the worker checks the claims of
# the jobs it has not started. It checks them anyway before starting a job
# when the last check (or the claim) is older than CLAIM_RECHECK_S.
CLAIMS_SIGNAL = signal.SIGUSR1
CLAIM_RECHECK_S = 1.0

# Lines other than metrics reports that may wait for a supervisor that
# does not read (a few hundred); beyond that they are dropped.
_OUTBOX_BYTES = 65536
# How long an exiting worker waits for its last reports to be read.
_EXIT_DELIVERY_S = 5.0

T = TypeVar("T")


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker is given by the supervisor at fork."""

    slot: int
    daemon_id: uuid.UUID
    config: Config
    password: str | None = field(repr=False)
    scoreboard: Scoreboard
    wake_fd: int
    report_fd: int
    parent_pid: int
    inherited_fds: tuple[int, ...]


class _Stop(Exception):
    """The worker was asked to stop or lost its parent."""


class Worker:
    """The state of one worker process between its fork and its exit."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.config = spec.config
        self.pid = os.getpid()
        self.stop_requested = False
        self.jobs_run = 0
        self.mean_job_s: float | None = None
        self.conn: psycopg.Connection[Any] | None = None
        self.rng = random.Random()
        self.tally = WorkerTally()
        self.runner = JobRunner(
            spec.config,
            spec.password,
            self.connect,
            on_start=self._job_started,
            rng=self.rng,
        )
        self.outcomes = OutcomeBuffer(
            self,
            flush_window_s=self.config.workers.outcome_flush_ms / 1000,
            error_threshold=self.config.jobs.posting_error_threshold,
            on_flush=lambda: self.mark(WorkerState.FLUSHING),
            on_recorded=self.outcomes_recorded,
        )
        # Whether a claim not yet started may have been cancelled.
        self.claims_in_doubt = False
        # What jobs write, once the worker runs as a process of its own.
        self.capture: OutputCapture | None = None
        # Report lines the pipe has not taken yet (the first may be begun),
        # and a metrics report not yet begun, to merge later ones into.
        self.outbox = bytearray()
        self.held_metrics: reports.MetricsReport | None = None
        self.reports_dropped = 0
        self.drops_logged = 0

    # ------------------------------------------------------------ boot

    def detach_from_supervisor(self) -> None:
        """Undo what the fork inherited that belongs to the supervisor."""
        forked.leave_supervisor(
            self.spec.inherited_fds,
            set_signals=self._set_signals,
            on_parent_death=signal.SIGTERM,
        )
        if os.getppid() != self.spec.parent_pid:
            raise _Stop("the supervisor exited before the worker started")
        # A busy or stopped supervisor must not stop the jobs (see report).
        os.set_blocking(self.spec.report_fd, False)
        logs.set_process_label(f"worker {self.spec.slot}")
        self.capture_output()

    def capture_output(self) -> None:
        """Capture what jobs write to stdout and stderr from now on (unless
        ``jobs.output_tail_bytes`` is 0); log past it to the journal."""
        tail_bytes = self.config.jobs.output_tail_bytes
        if not tail_bytes:
            return
        journal_fd = os.dup(2)
        journal = os.fdopen(journal_fd, "wb", buffering=0)
        logs.use_stream(
            open(  # noqa: SIM115 (the log's stream, for the process's life)
                journal_fd,
                "w",
                encoding="utf-8",
                errors="backslashreplace",
                buffering=1,
                closefd=False,
            )
        )
        self.capture = OutputCapture(tail_bytes, journal)

    def _set_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(CLAIMS_SIGNAL, self._on_claims_changed)
        for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        for signum in (signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)

    def _on_claims_changed(self, signum: int, frame: FrameType | None) -> None:
        self.claims_in_doubt = True

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        deadline = self.runner.deadline
        if deadline and time.monotonic() >= deadline:
            self.runner.deadline = 0.0
            raise JobTimeout
        self.stop_requested = True

    def send(self, report: reports.Report) -> None:
        """Send one report to the supervisor, never waiting for it to read.

        What the pipe cannot take now (its supervisor is busy or stopped)
        waits in the outbox and goes out, whole and in order, with a later
        report; a worker so keeps running jobs however long its supervisor
        does not read. Past _OUTBOX_BYTES waiting, further lines are
        dropped and counted; metrics reports are merged instead (see
        :meth:`send_metrics`).
        """
        self._post(reports.encode(report))

    def report(self, event: str, **fields: Any) -> None:
        """Send a line ``{"event": event, **fields}`` as :meth:`send` does:
        for a probe of the pipe. The worker's own reports are typed, and
        the supervisor refuses an event it does not know."""
        self._post(reports.encode_message({"event": event, **fields}))

    def _post(self, line: bytes) -> None:
        if len(self.outbox) + len(line) > _OUTBOX_BYTES:
            self.reports_dropped += 1
        else:
            self.outbox += line
        self.deliver_reports()

    def send_metrics(self, *, force: bool = False, stash: bool = False) -> None:
        """Send what the tally counted, when a report is due (the tally
        says when: :meth:`WorkerTally.due`) or ``force``; never lost to a
        supervisor not reading, nor to a job that kills the worker.

        A report the pipe cannot take yet is held, and later ones merged
        into it (MetricsReport.merged), so the counters stay exact and
        the held report bounded. With ``stash`` (before a job starts),
        what is not due yet is copied to the worker's scoreboard slot
        instead, where the supervisor finds it should the job kill the
        worker: so every claim and outcome the database recorded is
        counted once, as when each commit was reported at once.
        """
        send = force or self.tally.due()
        if not send and stash and self.tally.changed:
            # One too long for the stash goes now.
            send = not self.stash_metrics()
        if send:
            report = self.tally.take()
            if report is not None:
                held = self.held_metrics
                self.held_metrics = (
                    report if held is None else held.merged(report)
                )
        self.deliver_reports()

    def stash_metrics(self) -> bool:
        """Keep a copy of the tally's report to come in the scoreboard
        slot; False when it does not fit there."""
        report = self.tally.snapshot()
        line = b"" if report is None else reports.encode(report)
        return self.spec.scoreboard.stash(self.spec.slot, line)

    def outcomes_recorded(self, recorded: list[queue.RecordedOutcome]) -> None:
        """A flush wrote ``recorded``: they go to the tally at once (they
        tell which runs were fenced off), and a report if one is due."""
        self.tally.note_recorded(recorded)
        self.send_metrics()

    def deliver_reports(self, wait_s: float = 0.0) -> bool:
        """Write what the report pipe takes, waiting at most ``wait_s``.

        True when nothing is left to send. A line written in part keeps its
        tail first in the outbox, so the stream the supervisor reads stays
        whole lines. A pipe that is gone (the supervisor exited; or none,
        under execute-job) takes everything: it is dropped.
        """
        deadline = None
        while True:
            if not self.outbox and self.held_metrics is not None:
                self.outbox += reports.encode(self.held_metrics)
                self.held_metrics = None
            if not self.outbox:
                if self.reports_dropped > self.drops_logged:
                    log.warning(
                        "%d report(s) dropped: the supervisor did not read",
                        self.reports_dropped - self.drops_logged,
                    )
                    self.drops_logged = self.reports_dropped
                return True
            try:
                written = os.write(self.spec.report_fd, self.outbox)
            except BlockingIOError:
                pass
            except OSError:
                self.outbox.clear()
                self.held_metrics = None
                return False
            else:
                del self.outbox[:written]
                continue
            if wait_s <= 0:
                return False
            if deadline is None:
                deadline = time.monotonic() + wait_s
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(InterruptedError):
                select.select([], [self.spec.report_fd], [], left)

    def mark(
        self,
        state: WorkerState,
        job_id: int | None = None,
        started: float = 0.0,
    ) -> None:
        self.spec.scoreboard.write(
            self.spec.slot,
            pid=self.pid,
            state=state,
            job_id=job_id,
            started=started,
            deadline=self.runner.deadline,
            owner=self.outcomes.owner,
            finishing=self.outcomes.finishing,
        )

    def _job_started(self, job: queue.ClaimedJob, began: float) -> None:
        self.mark(WorkerState.RUNNING, job.id, began)

    def boot(self) -> None:
        """Import preload modules (raise on failure), then connect.

        A database that cannot be reached is waited for, with backoff: an
        outage must not turn into a crash loop of every worker.
        """
        self.mark(WorkerState.BOOTING)
        for module in self.config.workers.preload_modules:
            importlib.import_module(module)
        self.with_database("connect", self.connect)

    def connect(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed:
            kwargs = connection_kwargs(self.config.database, self.spec.password)
            self.conn = psycopg.connect(autocommit=True, **kwargs)  # type: ignore[arg-type]
        return self.conn

    def drop_connection(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = None

    # ------------------------------------------------------------ database

    def with_database(self, what: str, action: Callable[[], T]) -> T:
        """Run ``action`` until it succeeds, reconnecting with backoff.

        Gives up (raises :class:`_Stop`) only when asked to stop while the
        database is unreachable.
        """

        def wait(delay: float, exc: Exception) -> None:
            self.send(reports.DbError(what))
            if self.stop_requested and (
                what != RECORD_OUTCOMES or self.orphaned()
            ):
                # Unwritten outcomes of an orphan are left to the rescue
                # of its dead daemon's jobs.
                raise _Stop(what) from exc
            self.sleep(delay)

        return with_reconnects(
            what, action, drop=self.drop_connection, wait=wait, logger=log
        )

    def orphaned(self) -> bool:
        return os.getppid() != self.spec.parent_pid

    def sleep(self, seconds: float) -> None:
        """Wait for ``seconds``, the wake pipe or a stop, whichever is first."""
        try:
            readable, _, _ = select.select([self.spec.wake_fd], [], [], seconds)
        except InterruptedError:
            return
        if readable:
            try:
                data = os.read(self.spec.wake_fd, 4096)
            except BlockingIOError:
                return
            if not data:
                raise _Stop("the supervisor is gone")

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        """Claim and run jobs until asked to stop or due to retire."""
        self.send(reports.Ready())
        while not self.stop_requested:
            if self.retirement_due():
                return
            limit = policy.claim_size(
                self.config.workers.batch_size, self.mean_job_s
            )
            # The claim writes the outcomes of the batch before it, too.
            batch: list[queue.ClaimedJob] = self.with_database(
                "claim", functools.partial(self.claim, limit)
            )
            if len(batch) < limit:
                # The queue is running dry: the postings those outcomes
                # ended may be complete.
                self.outcomes.settle()
            if not batch:
                # Going idle: what the tally holds is due now.
                self.send_metrics()
                self.mark(WorkerState.IDLE)
                self.sleep(
                    policy.poll_timeout(
                        self.config.workers.poll_interval_s, self.rng.random()
                    )
                )
                continue
            self.send_metrics()
            self.run_batch(batch)

    def claim(self, limit: int) -> list[queue.ClaimedJob]:
        """Claim a batch, writing the last batch's outcomes in the same
        statement."""
        conn = self.connect()
        # Every claim sent gets a fresh owner token, in the scoreboard before
        # the statement leaves: one whose reply is lost owns jobs under a
        # token no live worker holds, which the sweep takes back. The last
        # claim's token stays beside it until its outcomes are written, so
        # its jobs are never taken for ownerless while they are.
        owner = self.outcomes.new_claim()
        self.mark(WorkerState.CLAIMING)
        began = time.monotonic()
        jobs = self.outcomes.claim_with(
            lambda finishing, outcomes: queue.record_and_claim(
                conn,
                finishing=finishing,
                outcomes=outcomes,
                owner=owner,
                daemon_id=self.spec.daemon_id,
                limit=limit,
                provides=self.config.workers.provides,
                posters=self.config.workers.posters,
                resource_limits=self.config.jobs.limits,
            )
        )
        self.tally.note_claim(time.monotonic() - began, len(jobs))
        return jobs

    def retirement_due(self) -> bool:
        workers = self.config.workers
        if workers.max_jobs_per_worker and (
            self.jobs_run >= workers.max_jobs_per_worker
        ):
            self.send(reports.Retiring("max_jobs"))
            return True
        if workers.max_memory_mb and (_rss_mb() > workers.max_memory_mb):
            self.send(reports.Retiring("max_memory"))
            return True
        return False

    def run_batch(self, batch: list[queue.ClaimedJob]) -> None:
        """Run a claimed batch, never starting a job whose claim was lost.

        The claims are checked again before a job starts when the supervisor
        said one may have been cancelled (CLAIMS_SIGNAL) or the last check
        is older than CLAIM_RECHECK_S: a flag and a clock read per job, and
        a query only then.
        """
        checked_at = time.monotonic()
        lost: set[int] = set()
        for index, job in enumerate(batch):
            if job.id in lost:
                continue
            if self.stop_requested or (index and self.retirement_due()):
                self.release([j for j in batch[index:] if j.id not in lost])
                return
            if self.claims_in_doubt or (
                index and time.monotonic() - checked_at >= CLAIM_RECHECK_S
            ):
                unstarted = [j for j in batch[index:] if j.id not in lost]
                lost |= self.drop_lost_claims(unstarted)
                checked_at = time.monotonic()
                if job.id in lost:
                    continue
            self.outcomes.add(self.run_job(job))
            if self.outcomes.flush_due():
                self.outcomes.flush()

    def drop_lost_claims(self, jobs: list[queue.ClaimedJob]) -> set[int]:
        """Give up the claims among ``jobs`` (none started) that are no
        longer this worker's; return their job ids: they must not start."""
        self.claims_in_doubt = False
        return self.outcomes.drop_lost_claims(jobs)

    def release(self, jobs: list[queue.ClaimedJob]) -> None:
        """Give back claimed jobs that were never started (no try used)."""
        for job in jobs:
            self.tally.note_run(job.id, job.entry_point)
        self.outcomes.release(jobs)

    # ------------------------------------------------------------ one job

    def run_job(self, job: queue.ClaimedJob) -> queue.Outcome:
        """Run one claimed job; note it for the metrics and retirement."""
        # What was counted before a job must neither wait for it to end,
        # should it run long (with jobs of REPORT_INTERVAL_S or more on
        # average, a report per job is within the rate anyway), nor die
        # with the worker, should it kill it (a copy goes to the slot).
        self.send_metrics(
            force=(self.mean_job_s or 0.0) >= REPORT_INTERVAL_S, stash=True
        )
        if self.capture is not None:
            self.capture.begin(job.uuid)
        result = self.runner.run(job, self.outcomes.claim_token())
        if self.capture is not None:
            output = self.capture.end()
            if output is not None:
                self.store_output(job, output)
        self.jobs_run += 1
        self.mean_job_s = policy.mean_update(
            self.mean_job_s, result.elapsed_s, 0.2
        )
        self.tally.note_run(
            job.id,
            job.entry_point,
            result.elapsed_s,
            waited_s=result.waited_s,
            timed_out=result.timed_out,
        )
        return result.outcome

    def store_output(
        self, job: queue.ClaimedJob, output: CapturedOutput
    ) -> None:
        """Keep the end of what the job's attempt wrote; best effort, as a
        profile: a database that refuses it costs the job nothing."""
        text = storable_text(output.tail.decode("utf-8", "backslashreplace"))
        try:
            singlejob.store_output(
                self.connect(),
                job_id=job.id,
                attempt=job.attempt,
                output=text,
                total=output.total_bytes,
            )
        except psycopg.Error as exc:
            log.warning("output of job %s not stored: %s", job.uuid, exc)

    def close(self) -> None:
        self.mark(WorkerState.EXITING)
        try:
            self.outcomes.flush()
            self.outcomes.settle()
        finally:
            self.drop_connection()
            # Whatever the tally holds goes now: the worker ends.
            self.send_metrics(force=True)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def main(spec: WorkerSpec) -> NoReturn:
    """The body of a freshly forked worker; never returns to the caller."""
    code = EXIT_OK
    worker = Worker(spec)
    try:
        worker.detach_from_supervisor()
        try:
            worker.boot()
        except _Stop:
            raise
        except Exception as exc:
            log.error("worker could not start: %s", exc)
            worker.send(reports.BootFailed(redact(str(exc))))
            code = EXIT_WORKER_BOOT_FAILED
        else:
            try:
                worker.run()
            finally:
                worker.close()
    except _Stop as stop:
        log.info("stopping: %s", stop)
    except BaseException:
        log.exception("worker failed")
        code = 1
    finally:
        with contextlib.suppress(Exception):
            worker.deliver_reports(_EXIT_DELIVERY_S)
        with contextlib.suppress(Exception):
            logging.shutdown()
    os._exit(code)
