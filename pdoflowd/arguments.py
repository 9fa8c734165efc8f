"""Job arguments: checking and encoding them as the JSON stored per job.

Owns which Python values a job may take (JSON's: None, bool, int, float,
str, lists and tuples, dicts with string keys), and the error that names the
job index and the argument path of the first value that is not one of them.
Encoding happens before any row is written, so a bad posting loses nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any


class ArgumentError(ValueError):
    """An argument that cannot be stored; names where it is."""

    def __init__(self, job_index: int, path: str, problem: str) -> None:
        self.job_index = job_index
        self.path = path
        self.problem = problem
        super().__init__(f"job {job_index}: {path}: {problem}")


# Python refuses to write ints of more than 4300 digits by default; only
# ints this long (about 600 digits) are worth a trial conversion.
_LONG_INT_BITS = 2000


def _check_text(text: str, path: str, job_index: int, what: str) -> None:
    if "\x00" in text:
        raise ArgumentError(
            job_index, path, f"{what} with a NUL character cannot be stored"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate: JSON could spell it, PostgreSQL refuses it.
        raise ArgumentError(
            job_index, path, f"{what} is not valid Unicode (a lone surrogate)"
        ) from None


def _check(value: Any, path: str, job_index: int, open_ids: set[int]) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if value.bit_length() > _LONG_INT_BITS:
            try:
                int.__repr__(value)
            except ValueError as exc:  # beyond sys.get_int_max_str_digits()
                raise ArgumentError(job_index, path, str(exc)) from None
        return
    if isinstance(value, str):
        _check_text(value, path, job_index, "a string")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ArgumentError(
                job_index, path, f"{value!r} is not representable in JSON"
            )
        return
    if isinstance(value, (list, tuple, dict)):
        if id(value) in open_ids:
            raise ArgumentError(job_index, path, "contains itself (a cycle)")
        open_ids.add(id(value))
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ArgumentError(
                        job_index,
                        path,
                        f"dict key {key!r} is not a string",
                    )
                _check_text(key, path, job_index, f"dict key {key!r}")
                _check(item, f"{path}[{key!r}]", job_index, open_ids)
        else:
            for i, item in enumerate(value):
                _check(item, f"{path}[{i}]", job_index, open_ids)
        open_ids.discard(id(value))
        return
    raise ArgumentError(
        job_index,
        path,
        f"{type(value).__name__} is not a JSON value",
    )


def encode_job(
    job_index: int, posargs: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[str, str]:
    """Check one job's arguments and return them as two JSON texts."""
    if isinstance(posargs, (str, bytes)) or not isinstance(
        posargs, (list, tuple)
    ):
        raise ArgumentError(
            job_index, "posargs", "positional arguments must be a list"
        )
    if not isinstance(kwargs, Mapping):
        raise ArgumentError(
            job_index, "kwargs", "keyword arguments must be a dict"
        )
    try:
        open_ids: set[int] = set()
        for i, value in enumerate(posargs):
            _check(value, f"posargs[{i}]", job_index, open_ids)
        for key, value in kwargs.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ArgumentError(
                    job_index, "kwargs", f"{key!r} is not a keyword name"
                )
            _check(value, f"kwargs[{key!r}]", job_index, open_ids)
        return (
            json.dumps(list(posargs), allow_nan=False, separators=(",", ":")),
            json.dumps(dict(kwargs), allow_nan=False, separators=(",", ":")),
        )
    except RecursionError:
        raise ArgumentError(
            job_index, "arguments", "nested too deeply to store"
        ) from None
