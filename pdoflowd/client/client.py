"""The :class:`Client`: post work to the queue, follow it and steer it.

Owns connecting (as :mod:`pdoflowd.client.connection` resolves the
database), writing a posting all or nothing (one transaction of its own,
or a savepoint in the caller's when a connection is passed, so that a bad
argument anywhere leaves no row of it behind), reading a posting's state,
jobs and results, waiting for it, and its controls (pause, resume, cancel,
retry, set status), shared variables and profiles, exporting a posting
and pruning ended ones. The SQL is
:mod:`pdoflowd.db.postings`'s; what a posting may be is
:mod:`pdoflowd.client.checks`'s. It must not run jobs; the poster is never
sent, PostgreSQL records it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import errors
from psycopg.conninfo import make_conninfo
from psycopg.pq import TransactionStatus

from pdoflowd.arguments import ArgumentError, decode, shown
from pdoflowd.client.checks import (
    check_after,
    check_key,
    check_key_scope,
    check_max_running,
    check_name,
    check_on_failure,
    check_posting,
    check_requires,
    check_store_result,
    check_timeout,
    check_tries,
    check_uses,
    when_to_run,
)
from pdoflowd.client.connection import check_conninfo, resolve_connection
from pdoflowd.client.definitions import JobDefinition, definition_of
from pdoflowd.client.errors import (
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
    as_uuid,
)
from pdoflowd.db import (
    dependencies,
    export,
    postings,
    profiles,
    retention,
    singlejob,
)
from pdoflowd.db import schedules as schedule_rows
from pdoflowd.db.dependencies import GraphNode
from pdoflowd.db.postings import (
    JobRow,
    PostingSummary,
    PriorityCount,
    StoredResult,
)
from pdoflowd.db.schedules import ScheduleListing
from pdoflowd.ids import uuid7, uuid7_run
from pdoflowd.sharedvars import SharedVariables
from pdoflowd.status import JobStatus, PostingStatus

__all__ = ["MAX_PRUNE_BATCH", "Client"]

# The most jobs one pruning transaction deletes (retention.batch's bound).
MAX_PRUNE_BATCH = 100_000


def _write_undoably(
    conn: psycopg.Connection[Any],
    write: Callable[[psycopg.Connection[Any]], None],
) -> None:
    """Write a posting in the caller's transaction so that an error undoes
    the posting alone and leaves the connection as it was.

    Inside a transaction the posting gets a savepoint; on an autocommit
    connection outside one, a transaction of its own. A connection not in
    autocommit mode and with no transaction open has nothing of the
    caller's to keep: the posting opens its transaction, and an error rolls
    that back.
    """
    idle = conn.info.transaction_status == TransactionStatus.IDLE
    if conn.autocommit or not idle:
        with conn.transaction():
            write(conn)
        return
    try:
        write(conn)
    except BaseException:
        conn.rollback()
        raise


class Client:
    """Post work, follow it and steer it, from a DSN or an open connection."""

    def __init__(self, dsn: str | None = None) -> None:
        self.target = resolve_connection(dsn, os.environ)
        check_conninfo(self.target.dsn)
        self.dsn = self.target.dsn

    def connect(self) -> psycopg.Connection[Any]:
        # Never prepared: the client's few statements gain little from it,
        # and a pooler in transaction mode cannot keep prepared statements.
        conninfo = self.dsn
        if self.target.password is not None:
            conninfo = make_conninfo(conninfo, password=self.target.password)
        return psycopg.connect(
            conninfo,
            autocommit=True,
            prepare_threshold=None,
            application_name="pdoflow-client",
        )

    @contextlib.contextmanager
    def _session(self) -> Iterator[psycopg.Connection[Any]]:
        with self.connect() as conn:
            yield conn

    # ------------------------------------------------------------ posting

    def post(
        self,
        target: JobDefinition | Callable[..., Any] | str,
        posargs: Sequence[Sequence[Any]],
        kwargs: Sequence[Mapping[str, Any]] | None = None,
        priority: int | Sequence[int] = 0,
        *,
        tries: int | None = None,
        timeout_s: float | None = None,
        paused: bool = False,
        run_after: dt.datetime | dt.timedelta | float | None = None,
        requires: Iterable[str] | None = None,
        store_result: bool | None = None,
        key: str | None = None,
        key_scope: str = "active",
        after: Iterable[Posting | uuid.UUID | str] | None = None,
        on_failure: str = "cancel",
        max_running: int | None = None,
        uses: Iterable[str] | None = None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> Posting:
        """Post one job per argument set to ``target``.

        ``target`` is a ``@job`` function, its definition, or an entry point
        string. ``run_after`` (a timezone-aware datetime, or a delay in
        seconds counted by the database's clock) holds the jobs back until
        then. ``requires``, ``store_result``, ``max_running`` (at most that
        many of its jobs executing at once, across all hosts) and ``uses``
        (resources, each bounded cluster-wide by the daemons' jobs.limits)
        override the definition's.
        With ``conn`` the posting joins the caller's transaction and
        commits or rolls back with it (a connection in autocommit mode gets
        a transaction of its own).

        With a ``key``, a post while a posting of this poster holds the key
        writes nothing and returns that posting, ``existed`` true. A key is
        held until its posting ends (finished, errored out or cancelled),
        or with ``key_scope="forever"`` for as long as the posting exists.
        Concurrent posts of one key make one posting.

        With ``after`` (postings, or their ids) the jobs are held until
        every one of those postings has finished. If one ends errored out
        or cancelled this posting is cancelled, and the postings that wait
        for it after it; with ``on_failure="run"`` it runs all the same
        once they have all ended. A posting that is not yours, or none, is
        a :class:`PostingError` and nothing is written.
        """
        definition = definition_of(target)
        check_name(definition.name)
        tries = definition.tries if tries is None else tries
        check_tries(tries)
        if timeout_s is None:
            timeout_s = definition.timeout_s
        check_timeout(timeout_s)
        needs = (
            definition.requires
            if requires is None
            else check_requires(requires)
        )
        if store_result is None:
            store_result = definition.store_result
        check_store_result(store_result)
        cap = (
            definition.max_running
            if max_running is None
            else check_max_running(max_running)
        )
        resources = definition.uses if uses is None else check_uses(uses)
        at, delay_s = when_to_run(run_after)
        key = check_key(key)
        scope = check_key_scope(key_scope)
        upstreams = check_after(after)
        failure_rule = check_on_failure(on_failure)
        try:
            jobs = check_posting(posargs, kwargs, priority)
        except ArgumentError as exc:
            raise PostingError(str(exc)) from exc
        posting_id = uuid7()
        job_ids = uuid7_run(jobs.count)

        # What the write found when the key was held: that posting's id
        # and its jobs' ids (a retried write starts afresh).
        held: list[Posting] = []

        def write(connection: psycopg.Connection[Any]) -> None:
            held.clear()
            inserted = postings.insert_posting(
                connection,
                posting_uuid=posting_id,
                target_function=definition.name,
                entry_point=definition.entry_point,
                jobs=jobs.encoded(job_ids.texts()),
                tries=tries,
                paused=paused,
                timeout_s=timeout_s,
                run_after=at,
                delay_s=delay_s,
                requires=needs,
                store_result=store_result,
                key=key,
                key_scope=scope,
                after=upstreams,
                on_failure=failure_rule,
                max_running=cap,
                uses=resources,
            )
            if inserted.existed:
                their_jobs = postings.posting_job_uuids(connection, inserted.id)
                held.append(Posting(inserted.uuid, their_jobs, existed=True))

        try:
            if conn is None:
                with self.connect() as own, own.transaction():
                    write(own)
            else:
                _write_undoably(conn, write)
        except (ArgumentError, postings.UnknownUpstream) as exc:
            raise PostingError(str(exc)) from exc
        except errors.ForeignKeyViolation as exc:
            # An upstream posting pruned (or its poster changed) between
            # the check and the write.
            raise PostingError(exc.diag.message_primary or str(exc)) from None
        return held[0] if held else Posting(posting_id, job_ids)

    # ------------------------------------------------------------ following

    def status(self, posting_id: uuid.UUID | str) -> PostingState:
        """A posting's status and job counts; KeyError if there is none."""
        ident = as_uuid(posting_id)
        with self.connect() as conn:
            return self._state(conn, ident)

    @staticmethod
    def _state(conn: psycopg.Connection[Any], ident: uuid.UUID) -> PostingState:
        progress = postings.posting_progress(conn, ident)
        if progress is None:
            raise KeyError(f"no posting {ident}")
        return PostingState(
            ident,
            progress.status,
            progress.jobs,
            tuple(dependencies.waiting_for(conn, ident)),
        )

    def graph(
        self, posting_id: uuid.UUID | str, *, depth: int = 20
    ) -> list[GraphNode]:
        """The posting and the tree of the postings it waits for, depth
        first, to ``depth`` levels; KeyError if there is no such posting."""
        ident = as_uuid(posting_id)
        with self.connect() as conn:
            nodes = dependencies.dependency_graph(conn, ident, depth=depth)
        if not nodes:
            raise KeyError(f"no posting {ident}")
        return nodes

    def dependents(
        self, posting_id: uuid.UUID | str
    ) -> list[tuple[uuid.UUID, PostingStatus, str]]:
        """The postings that wait for this one: (id, status, target)."""
        with self.connect() as conn:
            return dependencies.dependents(conn, as_uuid(posting_id))

    def wait(
        self,
        posting_id: uuid.UUID | str,
        timeout: float | None = None,
        *,
        poll_interval: float = 0.5,
        on_progress: Callable[[PostingState], None] | None = None,
    ) -> PostingState:
        """Wait until the posting is finished, errored out or cancelled.

        Raises :class:`WaitTimeout` (a ``TimeoutError``) when ``timeout``
        seconds pass first.
        """
        return self._poll(
            posting_id,
            lambda state: state.finished,
            timeout,
            poll_interval,
            on_progress,
        )

    def wait_for(
        self,
        posting_id: uuid.UUID | str,
        *,
        status: JobStatus | Iterable[JobStatus] = (
            JobStatus.DONE,
            JobStatus.ERRORED_OUT,
        ),
        fraction: float | None = None,
        count: int | None = None,
        timeout: float | None = None,
        poll_interval: float = 0.5,
        on_progress: Callable[[PostingState], None] | None = None,
    ) -> PostingState:
        """Wait until enough of the posting's jobs are in ``status``.

        Enough is ``count`` jobs, or ``fraction`` (0 to 1) of all its jobs
        (the default: all of them). ``status`` is one job status or several
        (by default done and errored out: jobs that ended). Returns the
        state that met the threshold; raises :class:`PostingEnded` when the
        posting ended with nothing left running and the threshold unmet,
        :class:`WaitTimeout` when ``timeout`` seconds pass first.
        """
        statuses = _job_statuses(status)
        if fraction is not None and count is not None:
            raise ValueError("give fraction or count, not both")
        if count is not None:
            if isinstance(count, bool) or not isinstance(count, int):
                raise ValueError(f"count must be an integer, got {count!r}")
            if count < 0:
                raise ValueError(f"count must be at least 0, got {count}")
        if fraction is None and count is None:
            fraction = 1.0
        if fraction is not None and not (
            isinstance(fraction, (int, float))
            and not isinstance(fraction, bool)
            and 0 <= fraction <= 1
        ):
            raise ValueError(f"fraction must be from 0 to 1, got {fraction!r}")

        def reached(state: PostingState) -> bool:
            have = sum(state.jobs.get(s, 0) for s in statuses)
            if count is not None:
                return have >= count
            assert fraction is not None
            return have >= math.ceil(fraction * state.total - 1e-9)

        def done(state: PostingState) -> bool:
            if reached(state):
                return True
            if state.finished and not state.jobs.get(JobStatus.EXECUTING, 0):
                raise PostingEnded(state)
            return False

        return self._poll(posting_id, done, timeout, poll_interval, on_progress)

    def _poll(
        self,
        posting_id: uuid.UUID | str,
        done: Callable[[PostingState], bool],
        timeout: float | None,
        poll_interval: float,
        on_progress: Callable[[PostingState], None] | None,
    ) -> PostingState:
        if not poll_interval > 0:
            raise ValueError("poll_interval must be a positive number")
        if timeout is not None and not timeout >= 0:
            raise ValueError("timeout must be a number of seconds, at least 0")
        ident = as_uuid(posting_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.connect() as conn:
            while True:
                state = self._state(conn, ident)
                if on_progress is not None:
                    on_progress(state)
                if done(state):
                    return state
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(state)
                pause = poll_interval
                if deadline is not None:
                    pause = min(pause, max(0.0, deadline - time.monotonic()))
                time.sleep(pause)

    def summary(self, posting_id: uuid.UUID | str) -> PostingSummary:
        """A posting in full (``pdoflow posting-status``); KeyError if none."""
        ident = as_uuid(posting_id)
        with self.connect() as conn:
            found = postings.posting_summary(conn, ident)
        if found is None:
            raise KeyError(f"no posting {ident}")
        return found

    def jobs(
        self, posting_id: uuid.UUID | str, *, limit: int = 1000
    ) -> list[JobRow]:
        """The first ``limit`` jobs of a posting, in the order given."""
        ident = as_uuid(posting_id)
        with self.connect() as conn:
            if postings.posting_progress(conn, ident) is None:
                raise KeyError(f"no posting {ident}")
            return postings.posting_jobs(conn, ident, limit=limit)

    def postings(
        self,
        *,
        limit: int = 50,
        status: PostingStatus | str | None = None,
    ) -> list[PostingSummary]:
        """The newest postings the session may see (its own, for a
        submitter role), newest first."""
        wanted = None if status is None else _posting_status(status)
        with self.connect() as conn:
            return postings.list_postings(conn, limit=limit, status=wanted)

    def priority_stats(self) -> list[PriorityCount]:
        """Unfinished jobs by priority, highest first."""
        with self.connect() as conn:
            return postings.priority_stats(conn)

    def schedules(self) -> tuple[dt.datetime, list[ScheduleListing]]:
        """The database's time, and the schedules the live daemons run,
        each with its newest run. Needs the daemon's privileges (or the
        schema owner's): :class:`PermissionError` otherwise."""
        with self.connect() as conn:
            try:
                return schedule_rows.list_schedules(conn)
            except errors.InsufficientPrivilege as exc:
                raise PermissionError(
                    "listing schedules needs the daemon's privileges (or the"
                    " schema owner's): connect as the daemon's role"
                ) from exc

    # ------------------------------------------------------------ steering

    def _control(
        self,
        posting_id: uuid.UUID | str,
        action: str,
        tries: int | None = None,
    ) -> ControlResult:
        ident = as_uuid(posting_id)
        with _refusals(f"posting {ident}", action), self.connect() as conn:
            status, changed = postings.control_posting(
                conn, ident, action, tries=tries
            )
        return ControlResult(ident, status, changed)

    def pause(self, posting_id: uuid.UUID | str) -> ControlResult:
        """Stop an executing posting's jobs from being claimed.

        Jobs running now run on. PostingStateError unless it is executing.
        """
        return self._control(posting_id, "pause")

    def resume(self, posting_id: uuid.UUID | str) -> ControlResult:
        """Let a paused (or errored-out) posting's waiting jobs run again."""
        return self._control(posting_id, "resume")

    def cancel(self, posting_id: uuid.UUID | str) -> ControlResult:
        """End a posting: its waiting and running jobs errored out with the
        error ``cancelled`` (running ones have their worker process ended
        by their daemon), the posting ``cancelled``."""
        return self._control(posting_id, "cancel")

    def retry(
        self, posting_id: uuid.UUID | str, *, tries: int | None = None
    ) -> ControlResult:
        """Put a posting's errored-out jobs back to waiting with fresh tries
        (the posting's own, or ``tries``); the posting executes again
        (a paused one stays paused). ``jobs_changed`` counts them."""
        if tries is not None:
            check_tries(tries)
        return self._control(posting_id, "retry", tries)

    def set_status(
        self, posting_id: uuid.UUID | str, status: PostingStatus | str
    ) -> ControlResult:
        """Set a posting's status as the seed's ``set-posting-status`` did:
        paused is :meth:`pause`, executing :meth:`resume`, cancelled
        :meth:`cancel`; finished and errored_out mark the posting so
        without touching its jobs (waiting ones are then no longer run)."""
        wanted = _posting_status(status)
        action = {
            PostingStatus.PAUSED: "pause",
            PostingStatus.EXECUTING: "resume",
            PostingStatus.CANCELLED: "cancel",
        }.get(wanted, wanted.value)
        return self._control(posting_id, action)

    # ------------------------------------------------------------ results

    def results(self, posting_id: uuid.UUID | str) -> list[JobResult]:
        """Every job's end and return value, in the order the jobs were
        given (values are kept only for postings that store results)."""
        ident = as_uuid(posting_id)
        with self.connect() as conn:
            rows = postings.posting_results(conn, ident)
        if rows is None:
            raise KeyError(f"no posting {ident}")
        return [_job_result(row) for row in rows]

    # ------------------------------------------------------------ one job

    def job(self, job_id: uuid.UUID | str) -> JobInfo:
        """One job whole (see :class:`JobInfo`); KeyError if there is no
        such job, or it is not yours to see."""
        ident = as_uuid(job_id, "job")
        with self.connect() as conn:
            row = singlejob.job_details(conn, ident)
        if row is None:
            raise KeyError(f"no job {ident}")
        posargs, kwargs = decode(row.posargs), decode(row.kwargs)
        return JobInfo(
            id=row.uuid,
            posting_id=row.posting_uuid,
            target_function=row.target_function,
            entry_point=row.entry_point,
            status=row.status,
            posting_status=row.posting_status,
            priority=row.priority,
            attempt=row.attempt,
            tries_remaining=row.tries_remaining,
            args=posargs,
            kwargs=kwargs,
            error=row.error,
            traceback=row.traceback,
            result_stored=row.result_stored,
            result=decode(row.result) if row.result_stored else None,
            progress=row.progress,
            progress_note=row.progress_note,
            created_at=row.created_at,
            run_after=row.run_after,
            claimed_at=row.claimed_at,
            started_at=row.work_started_at,
            completed_at=row.completed_at,
            daemon_host=row.daemon_host,
            daemon_pid=row.daemon_pid,
        )

    def job_output(self, job_id: uuid.UUID | str) -> list[JobOutput]:
        """What each attempt of the job wrote to stdout and stderr, by
        attempt; attempts that wrote nothing are absent. KeyError if there
        is no such job, or it is not yours to see."""
        ident = as_uuid(job_id, "job")
        with self.connect() as conn, conn.transaction():
            if singlejob.job_details(conn, ident) is None:
                raise KeyError(f"no job {ident}")
            found = singlejob.job_output(conn, ident)
        return [
            JobOutput(ident, o.attempt, o.output, o.total_bytes, o.written_at)
            for o in found
        ]

    def cancel_job(self, job_id: uuid.UUID | str) -> JobControlResult:
        """End one waiting or executing job: errored out with the error
        ``cancelled``. A running one is stopped by ending its worker, as a
        posting's cancel does. PostingStateError if it has ended."""
        return self._control_job(job_id, "cancel")

    def retry_job(
        self, job_id: uuid.UUID | str, *, tries: int | None = None
    ) -> JobControlResult:
        """Put one errored-out job back to waiting with fresh tries (its
        posting's, or ``tries``); its posting executes again unless paused.
        PostingStateError if the job has not errored out, or its posting
        was cancelled (retry the posting then)."""
        if tries is not None:
            check_tries(tries)
        return self._control_job(job_id, "retry", tries)

    def _control_job(
        self, job_id: uuid.UUID | str, action: str, tries: int | None = None
    ) -> JobControlResult:
        ident = as_uuid(job_id, "job")
        with _refusals(f"job {ident}", action), self.connect() as conn:
            status, posting_status = singlejob.control_job(
                conn, ident, action, tries=tries
            )
        return JobControlResult(ident, status, posting_status)

    def result(self, job_id: uuid.UUID | str) -> JobResult:
        """One job's end and return value; KeyError if there is no job."""
        ident = as_uuid(job_id, "job")
        with self.connect() as conn:
            row = postings.job_result(conn, ident)
        if row is None:
            raise KeyError(f"no job {ident}")
        return _job_result(row)

    def export(
        self, posting_id: uuid.UUID | str, write: Callable[[str], object]
    ) -> export.ExportCount:
        """Pass ``write`` the posting as JSON lines, one snapshot: its own
        line, its shared variables', then each job's (arguments, outcome,
        stored result, in the stored encoding), in order; no newlines.
        KeyError (nothing written) if there is no such posting."""
        ident = as_uuid(posting_id)
        with self.connect() as conn:
            count = export.export_posting(conn, ident, write)
        if count is None:
            raise KeyError(f"no posting {ident}")
        return count

    def prune(
        self,
        older_than_s: float,
        statuses: Iterable[PostingStatus | str] = retention.ENDED,
        *,
        dry_run: bool = False,
        batch: int = 1000,
    ) -> retention.PruneCount:
        """Delete postings of ``statuses`` (ended ones: finished,
        errored_out, cancelled) that ended more than ``older_than_s`` seconds
        ago, with their jobs, results, profiles and shared variables, in
        transactions of ``batch`` jobs; with ``dry_run`` only count them.

        Postings with a job still running are kept. Returns how many
        postings and jobs went (or would). Needs DELETE on postings and
        jobs (a daemon's role): :class:`PruningNotAllowed` otherwise. A
        lock or statement timeout of the session ends it with a
        TimeoutError that says how much had gone.
        """
        ages = _retention_ages(older_than_s, statuses)
        if (
            isinstance(batch, bool)
            or not isinstance(batch, int)
            or not 1 <= batch <= MAX_PRUNE_BATCH
        ):
            raise ValueError(
                f"batch must be from 1 to {MAX_PRUNE_BATCH}, got {batch!r}"
            )
        with self.connect() as conn:
            if not retention.may_prune(conn):
                raise PruningNotAllowed(
                    "this role may not prune: it needs DELETE on "
                    "pdoflowd.postings and pdoflowd.jobs (a daemon's role, "
                    "see pdoflowd migrate --grant-daemon)"
                )
            if dry_run:
                return retention.count_prunable(conn, ages)
            removed = retention.PruneCount()
            while True:
                done = retention.prune_some(
                    conn, ages, batch=batch, postings=100
                )
                removed += done.removed
                if done.interrupted:
                    raise TimeoutError(
                        f"pruning stopped after {removed.postings} postings "
                        f"and {removed.jobs} jobs: {done.interrupted}"
                    )
                if not done.more_left or not (
                    done.removed.postings or done.removed.jobs
                ):
                    return removed

    def shared(self, posting_id: uuid.UUID | str) -> SharedVariables:
        """The posting's shared variables (each call connects anew)."""
        return SharedVariables(as_uuid(posting_id), self._session)

    def function_stats(
        self, *, entry_point: str | None = None, limit: int = 20
    ) -> list[profiles.FunctionStat]:
        """Where profiled jobs (of one entry point, if given) spent time."""
        with self.connect() as conn:
            return profiles.function_stats(
                conn, entry_point=entry_point, limit=limit
            )


@contextlib.contextmanager
def _refusals(what: str, action: str) -> Iterator[None]:
    """A control's refusals by the database as the client's errors:
    ``what`` (``posting ID``, ``job ID``) missing or not the caller's is a
    KeyError, a status that does not allow ``action`` a PostingStateError."""
    try:
        yield
    except errors.NoDataFound:
        raise KeyError(f"no {what}") from None
    except errors.ObjectNotInPrerequisiteState as exc:
        raise PostingStateError(exc.diag.message_primary) from None
    except errors.UniqueViolation:
        # Only a key can collide: another posting took it meanwhile.
        raise PostingStateError(
            f"{what} cannot {action}: another posting of yours holds the"
            " key now"
        ) from None


def _job_result(row: StoredResult) -> JobResult:
    value = decode(row.value) if row.stored else None
    return JobResult(row.job_uuid, row.status, row.stored, value, row.error)


def _job_statuses(status: JobStatus | Iterable[JobStatus]) -> set[JobStatus]:
    items = [status] if isinstance(status, (str, JobStatus)) else status
    try:
        statuses = {JobStatus(s) for s in items}
    except ValueError:
        raise ValueError(
            "status must be job statuses: "
            + ", ".join(s.value for s in JobStatus)
        ) from None
    if not statuses:
        raise ValueError("status must name at least one job status")
    return statuses


def _retention_ages(
    older_than_s: float, statuses: Iterable[PostingStatus | str]
) -> dict[PostingStatus, float]:
    if (
        isinstance(older_than_s, bool)
        or not isinstance(older_than_s, (int, float))
        or not 0 <= older_than_s < math.inf
    ):
        raise ValueError(
            f"older_than_s must be a number of seconds, at least 0, got "
            f"{older_than_s!r}"
        )
    if isinstance(statuses, (str, PostingStatus)):
        statuses = [statuses]
    wanted = {_posting_status(s) for s in statuses}
    if not wanted:
        raise ValueError("name at least one posting status to prune")
    unended = sorted(s.value for s in wanted if not s.is_final)
    if unended:
        raise PostingStateError(
            f"only ended postings can be pruned (finished, errored_out, "
            f"cancelled), not {', '.join(unended)}"
        )
    return dict.fromkeys(wanted, float(older_than_s))


def _posting_status(status: PostingStatus | str) -> PostingStatus:
    try:
        return PostingStatus(status)
    except ValueError:
        raise PostingStateError(
            f"{shown(status)} is not a posting status (one of "
            + ", ".join(s.value for s in PostingStatus)
            + ")"
        ) from None
