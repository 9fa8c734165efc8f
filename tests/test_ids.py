"""Time-ordered ids: single UUIDv7s and the runs a posting's jobs get."""

from __future__ import annotations

import pickle
import time
import uuid

import pytest

from pdoflowd import ids
from pdoflowd.ids import UuidRun, uuid7, uuid7_run


def random_bits(value: uuid.UUID) -> int:
    """The 74 bits after the time (rand_a, then rand_b), as one number."""
    number = value.int
    return ((number >> 64) & 0xFFF) << 62 | (number & (2**62 - 1))


def run_at(ms: int, first_random: int, count: int) -> UuidRun:
    return UuidRun(ids._compose(ms, first_random), count)


def test_a_run_is_consecutive_uuid7s_of_one_millisecond() -> None:
    run = uuid7_run(1000)
    made = list(run)
    assert len(made) == len(run) == 1000
    assert {(u.version, u.variant) for u in made} == {(7, uuid.RFC_4122)}
    assert len({u.int >> 80 for u in made}) == 1
    first = random_bits(made[0])
    assert [random_bits(u) for u in made] == list(range(first, first + 1000))
    assert made == sorted(made)


def test_runs_and_single_ids_of_a_process_keep_their_order() -> None:
    made: list[uuid.UUID] = []
    for count in (1, 5, 3000, 1, 2**20):
        made.append(uuid7())
        run = uuid7_run(count)
        made += dict.fromkeys([run[0], run[-1]])
    made.append(uuid7())
    assert made == sorted(made)
    assert len(set(made)) == len(made)


def test_a_run_goes_above_the_ids_already_made_in_its_millisecond(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ahead = time.time_ns() // 1_000_000 + 60_000
    monkeypatch.setattr(ids, "_last_ms", ahead)
    monkeypatch.setattr(ids, "_counter", 10)
    run = uuid7_run(2**62)
    assert run[0].int >> 80 == ahead
    assert random_bits(run[0]) >= 11 * 2**62
    assert uuid7() > run[-1]


def test_a_run_that_would_not_fit_takes_the_next_millisecond(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ahead = time.time_ns() // 1_000_000 + 60_000
    monkeypatch.setattr(ids, "_last_ms", ahead)
    monkeypatch.setattr(ids, "_counter", 4000)
    run = uuid7_run(2**74 - 2**70)
    assert run[0].int >> 80 == ahead + 1
    assert random_bits(run[0]) <= 2**70
    assert uuid7() > run[-1]


@pytest.mark.parametrize("count", [0, -1, 2**74 + 1])
def test_a_run_needs_a_count_that_fits(count: int) -> None:
    with pytest.raises(ValueError, match="count"):
        uuid7_run(count)


def test_a_run_is_a_sequence_with_indexes_and_slices() -> None:
    run = uuid7_run(10)
    made = list(run)
    assert run[0] == made[0] and run[-1] == made[9] and run[-10] == made[0]
    for index in (10, -11):
        with pytest.raises(IndexError):
            run[index]
    assert run[2:5] == made[2:5] and isinstance(run[2:5], UuidRun)
    assert run[-3:] == made[-3:]
    assert run[::3] == made[::3]
    assert run[::-1] == made[::-1]
    assert run[5:2] == [] and len(run[5:2]) == 0
    assert list(reversed(run)) == made[::-1]
    assert made[4] in run and uuid7() not in run and "x" not in run
    assert run.index(made[4]) == 4 and run.count(made[4]) == 1
    with pytest.raises(ValueError):
        run.index(made[4], 5)
    assert run.count(uuid.uuid4()) == 0


def test_a_run_equals_any_sequence_of_the_same_ids() -> None:
    run = uuid7_run(5)
    made = list(run)
    assert run == made and made == run and run == tuple(made)
    assert run == UuidRun(made[0].int, 5)
    assert run != made[:4] and run != [*made[:4], uuid.uuid4()]
    assert run != "abcde" and run != 5
    assert hash(run) == hash(tuple(made))


def test_a_run_is_short_to_show_and_pickles() -> None:
    run = uuid7_run(100_000)
    assert repr(run) == f"UuidRun('{run[0]}', count=100000)"
    assert pickle.loads(pickle.dumps(run)) == run


def test_texts_are_the_canonical_texts_even_across_digit_carries() -> None:
    # 2**48 and 2**62 are where the hex digits before the last twelve,
    # and rand_a, change.
    for first in (2**48 - 3, 2**62 - 2, 2**74 - 4, 0):
        run = run_at(0x0123456789AB, first, 4)
        assert list(run.texts()) == [str(u) for u in run]
        assert [random_bits(u) for u in run] == list(range(first, first + 4))


@pytest.mark.parametrize(
    ("first", "count"),
    [
        (uuid.uuid4().int, 1),
        (ids._compose(1, 2**74 - 2), 3),
        (ids._compose(1, 0), -1),
    ],
)
def test_a_run_must_be_of_uuid7s_within_one_millisecond(
    first: int, count: int
) -> None:
    with pytest.raises(ValueError):
        UuidRun(first, count)
