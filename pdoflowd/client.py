"""The client: define jobs and post work to the queue.

Owns ``@job`` and :data:`Registry` (the seed's way: ``Registry[f].post_work``)
and :class:`Client` (post, status, wait) for code and tools. A posting is
checked whole, every argument of every job, before any row is written, and
it is written in one transaction (the caller's own when a connection is
passed). It must not run jobs or touch the daemon's tables beyond posting
and reading progress.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import psycopg

from pdoflowd import queries
from pdoflowd.arguments import ArgumentError, encode_job
from pdoflowd.ids import uuid7
from pdoflowd.status import JobStatus, PostingStatus

__all__ = [
    "ArgumentError",
    "Client",
    "JobDefinition",
    "Posting",
    "PostingError",
    "PostingState",
    "Registry",
    "WaitTimeout",
    "job",
]

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_TRIES = 3
# Priorities and tries are stored as PostgreSQL integers.
MIN_PRIORITY = -(2**31)
MAX_PRIORITY = 2**31 - 1
MAX_TRIES = 2**31 - 1
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


class PostingError(ValueError):
    """A posting that cannot be accepted; nothing was written."""


class WaitTimeout(TimeoutError):
    """A posting did not end within the time given; carries its last state."""

    def __init__(self, state: PostingState) -> None:
        super().__init__(f"posting {state.id} is still {state.status.value}")
        self.state = state


@dataclass(frozen=True)
class Posting:
    """A posting just made: its id and the ids of its jobs, in order."""

    id: uuid.UUID
    job_ids: list[uuid.UUID]


@dataclass(frozen=True)
class PostingState:
    """A posting's status and how many of its jobs are in each status."""

    id: uuid.UUID
    status: PostingStatus
    jobs: Mapping[JobStatus, int]

    @property
    def total(self) -> int:
        return sum(self.jobs.values())

    @property
    def finished(self) -> bool:
        return self.status.is_final

    def as_json(self) -> dict[str, Any]:
        """The stable JSON form (``pdoflow status --json``)."""
        return {
            "id": str(self.id),
            "status": self.status.value,
            "jobs": {s.value: self.jobs.get(s, 0) for s in JobStatus},
        }


def entry_point_of(function: Callable[..., Any]) -> str:
    """The dotted path a worker imports ``function`` by; refuse others."""
    module = getattr(function, "__module__", None)
    qualname = getattr(function, "__qualname__", None)
    if module in ("__main__", "__mp_main__"):
        raise PostingError(
            f"{qualname or function!r} is defined in __main__; job functions "
            "must be importable by a dotted path (package.module.function)"
        )
    if not isinstance(module, str) or not isinstance(qualname, str):
        # functools.partial objects and callable instances have no name a
        # worker could import them by.
        raise PostingError(
            f"{function!r} has no importable name; make a module-level "
            "function the job"
        )
    if "<" in qualname:
        raise PostingError(
            f"{module}.{qualname} is not importable (nested or lambda); "
            "define job functions at module level"
        )
    if inspect.ismethod(function) and not inspect.isclass(function.__self__):
        # A worker would import the plain function and call it without self.
        raise PostingError(
            f"{module}.{qualname} is bound to an instance; a worker cannot "
            "import the instance, so make a module-level function the job"
        )
    return check_entry_point(f"{module}.{qualname}")


def check_entry_point(entry_point: str) -> str:
    """Accept a "package.module.function" string as it is, or refuse it."""
    if not _DOTTED.match(entry_point):
        raise PostingError(
            f"{entry_point!r} is not a dotted path (package.module.function)"
        )
    return entry_point


@dataclass(frozen=True)
class JobDefinition:
    """A function made into a job: its name, entry point and defaults."""

    function: Callable[..., Any]
    name: str
    entry_point: str
    tries: int = DEFAULT_TRIES
    timeout_s: float | None = None

    def post_work(
        self,
        posargs: Sequence[Sequence[Any]],
        kwargs: Sequence[Mapping[str, Any]] | None = None,
        priority: int | Sequence[int] = 0,
        *,
        tries: int | None = None,
        dsn: str | None = None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> tuple[uuid.UUID, list[uuid.UUID]]:
        """Post one job per argument set; return (posting id, job ids)."""
        posting = Client(dsn).post(
            self,
            posargs,
            kwargs,
            priority,
            tries=tries,
            conn=conn,
        )
        return posting.id, posting.job_ids


class _Registry:
    """Job definitions by function or by name: ``Registry[f]``."""

    def __init__(self) -> None:
        self._by_key: dict[Any, JobDefinition] = {}

    def add(self, definition: JobDefinition) -> None:
        self._by_key[definition.function] = definition
        self._by_key[definition.name] = definition

    def __getitem__(self, key: Callable[..., Any] | str) -> JobDefinition:
        try:
            return self._by_key[key]
        except KeyError:
            raise KeyError(
                f"{key!r} is not a job; decorate it with @job()"
            ) from None

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __iter__(self) -> Iterator[JobDefinition]:
        seen = {id(d): d for d in self._by_key.values()}
        return iter(seen.values())


Registry = _Registry()


def _check_tries(tries: Any) -> None:
    if (
        isinstance(tries, bool)
        or not isinstance(tries, int)
        or not 1 <= tries <= MAX_TRIES
    ):
        raise PostingError(
            f"tries must be an integer from 1 to {MAX_TRIES}, got {tries!r}"
        )


def _check_timeout(timeout_s: Any) -> None:
    if timeout_s is None:
        return
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or not 0 < timeout_s < math.inf
    ):
        raise PostingError(
            f"timeout must be a positive number of seconds, got {timeout_s!r}"
        )


@overload
def job(name: F) -> F: ...
@overload
def job(
    name: str | None = None,
    *,
    tries: int = DEFAULT_TRIES,
    timeout: float | None = None,
) -> Callable[[F], F]: ...
def job(
    name: Any = None,
    *,
    tries: int = DEFAULT_TRIES,
    timeout: float | None = None,
) -> Any:
    """Make a module-level function a job (``@job()`` or ``@job(name=...)``).

    The function is returned unchanged; ``Registry[function]`` gives its
    definition. A function in ``__main__`` or a nested one is refused here.
    """
    if callable(name):
        return job()(name)
    if name is not None and (not isinstance(name, str) or not name):
        raise PostingError(f"a job name must be a non-empty string: {name!r}")
    _check_tries(tries)
    _check_timeout(timeout)

    def decorate(function: F) -> F:
        entry_point = entry_point_of(function)
        Registry.add(
            JobDefinition(
                function=function,
                name=name or function.__name__,
                entry_point=entry_point,
                tries=tries,
                timeout_s=timeout,
            )
        )
        return function

    return decorate


def _per_job_list(value: Any, name: str, each: str) -> list[Any]:
    # A lone dict, string or scalar here is a common slip (the arguments of
    # one job given where a list of them, one per job, is expected).
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(
        value, Iterable
    ):
        raise PostingError(
            f"{name} must be a list with one {each} per job, got "
            f"{type(value).__name__}"
        )
    return list(value)


def _job_count(posargs: Sequence[Any], kwargs: Sequence[Any]) -> int:
    if posargs and kwargs and len(posargs) != len(kwargs):
        raise PostingError(
            f"posargs has {len(posargs)} entries but kwargs has "
            f"{len(kwargs)}; give one of each per job, or leave one empty"
        )
    return max(len(posargs), len(kwargs))


def _check_priority(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PostingError(f"{where}priority must be an integer")
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise PostingError(
            f"{where}priority must be between {MIN_PRIORITY} and "
            f"{MAX_PRIORITY}, got {value}"
        )


def _priorities(priority: int | Sequence[int], count: int) -> list[int]:
    if isinstance(priority, (str, bytes, Mapping)) or not isinstance(
        priority, (int, Iterable)
    ):
        raise PostingError(
            "priority must be an integer or a list of integers, one per job"
        )
    if isinstance(priority, int):
        _check_priority(priority, "")
        return [priority] * count
    values = list(priority)
    if len(values) != count:
        raise PostingError(f"{len(values)} priorities given for {count} jobs")
    for index, value in enumerate(values):
        _check_priority(value, f"job {index}: ")
    return values


def encode_posting(
    posargs: Sequence[Sequence[Any]],
    kwargs: Sequence[Mapping[str, Any]] | None,
    priority: int | Sequence[int],
) -> list[queries.NewJob]:
    """Check and encode every job of a posting; raise before any write."""
    posargs = _per_job_list(posargs, "posargs", "list of arguments")
    kwargs = _per_job_list(
        [] if kwargs is None else kwargs, "kwargs", "dict of keyword arguments"
    )
    count = _job_count(posargs, kwargs)
    if count == 0:
        raise PostingError("a posting needs at least one job")
    priorities = _priorities(priority, count)
    jobs = []
    for index in range(count):
        args_json, kwargs_json = encode_job(
            index,
            posargs[index] if posargs else [],
            kwargs[index] if kwargs else {},
        )
        jobs.append(
            queries.NewJob(uuid7(), priorities[index], args_json, kwargs_json)
        )
    return jobs


def resolve_dsn(dsn: str | None, environ: Mapping[str, str]) -> str:
    """The connection string: explicit, else ``PDOFLOW_DSN``, else libpq's."""
    if dsn:
        return dsn
    return environ.get("PDOFLOW_DSN", "")


class Client:
    """Post work and follow it, from a DSN or an open connection."""

    def __init__(self, dsn: str | None = None) -> None:
        self.dsn = resolve_dsn(dsn, os.environ)

    def connect(self) -> psycopg.Connection[Any]:
        # Never prepared: the client's few statements gain little from it,
        # and a pooler in transaction mode cannot keep prepared statements.
        return psycopg.connect(
            self.dsn,
            autocommit=True,
            prepare_threshold=None,
            application_name="pdoflow-client",
        )

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
        conn: psycopg.Connection[Any] | None = None,
    ) -> Posting:
        """Post one job per argument set to ``target``.

        ``target`` is a ``@job`` function, its definition, or an entry point
        string. With ``conn`` the posting joins the caller's transaction and
        commits or rolls back with it (a connection in autocommit mode gets
        a transaction of its own).
        """
        definition = self._definition(target)
        tries = definition.tries if tries is None else tries
        _check_tries(tries)
        if timeout_s is None:
            timeout_s = definition.timeout_s
        _check_timeout(timeout_s)
        try:
            jobs = encode_posting(posargs, kwargs, priority)
        except ArgumentError as exc:
            raise PostingError(str(exc)) from exc
        posting_id = uuid7()

        def write(connection: psycopg.Connection[Any]) -> None:
            queries.insert_posting(
                connection,
                posting_uuid=posting_id,
                target_function=definition.name,
                entry_point=definition.entry_point,
                jobs=jobs,
                tries=tries,
                paused=paused,
                timeout_s=timeout_s,
            )

        if conn is None:
            with self.connect() as own, own.transaction():
                write(own)
        elif conn.autocommit:
            with conn.transaction():
                write(conn)
        else:
            write(conn)
        return Posting(posting_id, [j.uuid for j in jobs])

    @staticmethod
    def _definition(
        target: JobDefinition | Callable[..., Any] | str,
    ) -> JobDefinition:
        if isinstance(target, JobDefinition):
            return target
        if isinstance(target, str):
            if target in Registry:
                return Registry[target]
            entry = check_entry_point(target)
            for definition in Registry:
                # The same job posted by its path keeps its name and defaults.
                if definition.entry_point == entry:
                    return definition
            return JobDefinition(
                function=_not_local,
                name=entry.rsplit(".", 1)[1],
                entry_point=entry,
            )
        if target in Registry:
            return Registry[target]
        entry = entry_point_of(target)
        return JobDefinition(
            function=target, name=target.__name__, entry_point=entry
        )

    def status(self, posting_id: uuid.UUID | str) -> PostingState:
        """A posting's status and job counts; KeyError if there is none."""
        ident = _as_uuid(posting_id)
        with self.connect() as conn:
            progress = queries.posting_progress(conn, ident)
        if progress is None:
            raise KeyError(f"no posting {ident}")
        return PostingState(ident, progress.status, progress.jobs)

    def wait(
        self,
        posting_id: uuid.UUID | str,
        timeout: float | None = None,
        *,
        poll_interval: float = 0.5,
        on_progress: Callable[[PostingState], None] | None = None,
    ) -> PostingState:
        """Wait until the posting is finished or errored out.

        Raises :class:`WaitTimeout` (a ``TimeoutError``) when ``timeout``
        seconds pass first.
        """
        if not poll_interval > 0:
            raise ValueError("poll_interval must be a positive number")
        if timeout is not None and not timeout >= 0:
            raise ValueError("timeout must be a number of seconds, at least 0")
        ident = _as_uuid(posting_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.connect() as conn:
            while True:
                progress = queries.posting_progress(conn, ident)
                if progress is None:
                    raise KeyError(f"no posting {ident}")
                state = PostingState(ident, progress.status, progress.jobs)
                if on_progress is not None:
                    on_progress(state)
                if state.finished:
                    return state
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(state)
                pause = poll_interval
                if deadline is not None:
                    pause = min(pause, max(0.0, deadline - time.monotonic()))
                time.sleep(pause)


def _not_local(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("this job runs in the daemon, not in the client")


def _as_uuid(value: uuid.UUID | str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise KeyError(f"{value!r} is not a posting id") from None
