"""Time-ordered UUIDs (version 7) for the ids users see.

Owns making them: 48 bits of milliseconds, then a counter that keeps ids
made within one millisecond by this process in order, then random bits.
Ids made together land next to each other in the unique index instead of
all over it, which keeps heavy inserts cheap.

A posting's jobs get a :class:`UuidRun` (RFC 9562, section 6.2, method 2,
"monotonic random"): ids of one millisecond whose 74 bits after the time
start at a random value and go up by one per job. A run is held as its
first id and its length, whatever the number of jobs, and it sorts after
every id this process made before it and before every id it makes after.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, overload

_lock = threading.Lock()
_last_ms = 0
_counter = 0

# The 74 bits after the time: rand_a (12 bits, the counter of uuid7) and
# rand_b (62 bits), with the version and variant bits between and around.
_RANDOM_BITS = 74
_SPACE = 1 << _RANDOM_BITS
_RAND_B_BITS = 62
_RAND_B = (1 << _RAND_B_BITS) - 1
_RAND_A = 0xFFF << 64
_FIXED = 0x7 << 76 | 0b10 << 62
_LOW_48 = (1 << 48) - 1


def uuid7() -> uuid.UUID:
    """A new version 7 UUID, ordered after every earlier one of this process."""
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms, _counter = ms, int.from_bytes(os.urandom(2), "big") >> 5
        else:
            _counter += 1
            if _counter >= 1 << 12:
                _last_ms, _counter = _last_ms + 1, 0
            ms = _last_ms
        counter = _counter
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= counter << 64
    value |= 0b10 << 62
    value |= rand_b
    return uuid.UUID(int=value)


def _compose(ms: int, random: int) -> int:
    """The 128 bits of a version 7 UUID from its time and its 74 bits."""
    return (
        (ms & ((1 << 48) - 1)) << 80
        | (random >> _RAND_B_BITS) << 64
        | (random & _RAND_B)
        | _FIXED
    )


def _random_part(value: int) -> int:
    """The 74 bits after the time of a version 7 UUID, as one number."""
    return ((value & _RAND_A) >> 64) << _RAND_B_BITS | (value & _RAND_B)


def _is_uuid7(value: int) -> bool:
    return value & (0xF << 76 | 0b11 << 62) == _FIXED


def uuid7_run(count: int) -> UuidRun:
    """``count`` new version 7 UUIDs of one millisecond, consecutive.

    Their 74 bits after the time start at a random value, drawn so that
    the last of them still fits, and go up by one. Like :func:`uuid7`, the
    run sorts after every id this process made before and before every id
    it makes after; when the current millisecond has no room left above
    the last id made, the run takes the next one.
    """
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError("count must be an integer")
    if not 1 <= count <= _SPACE:
        raise ValueError(f"count must be from 1 to 2**{_RANDOM_BITS}")
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        lowest = 0
        if ms <= _last_ms:
            # Above every id already made in this millisecond.
            ms, lowest = _last_ms, (_counter + 1) << _RAND_B_BITS
        if lowest > _SPACE - count:
            ms, lowest = ms + 1, 0
        first = lowest + secrets.randbelow(_SPACE - count - lowest + 1)
        _last_ms, _counter = ms, (first + count - 1) >> _RAND_B_BITS
    return UuidRun(_compose(ms, first), count)


class UuidRun(Sequence[uuid.UUID]):
    """Consecutive version 7 UUIDs of one millisecond: the first and how many.

    An immutable sequence of :class:`uuid.UUID` that takes the same memory
    however long it is: indexing (negative too), slices, iteration, ``in``
    and ``index`` compute the ids. It equals any sequence of the same ids
    in the same order (a list of them included).
    """

    __slots__ = ("_base", "_count", "_first", "_time")

    def __init__(self, first: int, count: int) -> None:
        if not 0 <= first < 1 << 128 or not _is_uuid7(first):
            raise ValueError("first must be the 128 bits of a version 7 UUID")
        base = _random_part(first)
        if count < 0 or base + count > _SPACE:
            raise ValueError(
                f"{count} ids from {uuid.UUID(int=first)} overflow their"
                " millisecond"
            )
        self._first = first
        self._count = count
        self._time = first >> 80
        self._base = base

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> uuid.UUID: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[uuid.UUID]: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            chosen = range(self._count)[index]
            if chosen.step != 1:
                return [self[i] for i in chosen]
            if not chosen:
                return UuidRun(self._first, 0)
            start = _compose(self._time, self._base + chosen.start)
            return UuidRun(start, len(chosen))
        position = range(self._count)[index]  # IndexError when out of range
        return uuid.UUID(int=_compose(self._time, self._base + position))

    def __iter__(self) -> Iterator[uuid.UUID]:
        made = self._time
        for value in range(self._base, self._base + self._count):
            yield uuid.UUID(int=_compose(made, value))

    def _position(self, value: object) -> int | None:
        if not isinstance(value, uuid.UUID):
            return None
        number = value.int
        if number >> 80 != self._time or not _is_uuid7(number):
            return None
        position = _random_part(number) - self._base
        return position if 0 <= position < self._count else None

    def __contains__(self, value: object) -> bool:
        return self._position(value) is not None

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        position = self._position(value)
        if position is None or position not in range(self._count)[start:stop]:
            raise ValueError(f"{value!r} is not in the run")
        return position

    def count(self, value: Any) -> int:
        return 0 if self._position(value) is None else 1

    def texts(self) -> Iterator[str]:
        """Each id's canonical text, in order, without making UUIDs."""
        stamp = f"{self._time:012x}"
        head = f"{stamp[:8]}-{stamp[8:]}-7"
        value, end = self._base, self._base + self._count
        while value < end:
            # The last twelve hex digits change fastest; what comes before
            # them changes once in 2**48 ids at most.
            stop = min(end, (value | _LOW_48) + 1)
            rand_a, rand_b = value >> _RAND_B_BITS, value & _RAND_B
            prefix = f"{head}{rand_a:03x}-{0x8000 | rand_b >> 48:04x}-"
            low = value & _LOW_48
            yield from map(
                (prefix + "{:012x}").format, range(low, low + stop - value)
            )
            value = stop

    def __eq__(self, other: object) -> bool:
        if isinstance(other, UuidRun):
            if self._count == 0 or other._count == 0:
                return self._count == other._count
            return (self._first, self._count) == (other._first, other._count)
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(other) == self._count and all(
                mine == theirs for mine, theirs in zip(self, other, strict=True)
            )
        return NotImplemented

    def __hash__(self) -> int:
        # Equal to the tuple of the same ids, so hashed as that tuple.
        return hash(tuple(self))

    def __repr__(self) -> str:
        return (
            f"UuidRun({str(uuid.UUID(int=self._first))!r}, count={self._count})"
        )

    def __reduce__(self) -> tuple[type[UuidRun], tuple[int, int]]:
        return UuidRun, (self._first, self._count)
