"""Job arguments, results and shared values: checking and encoding as JSON.

Owns which Python values may be stored (JSON's: None, bool, int, float,
str, lists and tuples, dicts with string keys), the error that names where
the first value that is not one of them lies (the job index and the
argument path), and the round trip of what plain JSON cannot spell.
The client checks and encodes each job's arguments as it writes the job,
inside the posting's transaction, so a bad argument leaves nothing behind.

Ordinary values are stored as plain JSON, so JSONB queries on them keep
working. Only two things are spelt differently:

- a non-finite float becomes ``{"__pdoflowd_float__": "nan"}`` (or
  ``"inf"``, ``"-inf"``);
- a dict whose only key is one of these two markers is wrapped as
  ``{"__pdoflowd_dict__": {...}}``, so that it reads back as itself.

:func:`decode` undoes both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

FLOAT_TAG = "__pdoflowd_float__"
DICT_TAG = "__pdoflowd_dict__"
_TAGS = frozenset({FLOAT_TAG, DICT_TAG})
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class ValueNotStorable(ValueError):
    """A value that cannot be stored as JSON; names where it lies."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class ArgumentError(ValueNotStorable):
    """An argument that cannot be stored; names the job and where it is."""

    def __init__(self, job_index: int, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.job_index = job_index
        self.args = (f"job {job_index}: {path}: {problem}",)

    def __str__(self) -> str:
        return f"job {self.job_index}: {self.path}: {self.problem}"


# Python refuses to write ints of more than 4300 digits by default; only
# ints this long (about 600 digits) are worth a trial conversion.
_LONG_INT_BITS = 2000


def check_text(text: str, path: str, what: str) -> None:
    """Refuse text PostgreSQL cannot store (NUL, lone surrogates)."""
    if "\x00" in text:
        raise ValueNotStorable(
            path, f"{what} with a NUL character cannot be stored"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate: JSON could spell it, PostgreSQL refuses it.
        raise ValueNotStorable(
            path, f"{what} is not valid Unicode (a lone surrogate)"
        ) from None


def _check(value: Any, path: str, open_ids: set[int]) -> bool:
    """Raise for a value that cannot be stored; True if it needs tags."""
    if value is None or isinstance(value, bool):
        return False
    if isinstance(value, int):
        if value.bit_length() > _LONG_INT_BITS:
            try:
                int.__repr__(value)
            except ValueError as exc:  # beyond sys.get_int_max_str_digits()
                raise ValueNotStorable(path, str(exc)) from None
        return False
    if isinstance(value, str):
        check_text(value, path, "a string")
        return False
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple, dict)):
        if id(value) in open_ids:
            raise ValueNotStorable(path, "contains itself (a cycle)")
        open_ids.add(id(value))
        tagged = False
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ValueNotStorable(
                        path, f"dict key {key!r} is not a string"
                    )
                check_text(key, path, f"dict key {key!r}")
                tagged |= _check(item, f"{path}[{key!r}]", open_ids)
            tagged |= len(value) == 1 and next(iter(value)) in _TAGS
        else:
            for i, item in enumerate(value):
                tagged |= _check(item, f"{path}[{i}]", open_ids)
        open_ids.discard(id(value))
        return tagged
    raise ValueNotStorable(path, f"{type(value).__name__} is not a JSON value")


def _tagged(value: Any) -> Any:
    """A checked value with non-finite floats and marker dicts spelt out."""
    if isinstance(value, float):
        if math.isnan(value):
            return {FLOAT_TAG: "nan"}
        if math.isinf(value):
            return {FLOAT_TAG: "inf" if value > 0 else "-inf"}
        return value
    if isinstance(value, (list, tuple)):
        return [_tagged(item) for item in value]
    if isinstance(value, dict):
        plain = {key: _tagged(item) for key, item in value.items()}
        if len(plain) == 1 and next(iter(plain)) in _TAGS:
            return {DICT_TAG: plain}
        return plain
    return value


# One encoder for every value: json.dumps with options builds a new one
# per call.
_dumps = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def encode_value(value: Any, path: str = "value") -> str:
    """Check one value and return it as JSON text (tagged where needed)."""
    try:
        needs_tags = _check(value, path, set())
        return _dumps(_tagged(value) if needs_tags else value)
    except RecursionError:
        raise ValueNotStorable(path, "nested too deeply to store") from None


def decode(value: Any) -> Any:
    """The value :func:`encode_value` was given, from its decoded JSON."""
    if isinstance(value, list):
        return [decode(item) for item in value]
    if isinstance(value, dict):
        if len(value) == 1:
            key, inner = next(iter(value.items()))
            if key == FLOAT_TAG:
                if inner not in _NON_FINITE:
                    raise ValueError(f"malformed {FLOAT_TAG} value: {inner!r}")
                return _NON_FINITE[inner]
            if key == DICT_TAG:
                if not isinstance(inner, dict):
                    raise ValueError(f"malformed {DICT_TAG} value")
                return {k: decode(item) for k, item in inner.items()}
        return {key: decode(item) for key, item in value.items()}
    return value


# jsonb's text has no white space around the value: the decoder's own
# step, without the two scans for it that json.loads adds.
_json_value = json.JSONDecoder().raw_decode


def _stored(text: str) -> Any:
    """A stored value (jsonb as text) as the poster gave it."""
    if text == "[]":
        return []
    if text == "{}":
        return {}
    value, end = _json_value(text)
    if end != len(text):
        raise ValueError("a stored value has text after it")
    # jsonb text spells every key as it is: no tag name in the text, no
    # tagged value in it, and the walk through it can be skipped.
    if FLOAT_TAG in text or DICT_TAG in text:
        return decode(value)
    return value


def decode_job(
    posargs_json: str, kwargs_json: str
) -> tuple[list[Any], dict[str, Any]]:
    """A claimed job's stored arguments, JSON text as the database keeps
    it, as the poster gave them."""
    posargs, kwargs = _stored(posargs_json), _stored(kwargs_json)
    if not isinstance(posargs, list):
        raise ValueError("stored positional arguments are not an array")
    if not isinstance(kwargs, dict):
        raise ValueError("stored keyword arguments are not an object")
    return posargs, kwargs


def _plain(value: Any) -> bool:
    """Whether a value is a scalar stored as it is, told cheaply.

    False means only "not sure": the value then takes the full check, which
    refuses what must be refused and names where it lies.
    """
    kind = type(value)
    if kind is int:
        bits: int = value.bit_length()
        return bits <= _LONG_INT_BITS
    if kind is str:
        if "\x00" in value:
            return False
        if value.isascii():
            return True
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if kind is float:
        return math.isfinite(value)
    return value is None or kind is bool


def _plain_keywords(kwargs: dict[Any, Any]) -> bool:
    """Whether keyword arguments are all scalars stored as they are."""
    if not kwargs:
        return True
    if len(kwargs) == 1 and next(iter(kwargs)) in _TAGS:
        return False
    for key, value in kwargs.items():
        if type(key) is not str or not key.isidentifier() or not _plain(value):
            return False
    return True


def encode_job(
    job_index: int, posargs: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[str, str]:
    """Check one job's arguments and return them as two JSON texts."""
    kind = type(posargs)
    if (
        (kind is list or kind is tuple)
        and type(kwargs) is dict
        and all(map(_plain, posargs))
        and _plain_keywords(kwargs)
    ):
        # The common case, scalars only: nothing to tag, no paths to build.
        return (
            _dumps(posargs) if posargs else "[]",
            _dumps(kwargs) if kwargs else "{}",
        )
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
        args_tags = kwargs_tags = False
        for i, value in enumerate(posargs):
            args_tags |= _check(value, f"posargs[{i}]", open_ids)
        for key, value in kwargs.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ArgumentError(
                    job_index, "kwargs", f"{key!r} is not a keyword name"
                )
            kwargs_tags |= _check(value, f"kwargs[{key!r}]", open_ids)
        plain_kwargs = dict(kwargs)
        kwargs_tags |= len(plain_kwargs) == 1 and (
            next(iter(plain_kwargs)) in _TAGS
        )
        return (
            _dumps(_tagged(posargs) if args_tags else list(posargs)),
            _dumps(_tagged(plain_kwargs) if kwargs_tags else plain_kwargs),
        )
    except ArgumentError:
        raise
    except ValueNotStorable as exc:
        raise ArgumentError(job_index, exc.path, exc.problem) from None
    except RecursionError:
        raise ArgumentError(
            job_index, "arguments", "nested too deeply to store"
        ) from None


def shown(value: Any) -> str:
    """A value as an error message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
