"""Job arguments: which values a job may take and how they are encoded."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdoflowd.arguments import (
    DICT_TAG,
    FLOAT_TAG,
    ArgumentError,
    ValueNotStorable,
    decode,
    decode_job,
    encode_job,
    encode_value,
)

storable_text = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs",), blacklist_characters="\x00"
    )
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | storable_text
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(storable_text, children, max_size=5)
    ),
    max_leaves=25,
)
keyword_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)


@given(
    posargs=st.lists(json_values, max_size=5),
    kwargs=st.dictionaries(keyword_names, json_values, max_size=5),
)
def test_json_values_round_trip_through_encode_job(
    posargs: list[Any], kwargs: dict[str, Any]
) -> None:
    args_json, kwargs_json = encode_job(0, posargs, kwargs)
    assert json.loads(args_json) == posargs
    assert json.loads(kwargs_json) == kwargs


@given(st.lists(json_values, max_size=5))
def test_tuples_are_encoded_as_lists(values: list[Any]) -> None:
    # Compared decoded: a dict whose only key is a marker is stored wrapped.
    args_json, _ = encode_job(0, (tuple(values), *values), {})
    assert decode(json.loads(args_json)) == [values, *values]
    assert isinstance(json.loads(args_json)[0], list)


def test_encoded_arguments_are_compact() -> None:
    assert encode_job(0, [1, [2, 3]], {"a": {"b": None}}) == (
        "[1,[2,3]]",
        '{"a":{"b":null}}',
    )


def _problem(
    posargs: Any, kwargs: Any = None, job_index: int = 4
) -> ArgumentError:
    with pytest.raises(ArgumentError) as caught:
        encode_job(job_index, posargs, {} if kwargs is None else kwargs)
    return caught.value


@pytest.mark.parametrize("key", [1, 2.5, None, True, (1, 2)])
def test_non_string_dict_keys_are_rejected(key: Any) -> None:
    error = _problem([[{key: 1}]])
    assert error.path == "posargs[0][0]"
    assert "dict key" in error.problem


def test_nul_characters_in_strings_are_rejected() -> None:
    error = _problem([], {"name": ["ok", "a\x00b"]})
    assert error.path == "kwargs['name'][1]"
    assert "NUL" in error.problem


def test_nul_characters_in_dict_keys_are_rejected() -> None:
    error = _problem([{"a\x00": 1}])
    assert error.path == "posargs[0]"
    assert "NUL" in error.problem


def test_lone_surrogates_are_rejected() -> None:
    error = _problem(["\ud800"])
    assert error.path == "posargs[0]"
    assert "surrogate" in error.problem


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        ({1, 2}, "set"),
        (frozenset(), "frozenset"),
        (b"bytes", "bytes"),
        (bytearray(b"x"), "bytearray"),
        (object(), "object"),
        (1j, "complex"),
    ],
)
def test_non_json_values_are_rejected_with_their_type(
    value: Any, type_name: str
) -> None:
    error = _problem([[None, value]])
    assert error.path == "posargs[0][1]"
    assert error.problem == f"{type_name} is not a JSON value"


def test_bad_keyword_argument_values_name_the_keyword() -> None:
    error = _problem([], {"when": object()})
    assert error.path == "kwargs['when']"


@pytest.mark.parametrize("key", ["not-a-name", "1st", "", 3])
def test_keyword_names_must_be_identifiers(key: Any) -> None:
    error = _problem([], {key: 1})
    assert error.path == "kwargs"
    assert "keyword name" in error.problem


@pytest.mark.parametrize("posargs", ["abc", b"abc", {"a": 1}, 5, None, {1}])
def test_posargs_that_are_not_a_list_are_rejected(posargs: Any) -> None:
    error = _problem(posargs)
    assert (error.job_index, error.path) == (4, "posargs")
    assert "must be a list" in error.problem


@pytest.mark.parametrize("kwargs", [[("a", 1)], "a=1", 5])
def test_kwargs_that_are_not_a_dict_are_rejected(kwargs: Any) -> None:
    error = _problem([], kwargs)
    assert (error.job_index, error.path) == (4, "kwargs")


def test_a_value_that_contains_itself_is_rejected() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    error = _problem([loop])
    assert error.path == "posargs[0][1]"
    assert "cycle" in error.problem


def test_a_value_shared_twice_is_not_a_cycle() -> None:
    shared = [1, 2]
    args_json, _ = encode_job(0, [shared, {"a": shared}], {})
    assert json.loads(args_json) == [[1, 2], {"a": [1, 2]}]


def test_nesting_too_deep_to_encode_is_rejected() -> None:
    deep: list[Any] = []
    inner = deep
    for _ in range(5000):
        inner.append([])
        inner = inner[0]
    error = _problem([deep])
    assert "nested too deeply" in error.problem


def test_an_int_too_long_to_write_is_rejected_with_its_path() -> None:
    error = _problem([[1, 10**5000]])
    assert error.path == "posargs[0][1]"


# ---------------------------------------------------------------- non-finite

tag_keys = st.sampled_from([FLOAT_TAG, DICT_TAG, "x"])
any_floats = st.floats(allow_nan=True, allow_infinity=True)
tagged_values = st.recursive(
    json_scalars | any_floats,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(storable_text | tag_keys, children, max_size=3)
        | st.dictionaries(tag_keys, children | st.sampled_from(["nan"]))
    ),
    max_leaves=20,
)


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and types compared too."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@given(
    posargs=st.lists(tagged_values, max_size=4),
    kwargs=st.dictionaries(keyword_names | tag_keys, tagged_values, max_size=3),
)
def test_non_finite_floats_and_tag_lookalikes_round_trip_exactly(
    posargs: list[Any], kwargs: dict[str, Any]
) -> None:
    args_json, kwargs_json = encode_job(0, posargs, kwargs)
    back_args, back_kwargs = decode_job(args_json, kwargs_json)
    assert same(back_args, posargs)
    assert same(back_kwargs, kwargs)


@given(json_values)
def test_ordinary_values_are_stored_as_plain_json(value: Any) -> None:
    assert json.loads(encode_value(value)) == value


@pytest.mark.parametrize(
    ("value", "spelt"),
    [
        (math.nan, {FLOAT_TAG: "nan"}),
        (math.inf, {FLOAT_TAG: "inf"}),
        (-math.inf, {FLOAT_TAG: "-inf"}),
    ],
)
def test_a_non_finite_float_is_stored_as_a_tagged_object(
    value: float, spelt: dict[str, str]
) -> None:
    assert json.loads(encode_value([1.5, {"x": value}])) == [1.5, {"x": spelt}]


def test_a_dict_that_looks_like_the_tag_is_escaped() -> None:
    lookalike = {FLOAT_TAG: "nan"}
    assert json.loads(encode_value(lookalike)) == {DICT_TAG: lookalike}
    assert decode(json.loads(encode_value(lookalike))) == lookalike


def test_a_dict_with_the_tag_among_other_keys_is_left_alone() -> None:
    value = {FLOAT_TAG: "nan", "other": 1}
    assert encode_value(value) == json.dumps(value, separators=(",", ":"))


@pytest.mark.parametrize(
    "stored", [{FLOAT_TAG: "NaN"}, {FLOAT_TAG: 1}, {DICT_TAG: [1]}]
)
def test_a_malformed_tag_is_refused_when_decoding(stored: Any) -> None:
    with pytest.raises(ValueError, match="malformed"):
        decode([stored])


def test_values_other_than_arguments_name_their_own_path() -> None:
    with pytest.raises(ValueNotStorable) as caught:
        encode_value({"a": [object()]}, "result")
    assert caught.value.path == "result['a'][0]"
    assert not isinstance(caught.value, ArgumentError)


# ---------------------------------------------------------------- fast path


class FullList(list[Any]):
    """A list that encode_job's shortcut for plain scalars does not take."""


class FullDict(dict[str, Any]):
    """A dict that encode_job's shortcut for plain scalars does not take."""


any_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**1990, max_value=2**2010)
    | st.integers(min_value=10**4290, max_value=10**4310)
    | any_floats
    | st.text(max_size=8)
    | st.sampled_from(["\x00", "a\ud800", "é", "\\n", FLOAT_TAG])
)


def _outcome(posargs: Any, kwargs: Any) -> Any:
    try:
        return encode_job(3, posargs, kwargs)
    except ArgumentError as exc:
        return exc.job_index, exc.path, exc.problem


@given(
    posargs=st.lists(any_scalars, max_size=4),
    kwargs=st.dictionaries(
        keyword_names | tag_keys | st.sampled_from(["1st", "a-b"]),
        any_scalars,
        max_size=3,
    ),
)
def test_the_shortcut_for_plain_scalars_agrees_with_the_full_check(
    posargs: list[Any], kwargs: dict[str, Any]
) -> None:
    expected = _outcome(FullList(posargs), FullDict(kwargs))
    assert _outcome(posargs, kwargs) == expected
    assert _outcome(tuple(posargs), kwargs) == expected
