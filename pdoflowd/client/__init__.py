"""The client: define jobs, post work to the queue, follow and steer it.

Owns ``@job`` and :data:`Registry` (the seed's way: ``Registry[f].post_work``),
:class:`Client` (post, status, wait, wait_for, pause, resume, cancel, retry,
results, shared variables) for code and tools, and finding the database
(explicit DSN, ``PDOFLOW_DSN``, libpq's environment, the seed's
``~/.config/pdoflow/db.conf``). A posting's shape (how many jobs, their
priorities, a list and a dict of arguments per job) is checked before any
row is written, each job's arguments as that job is written; it is written
in one transaction (a savepoint in the caller's when a connection is
passed), so a bad argument anywhere leaves no row of it behind. It must
not run jobs; the poster is never sent, PostgreSQL records it.
"""

from __future__ import annotations

import configparser
import contextlib
import datetime as dt
import inspect
import itertools
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

import psycopg
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

from pdoflowd.arguments import (
    ArgumentError,
    ValueNotStorable,
    check_text,
    decode,
    encode_job,
    shown,
)
from pdoflowd.db import postings, profiles
from pdoflowd.db.postings import (
    JobRow,
    NewJob,
    PostingSummary,
    PriorityCount,
    StoredResult,
)
from pdoflowd.entrypoints import EntryPointRefused, mark, split_entry_point
from pdoflowd.ids import uuid7, uuid7_run
from pdoflowd.sharedvars import SharedVariableError, SharedVariables
from pdoflowd.status import JobStatus, PostingStatus

__all__ = [
    "ArgumentError",
    "Client",
    "ConnectionConfigError",
    "ConnectionTarget",
    "ControlResult",
    "JobDefinition",
    "JobResult",
    "Posting",
    "PostingEnded",
    "PostingError",
    "PostingState",
    "PostingStateError",
    "Registry",
    "SharedVariableError",
    "SharedVariables",
    "WaitTimeout",
    "job",
    "resolve_connection",
]

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_TRIES = 3
# Priorities and tries are stored as PostgreSQL integers.
MIN_PRIORITY = -(2**31)
MAX_PRIORITY = 2**31 - 1
MAX_TRIES = 2**31 - 1
# Any of these in the environment means libpq has been told where to go.
LIBPQ_TARGET_VARIABLES = (
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGSERVICE",
)
SEED_CONFIG = Path(".config", "pdoflow", "db.conf")
_SEED_KEYS = {
    "user": "user",
    "password": "password",
    "host": "host",
    "port": "port",
    "database": "dbname",
}


class PostingError(ValueError):
    """A posting that cannot be accepted; nothing was written."""


class PostingStateError(ValueError):
    """A posting whose status does not allow what was asked of it."""


class ConnectionConfigError(ValueError):
    """The connection settings cannot be used (never shows a password)."""


class WaitTimeout(TimeoutError):
    """A posting did not get there within the time given; has its state."""

    def __init__(self, state: PostingState) -> None:
        super().__init__(f"posting {state.id} is still {state.status.value}")
        self.state = state


class PostingEnded(RuntimeError):
    """A posting ended before the threshold waited for could be reached."""

    def __init__(self, state: PostingState) -> None:
        super().__init__(
            f"posting {state.id} is {state.status.value}; the threshold "
            "can no longer be reached"
        )
        self.state = state


@dataclass(frozen=True)
class Posting:
    """A posting just made: its id and the ids of its jobs, in order.

    The job ids are consecutive version 7 UUIDs of one millisecond, held
    as the first and how many (:class:`pdoflowd.ids.UuidRun`).
    """

    id: uuid.UUID
    job_ids: Sequence[uuid.UUID]


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
    def ended(self) -> int:
        """Jobs done or errored out."""
        return self.jobs.get(JobStatus.DONE, 0) + self.jobs.get(
            JobStatus.ERRORED_OUT, 0
        )

    @property
    def fraction_ended(self) -> float:
        """The share of jobs that ended, from 0.0 to 1.0."""
        return self.ended / self.total if self.total else 0.0

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


@dataclass(frozen=True)
class ControlResult:
    """A posting after pause, resume, cancel, retry or a status change:
    its status, and how many jobs were ended (cancel) or requeued (retry).
    """

    id: uuid.UUID
    status: PostingStatus
    jobs_changed: int


@dataclass(frozen=True)
class JobResult:
    """A job's end and its return value (``stored`` False: none was kept,
    because the job is not done or its posting does not store results)."""

    job_id: uuid.UUID
    status: JobStatus
    stored: bool
    value: Any
    error: str | None


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
    if inspect.ismethod(function):
        # A worker runs a module-level function, never a class's attribute.
        raise PostingError(
            f"{module}.{qualname} is a method; a worker runs only "
            "module-level functions, so make one the job"
        )
    if not inspect.isfunction(function) or "." in qualname:
        raise PostingError(
            f"{module}.{qualname} is not a module-level function; a worker "
            "runs only those, so make one the job"
        )
    return check_entry_point(f"{module}.{qualname}")


def check_entry_point(entry_point: str) -> str:
    """Accept "package.module.function" or "package.module:function" as it
    is, or refuse it (the daemon resolves it by the same rule)."""
    try:
        split_entry_point(entry_point)
    except EntryPointRefused:
        raise PostingError(
            f"{shown(entry_point)} is not a dotted path "
            "(package.module.function or package.module:function)"
        ) from None
    return entry_point


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise PostingError(
            f"a job name must be a non-empty string: {shown(name)}"
        )
    try:
        check_text(name, "name", "a job name")
    except ValueNotStorable as exc:
        raise PostingError(exc.problem) from None
    return name


def check_requires(requires: Any) -> tuple[str, ...]:
    """Capability names a posting requires, each once, in the given order."""
    if requires is None:
        return ()
    if isinstance(requires, (str, bytes, Mapping)) or not isinstance(
        requires, Iterable
    ):
        raise PostingError(
            "requires must be a list of capability names, e.g. ['gpu']"
        )
    names: list[str] = []
    for index, name in enumerate(requires):
        if not isinstance(name, str) or not name.strip():
            raise PostingError(
                f"requires[{index}]: a capability is a non-empty string, "
                f"got {shown(name)}"
            )
        try:
            check_text(name, f"requires[{index}]", "a capability")
        except ValueNotStorable as exc:
            raise PostingError(str(exc)) from None
        if name not in names:
            names.append(name)
    return tuple(names)


@dataclass(frozen=True)
class JobDefinition:
    """A function made into a job: its name, entry point and defaults."""

    function: Callable[..., Any]
    name: str
    entry_point: str
    tries: int = DEFAULT_TRIES
    timeout_s: float | None = None
    requires: tuple[str, ...] = ()
    store_result: bool = False

    def post_work(
        self,
        posargs: Sequence[Sequence[Any]],
        kwargs: Sequence[Mapping[str, Any]] | None = None,
        priority: int | Sequence[int] = 0,
        *,
        tries: int | None = None,
        run_after: dt.datetime | dt.timedelta | float | None = None,
        paused: bool = False,
        dsn: str | None = None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> tuple[uuid.UUID, Sequence[uuid.UUID]]:
        """Post one job per argument set; return (posting id, job ids)."""
        posting = Client(dsn).post(
            self,
            posargs,
            kwargs,
            priority,
            tries=tries,
            run_after=run_after,
            paused=paused,
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
        except (KeyError, TypeError):
            raise KeyError(
                f"{shown(key)} is not a job; decorate it with @job()"
            ) from None

    def __contains__(self, key: object) -> bool:
        try:
            return key in self._by_key
        except TypeError:
            return False

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
            f"tries must be an integer from 1 to {MAX_TRIES}, got "
            f"{shown(tries)}"
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
            "timeout must be a positive number of seconds, got "
            f"{shown(timeout_s)}"
        )


def _check_store_result(store_result: Any) -> None:
    if not isinstance(store_result, bool):
        raise PostingError(
            f"store_result must be True or False, got {shown(store_result)}"
        )


def when_to_run(
    run_after: Any,
) -> tuple[dt.datetime | None, float | None]:
    """``run_after`` as (a point in time, or a delay in seconds)."""
    if run_after is None:
        return None, None
    if isinstance(run_after, dt.datetime):
        if run_after.tzinfo is None or run_after.utcoffset() is None:
            raise PostingError(
                "run_after must be a timezone-aware datetime (e.g. "
                "datetime.now(timezone.utc) + timedelta(hours=1)), or a "
                "delay in seconds"
            )
        return run_after, None
    if isinstance(run_after, dt.timedelta):
        run_after = run_after.total_seconds()
    if (
        isinstance(run_after, bool)
        or not isinstance(run_after, (int, float))
        or not 0 <= run_after < math.inf
    ):
        raise PostingError(
            "run_after must be a datetime or a delay of at least 0 seconds, "
            f"got {shown(run_after)}"
        )
    return None, float(run_after)


@overload
def job(name: F) -> F: ...
@overload
def job(
    name: str | None = None,
    *,
    tries: int = DEFAULT_TRIES,
    timeout: float | None = None,
    requires: Iterable[str] = (),
    store_result: bool = False,
) -> Callable[[F], F]: ...
def job(
    name: Any = None,
    *,
    tries: int = DEFAULT_TRIES,
    timeout: float | None = None,
    requires: Iterable[str] = (),
    store_result: bool = False,
) -> Any:
    """Make a module-level function a job (``@job()`` or ``@job(name=...)``).

    ``requires`` names capabilities a daemon must provide
    (``workers.provides``) to run it; ``store_result`` keeps its return
    value. The function is returned unchanged; ``Registry[function]`` gives
    its definition. A function in ``__main__`` or a nested one is refused.
    """
    if callable(name):
        return job()(name)
    if name is not None:
        _check_name(name)
    _check_tries(tries)
    _check_timeout(timeout)
    needs = check_requires(requires)
    _check_store_result(store_result)

    def decorate(function: F) -> F:
        entry_point = entry_point_of(function)
        mark(function)
        Registry.add(
            JobDefinition(
                function=function,
                name=name or function.__name__,
                entry_point=entry_point,
                tries=tries,
                timeout_s=timeout,
                requires=needs,
                store_result=store_result,
            )
        )
        return function

    return decorate


def _per_job_list(value: Any, name: str, each: str) -> Sequence[Any]:
    # A lone dict, string or scalar here is a common slip (the arguments of
    # one job given where a list of them, one per job, is expected).
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(
        value, Iterable
    ):
        raise PostingError(
            f"{name} must be a list with one {each} per job, got "
            f"{type(value).__name__}"
        )
    return value if isinstance(value, (list, tuple)) else list(value)


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


def _priorities(
    priority: int | Sequence[int], count: int
) -> int | Sequence[int]:
    """One priority for all jobs, or a checked list with one per job."""
    if isinstance(priority, (str, bytes, Mapping)) or not isinstance(
        priority, (int, Iterable)
    ):
        raise PostingError(
            "priority must be an integer or a list of integers, one per job"
        )
    if isinstance(priority, int):
        _check_priority(priority, "")
        return priority
    values = priority if isinstance(priority, (list, tuple)) else list(priority)
    if len(values) != count:
        raise PostingError(f"{len(values)} priorities given for {count} jobs")
    for index, value in enumerate(values):
        _check_priority(value, f"job {index}: ")
    return values


@dataclass(frozen=True)
class PostingJobs:
    """A posting's jobs, their shape checked; arguments not yet encoded.

    ``posargs`` or ``kwargs`` may be empty (every job then gets none), and
    ``priority`` is one for all jobs or one per job.
    """

    posargs: Sequence[Sequence[Any]]
    kwargs: Sequence[Mapping[str, Any]]
    priority: int | Sequence[int]
    count: int

    def encoded(self, ids: Iterable[str]) -> Iterator[NewJob]:
        """Each job with its id, its arguments checked and encoded as it
        is reached; raises :class:`ArgumentError` at the first bad one."""
        priorities = (
            itertools.repeat(self.priority, self.count)
            if isinstance(self.priority, int)
            else self.priority
        )
        none: Mapping[str, Any] = {}
        every_posargs = self.posargs or itertools.repeat((), self.count)
        every_kwargs = self.kwargs or itertools.repeat(none, self.count)
        for index, (job_id, priority, args, kw) in enumerate(
            zip(ids, priorities, every_posargs, every_kwargs, strict=True)
        ):
            args_json, kwargs_json = encode_job(index, args, kw)
            yield job_id, priority, args_json, kwargs_json


def _shapes_fit(jobs: PostingJobs) -> bool:
    """Whether every job's arguments are a list (or tuple) and a dict."""
    return all(
        map(isinstance, jobs.posargs, itertools.repeat((list, tuple)))
    ) and (
        all(map(isinstance, jobs.kwargs, itertools.repeat(dict)))
        or all(map(isinstance, jobs.kwargs, itertools.repeat(Mapping)))
    )


def check_posting(
    posargs: Sequence[Sequence[Any]],
    kwargs: Sequence[Mapping[str, Any]] | None,
    priority: int | Sequence[int],
) -> PostingJobs:
    """Check a posting's shape: job count, priorities, each job's argument
    list and dict. The arguments themselves are checked as they are
    encoded (:meth:`PostingJobs.encoded`), while the posting is written."""
    posargs = _per_job_list(posargs, "posargs", "list of arguments")
    kwargs = _per_job_list(
        [] if kwargs is None else kwargs, "kwargs", "dict of keyword arguments"
    )
    count = _job_count(posargs, kwargs)
    if count == 0:
        raise PostingError("a posting needs at least one job")
    jobs = PostingJobs(posargs, kwargs, _priorities(priority, count), count)
    if not _shapes_fit(jobs):
        # Encoding the jobs in order raises the error a posting checked
        # whole raises: an earlier job's bad value before a later job's
        # shape.
        for _ in jobs.encoded(itertools.repeat("", count)):
            pass
    return jobs


# ---------------------------------------------------------------- database


@dataclass(frozen=True)
class ConnectionTarget:
    """Where the client connects: a libpq string (or "" for libpq's own
    defaults and environment), a password kept out of it, and whence."""

    dsn: str
    password: str | None = field(default=None, repr=False)
    source: str = "libpq defaults"


def _home(environ: Mapping[str, str]) -> Path | None:
    if environ.get("HOME"):
        return Path(environ["HOME"])
    try:
        return Path.home()
    except RuntimeError:
        return None


def read_seed_config(path: Path) -> ConnectionTarget:
    """The seed's ``db.conf``: INI, section ``[postgresql]`` with ``user``,
    ``password``, ``host``, ``port`` and ``database``, all optional.

    Errors name the file and the key, never a value.
    """
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not valid UTF-8"
        raise ConnectionConfigError(f"cannot read {path}: {reason}") from None
    except configparser.Error:
        raise ConnectionConfigError(
            f"{path} is not an INI file with a [postgresql] section"
        ) from None
    if not parser.has_section("postgresql"):
        raise ConnectionConfigError(f"{path} has no [postgresql] section")
    section = parser["postgresql"]
    unknown = sorted(set(section) - set(_SEED_KEYS))
    if unknown:
        raise ConnectionConfigError(
            f"{path}: unknown key {unknown[0]!r} in [postgresql] (expected "
            "user, password, host, port, database)"
        )
    params = {
        _SEED_KEYS[key]: value
        for key, value in section.items()
        if key != "password" and value
    }
    port = params.get("port")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConnectionConfigError(f"{path}: port must be from 1 to 65535")
    return ConnectionTarget(
        make_conninfo("", **params),
        section.get("password") or None,
        str(path),
    )


def resolve_connection(
    dsn: str | None, environ: Mapping[str, str]
) -> ConnectionTarget:
    """Where to connect, in order: an explicit DSN, ``$PDOFLOW_DSN``,
    libpq's environment (any of :data:`LIBPQ_TARGET_VARIABLES`), the seed's
    ``~/.config/pdoflow/db.conf``, and last libpq's defaults."""
    if dsn:
        return ConnectionTarget(dsn, None, "--dsn")
    if environ.get("PDOFLOW_DSN"):
        return ConnectionTarget(environ["PDOFLOW_DSN"], None, "PDOFLOW_DSN")
    present = [name for name in LIBPQ_TARGET_VARIABLES if environ.get(name)]
    if present:
        return ConnectionTarget("", None, f"${present[0]}")
    home = _home(environ)
    if home is not None and (home / SEED_CONFIG).is_file():
        return read_seed_config(home / SEED_CONFIG)
    return ConnectionTarget("", None, "libpq defaults")


def _check_conninfo(dsn: str) -> None:
    try:
        conninfo_to_dict(dsn)
    except psycopg.Error:
        # libpq's message may quote the string, password and all.
        raise ConnectionConfigError(
            "not a valid libpq connection string or URI (details withheld: "
            "it may hold a password)"
        ) from None


def as_uuid(value: uuid.UUID | str, what: str = "posting") -> uuid.UUID:
    """A posting (or job) id from a UUID or its text; KeyError if not one."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise KeyError(f"{shown(value)} is not a {what} id") from None


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
        _check_conninfo(self.target.dsn)
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
        conn: psycopg.Connection[Any] | None = None,
    ) -> Posting:
        """Post one job per argument set to ``target``.

        ``target`` is a ``@job`` function, its definition, or an entry point
        string. ``run_after`` (a timezone-aware datetime, or a delay in
        seconds counted by the database's clock) holds the jobs back until
        then. ``requires`` and ``store_result`` override the definition's.
        With ``conn`` the posting joins the caller's transaction and
        commits or rolls back with it (a connection in autocommit mode gets
        a transaction of its own).
        """
        definition = self._definition(target)
        _check_name(definition.name)
        tries = definition.tries if tries is None else tries
        _check_tries(tries)
        if timeout_s is None:
            timeout_s = definition.timeout_s
        _check_timeout(timeout_s)
        needs = (
            definition.requires
            if requires is None
            else check_requires(requires)
        )
        if store_result is None:
            store_result = definition.store_result
        _check_store_result(store_result)
        at, delay_s = when_to_run(run_after)
        try:
            jobs = check_posting(posargs, kwargs, priority)
        except ArgumentError as exc:
            raise PostingError(str(exc)) from exc
        posting_id = uuid7()
        job_ids = uuid7_run(jobs.count)

        def write(connection: psycopg.Connection[Any]) -> None:
            postings.insert_posting(
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
            )

        try:
            if conn is None:
                with self.connect() as own, own.transaction():
                    write(own)
            else:
                _write_undoably(conn, write)
        except ArgumentError as exc:
            raise PostingError(str(exc)) from exc
        return Posting(posting_id, job_ids)

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
        return PostingState(ident, progress.status, progress.jobs)

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

    # ------------------------------------------------------------ steering

    def _control(
        self,
        posting_id: uuid.UUID | str,
        action: str,
        tries: int | None = None,
    ) -> ControlResult:
        ident = as_uuid(posting_id)
        try:
            with self.connect() as conn:
                status, changed = postings.control_posting(
                    conn, ident, action, tries=tries
                )
        except errors.NoDataFound:
            raise KeyError(f"no posting {ident}") from None
        except errors.ObjectNotInPrerequisiteState as exc:
            raise PostingStateError(exc.diag.message_primary) from None
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
            _check_tries(tries)
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

    def result(self, job_id: uuid.UUID | str) -> JobResult:
        """One job's end and return value; KeyError if there is no job."""
        ident = as_uuid(job_id, "job")
        with self.connect() as conn:
            row = postings.job_result(conn, ident)
        if row is None:
            raise KeyError(f"no job {ident}")
        return _job_result(row)

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


def _posting_status(status: PostingStatus | str) -> PostingStatus:
    try:
        return PostingStatus(status)
    except ValueError:
        raise PostingStateError(
            f"{shown(status)} is not a posting status (one of "
            + ", ".join(s.value for s in PostingStatus)
            + ")"
        ) from None


def _not_local(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("this job runs in the daemon, not in the client")
