"""Shared variables of a posting, from the client, against a real
PostgreSQL: values round-trip, updates under a row lock lose nothing."""

from __future__ import annotations

import math
import threading
import uuid
from typing import Any

import pytest

from pdoflowd.client import Client
from pdoflowd.sharedvars import MAX_NAME_BYTES, SharedVariableError


@pytest.fixture
def shared(dsn: str) -> Any:
    client = Client(dsn)
    return client.shared(client.post("jobfns.noop", [[1]]).id)


def test_an_unset_variable_reads_as_the_default(shared: Any) -> None:
    assert shared.get("missing") is None
    assert shared.get("missing", 7) == 7


def test_set_then_get_returns_the_value(shared: Any) -> None:
    value = {"a": [1, 2.5, None, True, "x"], "b": {"c": "d"}}
    shared.set("config", value)
    assert shared.get("config") == value
    shared.set("config", 3)
    assert shared.get("config") == 3


def test_a_stored_null_is_not_the_default(shared: Any) -> None:
    shared.set("nothing", None)
    assert shared.get("nothing", "default") is None


def test_non_finite_floats_round_trip(shared: Any) -> None:
    shared.set("limits", [math.inf, -math.inf, math.nan])
    low, high, nan = shared.get("limits")
    assert (low, high) == (math.inf, -math.inf)
    assert math.isnan(nan)


def test_update_applies_the_function_to_the_current_value(shared: Any) -> None:
    assert shared.update("n", lambda n: n + 1, default=10) == 11
    assert shared.update("n", lambda n: n * 2) == 22
    assert shared.get("n") == 22


def test_a_failing_update_changes_nothing(shared: Any) -> None:
    shared.set("n", 1)

    def explode(value: int) -> int:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        shared.update("n", explode)
    assert shared.get("n") == 1
    with pytest.raises(RuntimeError):
        shared.update("fresh", explode, default=5)
    assert shared.get("fresh") is None


def test_an_update_to_an_unstorable_value_changes_nothing(shared: Any) -> None:
    shared.set("n", 1)
    with pytest.raises(SharedVariableError, match="set is not a JSON value"):
        shared.update("n", lambda n: {n})
    assert shared.get("n") == 1


def test_concurrent_updates_lose_nothing(dsn: str, shared: Any) -> None:
    posting = shared.posting_id
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def bump() -> None:
        mine = Client(dsn).shared(posting)
        barrier.wait()
        try:
            for _ in range(25):
                mine.update("counter", lambda n: n + 1, default=0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert shared.get("counter") == 100


def test_delete_says_whether_the_variable_was_set(shared: Any) -> None:
    shared.set("x", 1)
    assert shared.delete("x") is True
    assert shared.delete("x") is False
    assert shared.get("x") is None


def test_all_lists_every_variable_by_name(shared: Any) -> None:
    assert shared.all() == {}
    shared.set("b", [1])
    shared.set("a", {"k": math.inf})
    assert shared.all() == {"a": {"k": math.inf}, "b": [1]}


def test_variables_belong_to_their_own_posting(dsn: str, shared: Any) -> None:
    client = Client(dsn)
    other = client.shared(client.post("jobfns.noop", [[2]]).id)
    shared.set("x", 1)
    other.set("x", 2)
    assert (shared.get("x"), other.get("x")) == (1, 2)


@pytest.mark.parametrize("verb", ["get", "set", "update", "delete", "all"])
def test_variables_of_an_unknown_posting_raise_key_error(
    dsn: str, verb: str
) -> None:
    unknown = uuid.uuid4()
    shared = Client(dsn).shared(unknown)
    calls = {
        "get": lambda: shared.get("x"),
        "set": lambda: shared.set("x", 1),
        "update": lambda: shared.update("x", lambda v: v),
        "delete": lambda: shared.delete("x"),
        "all": shared.all,
    }
    with pytest.raises(KeyError, match=f"no posting {unknown}"):
        calls[verb]()


@pytest.mark.parametrize(
    "name", ["", "a\x00b", "\ud800", "x" * (MAX_NAME_BYTES + 1), 5, None]
)
def test_names_that_cannot_be_stored_are_refused(
    shared: Any, name: Any
) -> None:
    with pytest.raises(SharedVariableError):
        shared.set(name, 1)


def test_a_name_of_the_largest_size_is_stored(shared: Any) -> None:
    name = "é" * (MAX_NAME_BYTES // 2)
    shared.set(name, "ok")
    assert shared.all() == {name: "ok"}
