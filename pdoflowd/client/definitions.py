"""Declaring jobs: ``@job``, :data:`Registry` and :class:`JobDefinition`.

Owns which functions may be jobs (a module-level function a worker can
import by its dotted path, :func:`entry_point_of`), the definition ``@job``
records for each (name, entry point, tries, timeout, capabilities, whether
results are stored), the registry that finds it again by function or name,
and :func:`definition_of`, which turns what a caller posts to (a
definition, a function or an entry point string) into a definition. It must
not connect: posting is the :class:`~pdoflowd.client.client.Client`'s, which
``JobDefinition.post_work`` calls.
"""

from __future__ import annotations

import datetime as dt
import inspect
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import psycopg

from pdoflowd.arguments import shown
from pdoflowd.client.checks import (
    check_max_running,
    check_name,
    check_requires,
    check_store_result,
    check_timeout,
    check_tries,
    check_uses,
)
from pdoflowd.client.errors import PostingError
from pdoflowd.entrypoints import EntryPointRefused, mark, split_entry_point

__all__ = [
    "DEFAULT_TRIES",
    "JobDefinition",
    "Registry",
    "check_entry_point",
    "definition_of",
    "entry_point_of",
    "job",
]

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_TRIES = 3


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
    # Concurrency caps: at most max_running of a posting's jobs executing
    # at once across all hosts; the named resources its jobs use.
    max_running: int | None = None
    uses: tuple[str, ...] = ()

    def post_work(
        self,
        posargs: Sequence[Sequence[Any]],
        kwargs: Sequence[Mapping[str, Any]] | None = None,
        priority: int | Sequence[int] = 0,
        *,
        tries: int | None = None,
        run_after: dt.datetime | dt.timedelta | float | None = None,
        paused: bool = False,
        key: str | None = None,
        key_scope: str = "active",
        after: Iterable[Any] | None = None,
        on_failure: str = "cancel",
        dsn: str | None = None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> tuple[uuid.UUID, Sequence[uuid.UUID]]:
        """Post one job per argument set; return (posting id, job ids).

        With a ``key`` held by a posting of this poster, that posting's ids
        are returned and nothing is written (see :meth:`Client.post`, whose
        :class:`Posting` also says whether it existed). ``after`` and
        ``on_failure``: postings to wait for (see :meth:`Client.post`).
        """
        # Imported here: the client imports the definitions it posts.
        from pdoflowd.client.client import Client

        posting = Client(dsn).post(
            self,
            posargs,
            kwargs,
            priority,
            tries=tries,
            run_after=run_after,
            paused=paused,
            key=key,
            key_scope=key_scope,
            after=after,
            on_failure=on_failure,
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
    max_running: int | None = None,
    uses: Iterable[str] = (),
) -> Callable[[F], F]: ...
def job(
    name: Any = None,
    *,
    tries: int = DEFAULT_TRIES,
    timeout: float | None = None,
    requires: Iterable[str] = (),
    store_result: bool = False,
    max_running: int | None = None,
    uses: Iterable[str] = (),
) -> Any:
    """Make a module-level function a job (``@job()`` or ``@job(name=...)``).

    ``requires`` names capabilities a daemon must provide
    (``workers.provides``) to run it; ``store_result`` keeps its return
    value. ``max_running`` allows at most that many jobs of each posting
    of it executing at once across all hosts; ``uses`` names resources
    (each bounded cluster-wide by the daemons' ``jobs.limits``) its jobs
    use. The function is returned unchanged; ``Registry[function]`` gives
    its definition. A function in ``__main__`` or a nested one is refused.
    """
    if callable(name):
        return job()(name)
    if name is not None:
        check_name(name)
    check_tries(tries)
    check_timeout(timeout)
    needs = check_requires(requires)
    check_store_result(store_result)
    cap = check_max_running(max_running)
    resources = check_uses(uses)

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
                max_running=cap,
                uses=resources,
            )
        )
        return function

    return decorate


def definition_of(
    target: JobDefinition | Callable[..., Any] | str,
) -> JobDefinition:
    """The definition a posting to ``target`` is made from.

    A definition is taken as it is; a ``@job`` function, its name or its
    entry point gives the one registered; a plain function, or an entry
    point no definition here has, gets one of its own (its last name, the
    default tries).
    """
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


def _not_local(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("this job runs in the daemon, not in the client")
