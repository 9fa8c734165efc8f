"""Running one claimed job, and the outcomes not yet written.

Owns what happens between a claim and its outcome's commit. The
:class:`JobRunner` resolves a job's entry point (by the one rule of
:mod:`~pdoflowd.entrypoints`, cached per process), calls its function
under its timeout, and says what became of it as an
:class:`~pdoflowd.db.queue.Outcome`: done, failed or timed out (with the
retry delay of :func:`~pdoflowd.policy.retry_delay`), refused, and a run
cut short by Ctrl-C told apart (:class:`Interrupted`). The
:class:`OutcomeBuffer` keeps outcomes until they are written, in one
statement fenced by their claim's owner token (one by one when the
database refuses some value), or in the next claim's own statement; it
gives up claims that were lost, and settles the postings its outcomes
ended.

It must not know of pipes, the scoreboard or signals: the process that
runs it (a worker, or ``pdoflow execute-job``) gives it a
:class:`Database` and callbacks, and raises :class:`JobTimeout` inside the
job once :attr:`JobRunner.deadline` has passed.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import psycopg

from pdoflowd import entrypoints, jobcontext, policy
from pdoflowd.config import Config
from pdoflowd.db import queue
from pdoflowd.status import JobStatus, OutcomeKind

__all__ = [
    "RECONNECT_DELAY_S",
    "RECORD_OUTCOMES",
    "Claim",
    "Database",
    "Interrupted",
    "JobRunner",
    "JobTimeout",
    "OutcomeBuffer",
    "RunResult",
    "with_reconnects",
]

log = logging.getLogger("pdoflowd.daemon.runner")

T = TypeVar("T")

# What the buffer calls its writes when it asks the Database to retry them
# (a worker asked to stop keeps trying these while its parent lives).
RECORD_OUTCOMES = "record outcomes"
# How much of the reason an outcome was refused is kept in its error.
_REFUSAL_TEXT_CHARS = 500


class JobTimeout(BaseException):
    """Raised inside a job that ran past its deadline (by the signal handler
    of the process that runs it: SIGTERM in a worker, SIGALRM by hand)."""


class Database(Protocol):
    """How the runner and the buffer reach PostgreSQL."""

    def connect(self) -> psycopg.Connection[Any]:
        """The process's connection (autocommit), opened if need be."""
        ...

    def with_database(self, what: str, action: Callable[[], T]) -> T:
        """Run ``action`` until it succeeds, reconnecting as the process
        sees fit; ``what`` names the operation (see RECORD_OUTCOMES)."""
        ...


# The first and the longest wait between tries to reach the database.
RECONNECT_DELAY_S = (0.1, 5.0)


def with_reconnects(
    what: str,
    action: Callable[[], T],
    *,
    drop: Callable[[], None],
    wait: Callable[[float, Exception], None],
    logger: logging.Logger = log,
) -> T:
    """Run ``action`` until it succeeds: the one retry loop of a process
    that runs jobs. After a lost connection it drops it, logs, and waits by
    the one backoff; ``wait(delay, error)`` may raise to give up instead.
    """
    failures = 0
    while True:
        try:
            return action()
        except psycopg.OperationalError as exc:
            drop()
            failures += 1
            delay = policy.backoff_delay(failures, *RECONNECT_DELAY_S)
            logger.warning(
                "%s failed, retrying in %.1f s: %s", what, delay, exc
            )
            wait(delay, exc)


def _nothing(*args: object) -> None:
    return None


# ------------------------------------------------------------ one job


@dataclass(frozen=True)
class RunResult:
    """What became of one run: the outcome to write, how long the function
    ran, and how long the job had been runnable when it started."""

    outcome: queue.Outcome
    elapsed_s: float
    waited_s: float

    @property
    def timed_out(self) -> bool:
        return self.outcome.kind is OutcomeKind.TIMEOUT


@dataclass(frozen=True)
class Interrupted(RunResult):
    """A run cut short by KeyboardInterrupt (Ctrl-C).

    Its ``outcome`` is the failure a worker records: a worker ignores
    SIGINT, so only a job that raises KeyboardInterrupt itself gets here.
    ``pdoflow execute-job`` writes :attr:`given_back` instead.
    """

    @property
    def given_back(self) -> queue.Outcome:
        """The job given back unharmed: released, no try used."""
        return queue.Outcome(
            self.outcome.job_id, self.outcome.attempt, OutcomeKind.RELEASED
        )


class JobRunner:
    """Runs claimed jobs, one at a time, in this process.

    ``password`` is the database's, for the connection jobs may use;
    ``connect`` gives the connection a sampled run's profile is written
    on; ``on_start(job, began)`` is called as each job starts, its
    :attr:`deadline` set (a worker marks its scoreboard slot there);
    ``rng`` draws whether a run is profiled.
    """

    def __init__(
        self,
        config: Config,
        password: str | None,
        connect: Callable[[], psycopg.Connection[Any]],
        *,
        on_start: Callable[[queue.ClaimedJob, float], None] = _nothing,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.connect = connect
        self.on_start = on_start
        self.rng = rng or random.Random()
        # When the running job's time is up (time.monotonic), 0: no limit
        # or no job running. The signal handler that raises JobTimeout
        # reads it, and clears it so it is raised once.
        self.deadline = 0.0
        # Each entry point's function, or why it may not run (both final).
        self.functions: dict[
            str, Callable[..., Any] | entrypoints.EntryPointRefused
        ] = {}
        self.timeout_s = config.jobs.timeout_s
        # The connection the jobs of this process share (on first use).
        self.job_connect = jobcontext.job_connector(config.database, password)

    def timeout_for(self, job: queue.ClaimedJob) -> float:
        """The job's timeout in seconds (0: none): its posting's, or
        ``jobs.timeout_s``."""
        return job.timeout_s or self.timeout_s

    def resolve(self, entry_point: str) -> Callable[..., Any]:
        """The function to call, or raise :class:`EntryPointRefused`.

        Both answers are kept for the process's life; an import that failed
        is tried again by the next job (the module may yet be deployed).
        """
        found = self.functions.get(entry_point)
        if callable(found):
            return found
        if found is None:
            try:
                found = entrypoints.resolve(
                    entry_point,
                    self.config.jobs.allowed_modules,
                    allow_unmarked=self.config.jobs.allow_unmarked,
                )
            except entrypoints.EntryPointRefused as refusal:
                found = refusal
            self.functions[entry_point] = found
        if isinstance(found, entrypoints.EntryPointRefused):
            raise entrypoints.EntryPointRefused(*found.args)
        return found

    def run(self, job: queue.ClaimedJob, owner: uuid.UUID) -> RunResult:
        """Run one job claimed under ``owner`` and say what became of it."""
        timeout = self.timeout_for(job)
        call = jobcontext.JobCall(
            job,
            owner=owner,
            config=self.config,
            connect=self.job_connect,
            draw=self.rng.random(),
        )
        started = time.time()
        begin = time.monotonic()
        error = tb = None
        kind = OutcomeKind.FAILED
        interrupted = False
        try:
            self.deadline = begin + timeout if timeout else 0.0
            self.on_start(job, begin)
            call.run(self.resolve(job.entry_point))
        except JobTimeout:
            error = f"timeout after {timeout:g} s"
            kind = OutcomeKind.TIMEOUT
        except entrypoints.EntryPointRefused as exc:
            error = f"refused: {exc}"
            kind = OutcomeKind.REFUSED
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            tb = traceback.format_exc()
            interrupted = isinstance(exc, KeyboardInterrupt)
        finally:
            self.deadline = 0.0
        elapsed = time.monotonic() - begin
        completed = time.time()
        if call.profile is not None:
            call.save_profile(self.connect)
        waited = max(0.0, started - job.runnable_since)
        if error is None:
            outcome = queue.Outcome(
                job.id,
                job.attempt,
                OutcomeKind.DONE,
                started,
                completed,
                result=call.result_json,
            )
            return RunResult(outcome, elapsed, waited)
        log.info("job %s (%s) failed: %s", job.uuid, job.entry_point, error)
        delay = policy.retry_delay(
            job.attempt,
            self.config.jobs.retry_delay_s,
            self.config.jobs.retry_delay_max_s,
        )
        outcome = queue.Outcome(
            job.id,
            job.attempt,
            kind,
            started,
            completed,
            error=error,
            traceback=tb,
            retry_delay_s=delay,
        )
        result_type = Interrupted if interrupted else RunResult
        return result_type(outcome, elapsed, waited)


# ------------------------------------------------------------ outcomes

# How a worker claims: ``claim(finishing, outcomes)`` writes the outcomes of
# the claim made under ``finishing`` and claims, in one statement.
Claim = Callable[[uuid.UUID | None, list[queue.Outcome]], queue.Claimed]


class OutcomeBuffer:
    """The outcomes of one claim not yet written, and what follows them.

    Every claim gets a fresh owner token (:meth:`new_claim`); its outcomes
    are written under it, by :meth:`flush` or by the next claim's own
    statement (:meth:`claim_with`), never after it. ``flush_window_s``:
    how long an outcome may wait to be written (0: at once, see
    :meth:`flush_due`); ``error_threshold``: ``jobs.posting_error_threshold``.
    ``on_flush()`` is called as a flush begins, ``on_recorded(recorded)``
    with the outcomes each flush wrote.
    """

    def __init__(
        self,
        database: Database,
        *,
        flush_window_s: float,
        error_threshold: int,
        on_flush: Callable[[], None] = _nothing,
        on_recorded: Callable[[list[queue.RecordedOutcome]], None] = _nothing,
    ) -> None:
        self.database = database
        self.flush_window_s = flush_window_s
        self.error_threshold = error_threshold
        self.on_flush = on_flush
        self.on_recorded = on_recorded
        # The owner token of the current claim (None before the first).
        self.owner: uuid.UUID | None = None
        # The token of the claim before it, while its outcomes are kept: a
        # new claim was begun that is to write them.
        self.finishing: uuid.UUID | None = None
        self.pending: list[queue.Outcome] = []
        self.pending_since = 0.0
        # Postings with jobs these outcomes ended, not yet settled.
        self.unsettled: set[int] = set()

    def new_claim(self) -> uuid.UUID:
        """A fresh owner token for the next claim, which it now writes
        under. Outcomes still kept keep theirs (:attr:`finishing`) until
        they are written: by that claim (:meth:`claim_with`) or a flush."""
        if self.pending and self.finishing is None:
            self.finishing = self.owner
        self.owner = uuid.uuid4()
        return self.owner

    def claim_token(self) -> uuid.UUID:
        """The owner token of the claim whose jobs are held."""
        assert self.owner is not None, "no claim yet"
        return self.owner

    def writing_token(self) -> uuid.UUID:
        """The owner token the kept outcomes are written under."""
        return self.finishing or self.claim_token()

    def add(self, outcome: queue.Outcome) -> None:
        """Keep an outcome to be written by the next :meth:`flush`."""
        assert self.finishing is None, "outcomes of two claims"
        self.pending.append(outcome)
        if not self.pending_since:
            self.pending_since = time.monotonic()

    def release(self, jobs: list[queue.ClaimedJob]) -> None:
        """Give back claimed jobs that were never started (no try used)."""
        for job in jobs:
            self.add(queue.Outcome(job.id, job.attempt, OutcomeKind.RELEASED))

    def flush_due(self) -> bool:
        """Whether the first outcome kept has waited the flush window."""
        window = self.flush_window_s
        return window == 0 or time.monotonic() - self.pending_since >= window

    def flush(self) -> None:
        """Write kept outcomes (fenced); note their postings to settle.

        Settling waits for a short batch, an empty claim or the process's
        exit, where a posting is likely to be complete, and saves a
        statement per flush while a queue drains; a job errored out settles
        at once, so a posting past its error threshold stops being claimed.
        What a worker leaves unsettled, the supervisor's maintenance does.
        """
        if not self.pending:
            return
        self.on_flush()
        token = self.writing_token()
        outcomes, self.pending, self.pending_since = self.pending, [], 0.0
        recorded = self.database.with_database(
            RECORD_OUTCOMES, lambda: self.record(outcomes, token)
        )
        self.written(outcomes, recorded, token)

    def claim_with(self, claim: Claim) -> list[queue.ClaimedJob]:
        """Make a claim begun by :meth:`new_claim`, writing the kept
        outcomes in its statement; return the jobs it took.

        Should the database refuse the statement for what some outcome
        holds, the outcomes are written on their own first (:meth:`flush`,
        one by one if need be) and the claim is made alone. A lost
        connection raises, the outcomes still kept under their token: the
        caller begins the claim again, under a fresh token.
        """
        if not self.pending:
            return claim(None, []).jobs
        token = self.writing_token()
        outcomes = self.pending
        try:
            claimed = claim(token, outcomes)
        except psycopg.OperationalError:
            raise
        except Exception:
            self.flush()
            return claim(None, []).jobs
        self.pending, self.pending_since = [], 0.0
        self.written(outcomes, claimed.recorded, token)
        return claimed.jobs

    def written(
        self,
        outcomes: list[queue.Outcome],
        recorded: list[queue.RecordedOutcome],
        token: uuid.UUID,
    ) -> None:
        """What follows the write of ``outcomes`` under ``token``, of which
        the database accepted ``recorded``: give up the claims of the
        others, note the postings to settle."""
        self.finishing = None
        self.on_recorded(recorded)
        written = {r.job_id for r in recorded}
        fenced = [
            (o.job_id, o.attempt) for o in outcomes if o.job_id not in written
        ]
        if fenced:
            log.warning(
                "%d outcome(s) fenced off: their jobs were cancelled or "
                "taken back",
                len(fenced),
            )
            # A cancel leaves these claims to their runs, which are over.
            self.database.with_database(
                RECORD_OUTCOMES,
                lambda: queue.give_up_claims(
                    self.database.connect(), owner=token, claims=fenced
                ),
            )
        finals = [
            r
            for r in recorded
            if r.status in (JobStatus.DONE, JobStatus.ERRORED_OUT)
        ]
        self.unsettled.update(r.posting_id for r in finals)
        if any(r.status is JobStatus.ERRORED_OUT for r in finals):
            self.settle()

    def record(
        self, outcomes: list[queue.Outcome], token: uuid.UUID
    ) -> list[queue.RecordedOutcome]:
        """Write outcomes in one statement; should the database refuse it
        for what some outcome holds (a result jsonb cannot store, say), one
        by one, each refused one as :meth:`queue.Outcome.as_refused`
        makes it. One bad value so neither holds up the others nor sends
        its job back to run again without using a try.
        """
        conn = self.database.connect()
        try:
            return queue.record_outcomes(conn, owner=token, outcomes=outcomes)
        except psycopg.OperationalError:
            raise
        except Exception as exc:
            if len(outcomes) == 1:
                return self.record_refused(outcomes[0], exc, token)
        # Some outcome cannot be stored as it is: find which.
        recorded = []
        for outcome in outcomes:
            try:
                recorded += queue.record_outcomes(
                    conn, owner=token, outcomes=[outcome]
                )
            except psycopg.OperationalError:
                raise
            except Exception as exc:
                recorded += self.record_refused(outcome, exc, token)
        return recorded

    def record_refused(
        self, outcome: queue.Outcome, exc: Exception, token: uuid.UUID
    ) -> list[queue.RecordedOutcome]:
        problem = _problem(exc)
        log.error(
            "the outcome of job %d could not be stored as it was: %s",
            outcome.job_id,
            problem,
        )
        return queue.record_outcomes(
            self.database.connect(),
            owner=token,
            outcomes=[outcome.as_refused(problem)],
        )

    def drop_lost_claims(self, jobs: list[queue.ClaimedJob]) -> set[int]:
        """Give up the claims among ``jobs`` (none started) that are no
        longer this owner's, cancelled or taken back since; return their
        job ids: they must not start."""
        held: set[int] = self.database.with_database(
            "claim",
            lambda: queue.held_claims(
                self.database.connect(), owner=self.claim_token(), jobs=jobs
            ),
        )
        lost = [(j.id, j.attempt) for j in jobs if j.id not in held]
        if lost:
            log.info(
                "%d claimed job(s) not started: cancelled or taken back",
                len(lost),
            )
            self.database.with_database(
                RECORD_OUTCOMES,
                lambda: queue.give_up_claims(
                    self.database.connect(),
                    owner=self.claim_token(),
                    claims=lost,
                ),
            )
        return {job_id for job_id, _ in lost}

    def settle(self) -> None:
        """Finish or error out the postings these outcomes ended.

        Runs after those outcomes committed (see queue.settle_postings).
        """
        if not self.unsettled:
            return
        postings, self.unsettled = self.unsettled, set()
        self.database.with_database(
            "settle postings",
            lambda: queue.settle_postings(
                self.database.connect(),
                postings,
                error_threshold=self.error_threshold,
            ),
        )


def _problem(exc: Exception) -> str:
    """What the database (or the driver) said was wrong, in one line."""
    text = str(exc)
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        text = exc.diag.message_primary
    first_line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first_line}"[:_REFUSAL_TEXT_CHARS]
