"""The job context: what a running job may know and do about itself.

Owns :func:`current_job` and the :class:`JobContext` it returns while a
job runs (the job's id, its posting's id, its attempt, a database
connection, the posting's shared variables and a way to report progress),
and :class:`JobCall`, which runs one claimed job's function for a worker:
it decodes the stored arguments, sets the context, profiles the call when
it is sampled, and keeps the return value when the posting stores results.
It must not claim jobs or record outcomes; the worker does.
"""

from __future__ import annotations

import contextlib
import cProfile
import functools
import logging
import math
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg

from pdoflowd import asyncjobs, profiling
from pdoflowd.arguments import (
    ValueNotStorable,
    check_text,
    decode,
    decode_job,
    encode_value,
)
from pdoflowd.config import Config, DatabaseConfig, connection_kwargs
from pdoflowd.db import dependencies, onejob, profiles, queue
from pdoflowd.sharedvars import SharedVariables
from pdoflowd.status import JobStatus

__all__ = [
    "JobCall",
    "JobContext",
    "NoJobContext",
    "ResultNotStorable",
    "current_job",
]

log = logging.getLogger("pdoflowd.jobs")

Connection = psycopg.Connection[Any]


class NoJobContext(RuntimeError):
    """:func:`current_job` was called outside a running job."""


class ResultNotStorable(Exception):
    """A job's return value cannot be stored: not JSON, or too large."""


# One job runs at a time in a worker process; threads it starts see the
# same context while it runs.
_current: JobContext | None = None
# The connection jobs of this process share, opened at the first use, and
# the arguments it was opened with.
_connection: Connection | None = None
_connected_with: dict[str, object] = {}


def current_job() -> JobContext:
    """The context of the job running in this process.

    Raises :class:`NoJobContext` anywhere else (in the client, or in a
    job function called directly).
    """
    if _current is None:
        raise NoJobContext(
            "current_job() is only available inside a job run by pdoflowd"
        )
    return _current


def _job_connection(kwargs: dict[str, object]) -> Connection:
    global _connection, _connected_with
    if (
        _connection is None
        or _connection.closed
        or _connection.broken
        or kwargs != _connected_with
    ):
        if _connection is not None:
            _connection.close()
        _connection = psycopg.connect(autocommit=True, **kwargs)  # type: ignore[arg-type]
        _connected_with = kwargs
    return _connection


def _discard_unless_idle() -> None:
    """Close the shared connection if a job left it busy.

    A job stopped inside its own statement (a timeout, or any exception
    raised by a signal handler) leaves the statement in flight: every later
    use of the connection would fail with "another command is already in
    progress". One left inside a transaction would carry that transaction
    into the next job. Either way the next job gets a fresh connection; a
    statement still running is cancelled first, so the server stops the
    work the timeout was meant to stop.
    """
    global _connection
    conn = _connection
    if conn is None or conn.closed:
        return
    status = conn.pgconn.transaction_status
    if status == psycopg.pq.TransactionStatus.IDLE:
        return
    _connection = None
    if status == psycopg.pq.TransactionStatus.ACTIVE:
        limit = _connected_with.get("connect_timeout")
        _cancel(conn, float(limit) if isinstance(limit, int) else 5.0)
    with contextlib.suppress(Exception):
        conn.close()


def _cancel(conn: Connection, timeout: float) -> None:
    # cancel_safe (psycopg >= 3.2) bounds the wait; older ones block in
    # libpq's cancel request.
    cancel_safe = getattr(conn, "cancel_safe", None)
    try:
        if cancel_safe is not None:
            cancel_safe(timeout=timeout)
        else:
            conn.cancel()
    except Exception as exc:
        log.warning("a job's statement left running: %s", exc)


def job_connector(
    database: DatabaseConfig, password: str | None
) -> Callable[[], Connection]:
    """What opens (on first use) and gives the connection that the jobs of
    this process share: make it once per configuration, not per job."""
    kwargs = connection_kwargs(database, password)
    return functools.partial(_job_connection, kwargs)


class JobContext:
    """What a running job knows about itself (see :func:`current_job`)."""

    def __init__(
        self,
        job: queue.ClaimedJob,
        owner: uuid.UUID,
        connect: Callable[[], Connection],
    ) -> None:
        self._job = job
        self._owner = owner
        self._connect = connect

    @functools.cached_property
    def shared(self) -> SharedVariables:
        """The posting's shared variables (made on first use: most jobs
        never read them)."""
        return SharedVariables(self._job.posting_uuid, self._session)

    @property
    def job_id(self) -> uuid.UUID:
        """The job's id, as the poster was given it."""
        return self._job.uuid

    @property
    def posting_id(self) -> uuid.UUID:
        """The id of the job's posting."""
        return self._job.posting_uuid

    @property
    def attempt(self) -> int:
        """1 on the first run of the job, 2 on its first retry, and so on."""
        return self._job.attempt

    @property
    def tries_remaining(self) -> int:
        """Tries left, this run included."""
        return self._job.tries_remaining

    @property
    def entry_point(self) -> str:
        return self._job.entry_point

    def upstream_results(self) -> dict[uuid.UUID, list[Any]]:
        """The return values of the postings this job's posting waited for
        (``after``): by posting id, in the order those postings were made,
        each a list of its done jobs' values in the order they were posted
        (a fan-in job's input). Jobs that did not end done are left out.

        Raises :class:`ValueError` when one of those postings does not
        store results (post it with ``store_result=True``, or mark its
        function ``@job(store_result=True)``).
        """
        rows = dependencies.upstream_results(
            self._connect(), self._job.posting_uuid
        )
        found: dict[uuid.UUID, list[Any]] = {}
        for row in rows:
            values = found.setdefault(row.posting_uuid, [])
            if not row.store_result:
                raise ValueError(
                    f"posting {row.posting_uuid} does not store its jobs'"
                    " results (post it with store_result=True)"
                )
            if row.status is JobStatus.DONE and row.stored:
                values.append(decode(row.value))
        return found

    def connection(self) -> Connection:
        """A database connection (autocommit) for this job's own use.

        It is shared by the jobs this worker runs one after another and
        stays open between them; do not close it, and end any transaction
        you open. A job that ends while a statement of it is still running
        (a timeout) or inside a transaction has the connection closed
        behind it (the statement cancelled, the transaction rolled back);
        the next job gets a fresh one.
        """
        return self._connect()

    @contextlib.contextmanager
    def _session(self) -> Iterator[Connection]:
        yield self._connect()

    def progress(self, fraction: float, note: str | None = None) -> bool:
        """Record how far the job is, from 0.0 to 1.0, with a short note.

        Shown by ``pdoflow posting-status``. Returns False when the job is
        no longer this run's (its posting was cancelled, or it was taken
        back), which a long job may take as a hint to stop.
        """
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not (math.isfinite(fraction) and 0 <= fraction <= 1)
        ):
            raise ValueError(
                f"progress must be a number from 0 to 1, got {fraction!r}"
            )
        if note is not None:
            if not isinstance(note, str):
                raise ValueError(f"a progress note must be text: {note!r}")
            try:
                check_text(note, "note", "the note")
            except ValueNotStorable as exc:
                raise ValueError(exc.problem) from None
        return onejob.set_progress(
            self._connect(),
            job_id=self._job.id,
            owner=self._owner,
            attempt=self._job.attempt,
            progress=float(fraction),
            note=note,
        )


def encode_result(value: Any, max_bytes: int) -> str:
    """A return value as stored JSON, or :class:`ResultNotStorable`."""
    try:
        text = encode_value(value, "result")
    except ValueNotStorable as exc:
        raise ResultNotStorable(
            f"the return value cannot be stored: {exc}"
        ) from None
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise ResultNotStorable(
            f"the return value is {size} bytes as JSON, more than "
            f"jobs.result_max_bytes ({max_bytes})"
        )
    return text


class JobCall:
    """One run of a claimed job's function, as a worker makes it.

    ``connect`` gives the connection the job may use (:func:`job_connector`);
    ``draw`` is a random number from [0, 1) that decides whether this run
    is profiled (``jobs.profile_sample_rate``).
    """

    def __init__(
        self,
        job: queue.ClaimedJob,
        *,
        owner: uuid.UUID,
        config: Config,
        connect: Callable[[], Connection],
        draw: float,
    ) -> None:
        self.job = job
        self.config = config
        self.context = JobContext(job, owner, connect)
        self.profiled = profiling.sampled(config.jobs.profile_sample_rate, draw)
        self.profile: cProfile.Profile | None = None
        self.result_json: str | None = None

    def run(self, function: Callable[..., Any]) -> None:
        """Call the function with the job's arguments, in its context.

        Raises what the function raises, and :class:`ResultNotStorable`
        when its return value is to be kept but cannot be.
        """
        global _current
        posargs, kwargs = decode_job(
            self.job.posargs_json, self.job.kwargs_json
        )
        _current = self.context
        try:
            if asyncjobs.is_async(function):
                # Profiled too: the loop runs the coroutine inside runcall.
                function = functools.partial(
                    asyncjobs.run, function, posargs, kwargs
                )
                posargs, kwargs = [], {}
            if self.profiled:
                self.profile = cProfile.Profile()
                value = self.profile.runcall(function, *posargs, **kwargs)
            else:
                value = function(*posargs, **kwargs)
        finally:
            _current = None
            _discard_unless_idle()
        if self.job.store_result:
            self.result_json = encode_result(
                value, self.config.jobs.result_max_bytes
            )

    def save_profile(self, connect: Callable[[], Connection]) -> None:
        """Write the profile, if this run was sampled, in one transaction.

        Best effort: a profile that cannot be written is logged and lost;
        it never changes the job's outcome.
        """
        if self.profile is None:
            return
        profile, self.profile = self.profile, None
        try:
            record = profiling.profile_record(
                profile,
                job_id=self.job.id,
                attempt=self.job.attempt,
                entry_point=self.job.entry_point,
            )
            profiles.insert_profile(connect(), record)
        except (psycopg.Error, ValueError) as exc:
            log.warning("profile of job %s not stored: %s", self.job.uuid, exc)
