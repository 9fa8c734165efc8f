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


def _check(value: Any, path: str, job_index: int) -> None:
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, str):
        if "\x00" in value:
            raise ArgumentError(
                job_index, path, "a NUL character cannot be stored"
            )
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ArgumentError(
                job_index, path, f"{value!r} is not representable in JSON"
            )
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]", job_index)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or "\x00" in key:
                raise ArgumentError(
                    job_index,
                    path,
                    f"dict key {key!r} is not a storable string",
                )
            _check(item, f"{path}[{key!r}]", job_index)
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
    for i, value in enumerate(posargs):
        _check(value, f"posargs[{i}]", job_index)
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ArgumentError(
                job_index, "kwargs", f"{key!r} is not a keyword name"
            )
        _check(value, f"kwargs[{key!r}]", job_index)
    return (
        json.dumps(list(posargs), allow_nan=False, separators=(",", ":")),
        json.dumps(dict(kwargs), allow_nan=False, separators=(",", ":")),
    )
