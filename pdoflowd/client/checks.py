"""What a posting may be, checked before anything of it is written.

Owns the limits PostgreSQL sets on a posting (priorities and tries are
``integer`` columns), the checks of its options (a job's name, tries,
timeout, required capabilities, concurrency caps, whether results are
stored, when it may run) and of its shape (how many jobs, their priorities,
a list and a dict of arguments per job), and :class:`PostingJobs`, which
turns the checked jobs into the encoded rows of
:func:`pdoflowd.db.postings.insert_posting` one at a time, as they are
written. Every refusal is a :class:`PostingError`; the arguments themselves
are checked by :mod:`pdoflowd.arguments`. It must not connect nor know which
function a job runs.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pdoflowd.arguments import ValueNotStorable, check_text, encode_job, shown
from pdoflowd.client.errors import PostingError
from pdoflowd.db.dependencies import ON_FAILURE_RULES
from pdoflowd.db.postings import KeyScope, NewJob

__all__ = [
    "MAX_AFTER",
    "MAX_KEY_CHARS",
    "MAX_PRIORITY",
    "MAX_RUNNING",
    "MAX_TRIES",
    "MIN_PRIORITY",
    "PostingJobs",
    "check_after",
    "check_key",
    "check_key_scope",
    "check_max_running",
    "check_name",
    "check_on_failure",
    "check_posting",
    "check_requires",
    "check_store_result",
    "check_timeout",
    "check_tries",
    "check_uses",
    "when_to_run",
]

# Priorities and tries are stored as PostgreSQL integers.
MIN_PRIORITY = -(2**31)
MAX_PRIORITY = 2**31 - 1
MAX_TRIES = 2**31 - 1
MAX_RUNNING = 2**31 - 1
# A posting's key, as the schema's check allows it.
MAX_KEY_CHARS = 200

# ---------------------------------------------------------------- options


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise PostingError(
            f"a job name must be a non-empty string: {shown(name)}"
        )
    try:
        check_text(name, "name", "a job name")
    except ValueNotStorable as exc:
        raise PostingError(exc.problem) from None
    return name


def _names(value: Any, key: str, what: str, example: str) -> tuple[str, ...]:
    """A list of names (capabilities, resources), each once, in order;
    ``key`` is the option's name in messages, ``what`` one name's kind."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(
        value, Iterable
    ):
        raise PostingError(
            f"{key} must be a list of {what} names, e.g. [{example!r}]"
        )
    names: list[str] = []
    for index, name in enumerate(value):
        if not isinstance(name, str) or not name.strip():
            raise PostingError(
                f"{key}[{index}]: a {what} is a non-empty string, "
                f"got {shown(name)}"
            )
        try:
            check_text(name, f"{key}[{index}]", f"a {what}")
        except ValueNotStorable as exc:
            raise PostingError(str(exc)) from None
        if name not in names:
            names.append(name)
    return tuple(names)


def check_requires(requires: Any) -> tuple[str, ...]:
    """Capability names a posting requires, each once, in the given order."""
    return _names(requires, "requires", "capability", "gpu")


def check_uses(uses: Any) -> tuple[str, ...]:
    """Resource names a posting's jobs use, each once, in the given order
    (each bounded cluster-wide by the daemons' jobs.limits)."""
    return _names(uses, "uses", "resource", "tape")


def check_max_running(max_running: Any) -> int | None:
    """At most this many of a posting's jobs executing at once (None: no
    cap of its own)."""
    if max_running is None:
        return None
    if (
        isinstance(max_running, bool)
        or not isinstance(max_running, int)
        or not 1 <= max_running <= MAX_RUNNING
    ):
        raise PostingError(
            f"max_running must be an integer between 1 and {MAX_RUNNING},"
            f" or None: {shown(max_running)}"
        )
    return max_running


def check_key(key: Any) -> str | None:
    """A posting's idempotency key: None, or 1 to MAX_KEY_CHARS printable
    characters (no line breaks or other control characters, which a log
    line or a terminal would show wrongly)."""
    if key is None:
        return None
    if not isinstance(key, str) or not key:
        raise PostingError(f"a key must be a non-empty string: {shown(key)}")
    if len(key) > MAX_KEY_CHARS:
        raise PostingError(
            f"a key is at most {MAX_KEY_CHARS} characters, got {len(key)}"
        )
    try:
        check_text(key, "key", "a key")
    except ValueNotStorable as exc:
        raise PostingError(exc.problem) from None
    if not key.isprintable():
        raise PostingError(
            f"a key must be printable (no control characters): {shown(key)}"
        )
    return key


# How many postings one posting may wait for.
MAX_AFTER = 1000


def check_after(after: Any) -> list[uuid.UUID]:
    """The postings to wait for, by id (a posting's handle, its UUID or
    the text of it), each once, in the order given."""
    if after is None:
        return []
    if isinstance(after, (str, bytes, uuid.UUID)) or hasattr(after, "job_ids"):
        after = [after]
    try:
        items = list(after)
    except TypeError:
        raise PostingError(
            f"after must be a list of posting ids, got {shown(after)}"
        ) from None
    found: dict[uuid.UUID, None] = {}
    for item in items:
        ident = getattr(item, "id", item) if hasattr(item, "job_ids") else item
        if isinstance(ident, uuid.UUID):
            found[ident] = None
            continue
        try:
            found[uuid.UUID(ident)] = None
        except (ValueError, TypeError, AttributeError):
            raise PostingError(
                f"after: {shown(item)} is not a posting id"
            ) from None
    if len(found) > MAX_AFTER:
        raise PostingError(
            f"after: at most {MAX_AFTER} postings, got {len(found)}"
        )
    return list(found)


def check_on_failure(rule: Any) -> str:
    """What an upstream posting's failure does: ``cancel`` or ``run``."""
    if rule not in ON_FAILURE_RULES:
        choices = ", ".join(repr(r) for r in ON_FAILURE_RULES)
        raise PostingError(
            f"on_failure must be one of {choices}, got {shown(rule)}"
        )
    return str(rule)


def check_key_scope(scope: Any) -> KeyScope:
    """How long a key stays taken: ``active`` or ``forever``."""
    try:
        return KeyScope(scope)
    except ValueError:
        choices = ", ".join(repr(s.value) for s in KeyScope)
        raise PostingError(
            f"key_scope must be one of {choices}, got {shown(scope)}"
        ) from None


def check_tries(tries: Any) -> None:
    if (
        isinstance(tries, bool)
        or not isinstance(tries, int)
        or not 1 <= tries <= MAX_TRIES
    ):
        raise PostingError(
            f"tries must be an integer from 1 to {MAX_TRIES}, got "
            f"{shown(tries)}"
        )


def check_timeout(timeout_s: Any) -> None:
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


def check_store_result(store_result: Any) -> None:
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


# ---------------------------------------------------------------- shape


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
