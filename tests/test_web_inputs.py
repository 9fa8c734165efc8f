"""The web console's pure parts: input checks, ETA and chart arithmetic,
password hashes, basic credentials, CSRF tokens and the users file."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdoflowd.status import JobStatus, PostingStatus
from pdoflowd.web import auth
from pdoflowd.web.inputs import (
    BadInput,
    age_text,
    bars,
    eta_s,
    max_age_s,
    one_of,
    page_number,
    posting_actions,
    text_filter,
    uuid_of,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
    ],
)
def test_ages_read_with_their_unit(text: str, seconds: float) -> None:
    assert max_age_s(text) == seconds


@pytest.mark.parametrize("text", ["0", "1w", "-5m", "1.5h", "h", "99999999"])
def test_other_ages_are_refused(text: str) -> None:
    with pytest.raises(BadInput):
        max_age_s(text)


def test_empty_filters_are_no_filter() -> None:
    assert max_age_s("") is None
    assert one_of("", PostingStatus, "status") is None
    assert page_number(None) == 1
    assert text_filter("  ", "poster") == ""


@pytest.mark.parametrize("text", ["0", "-1", "1e3", "100001", "two"])
def test_page_numbers_are_whole_and_bounded(text: str) -> None:
    with pytest.raises(BadInput, match="page must be"):
        page_number(text)


def test_a_status_of_the_other_kind_is_refused() -> None:
    assert one_of("paused", PostingStatus, "status") is PostingStatus.PAUSED
    with pytest.raises(BadInput, match="status must be one of"):
        one_of("paused", JobStatus, "status")


def test_ids_must_be_uuids() -> None:
    with pytest.raises(BadInput, match="is not a UUID"):
        uuid_of("../etc/passwd", "posting")


@given(
    ended=st.integers(1, 10**6),
    left=st.integers(1, 10**6),
    elapsed=st.floats(0.001, 1e6),
)
def test_eta_is_the_rest_at_the_rate_so_far(
    ended: int, left: int, elapsed: float
) -> None:
    eta = eta_s(ended, ended + left, elapsed)
    assert eta is not None
    assert eta == pytest.approx(left / (ended / elapsed))


def test_no_eta_without_a_rate_or_without_work_left() -> None:
    assert eta_s(0, 10, 30.0) is None
    assert eta_s(10, 10, 30.0) is None


def test_ages_read_as_a_person_would() -> None:
    assert age_text(4.4) == "4 s"
    assert age_text(200) == "3 min 20 s"
    assert age_text(7500) == "2 h 5 min"
    assert age_text(3 * 86400 + 4 * 3600) == "3 d 4 h"


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=120))
def test_bars_fill_the_chart_and_the_highest_reaches_the_top(
    values: list[int],
) -> None:
    drawn = bars(
        [(str(i), v) for i, v in enumerate(values)], width=600, height=100
    )
    assert len(drawn) == len(values)
    assert all(0 <= b.height <= 100 and 0 <= b.x < 600 for b in drawn)
    if max(values):
        assert max(b.height for b in drawn) == pytest.approx(100)


def test_retry_is_offered_only_when_a_job_errored_out() -> None:
    assert "retry" not in posting_actions(PostingStatus.FINISHED, 0)
    assert posting_actions(PostingStatus.FINISHED, 2) == ["retry"]
    assert posting_actions(PostingStatus.EXECUTING, 0) == ["pause", "cancel"]


def test_password_hashes_are_salted_and_verify() -> None:
    first, second = auth.hash_password("pw"), auth.hash_password("pw")
    assert first != second
    assert auth.verify_password("pw", first)
    assert not auth.verify_password("pW", first)
    assert not auth.verify_password("pw", "scrypt$garbage")


def test_basic_credentials_are_read_or_refused() -> None:
    token = base64.b64encode(b"ada:se:cret").decode()
    assert auth.basic_credentials(f"Basic {token}") == ("ada", "se:cret")
    assert auth.basic_credentials("Bearer x") is None
    assert auth.basic_credentials("Basic !!!") is None
    no_colon = base64.b64encode(b"ada").decode()
    assert auth.basic_credentials(f"Basic {no_colon}") is None


def test_a_csrf_token_is_bound_to_its_user_and_secret() -> None:
    token = auth.csrf_token(b"s" * 32, "ada")
    assert auth.csrf_valid(b"s" * 32, "ada", token)
    assert not auth.csrf_valid(b"s" * 32, "vic", token)
    assert not auth.csrf_valid(b"t" * 32, "ada", token)


def test_the_users_file_names_its_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "users"
    auth.add_user(path, "ada", "pw", admin=True)
    with path.open("a") as out:
        out.write("bob:root:scrypt$1$1$1$x$y\n")
    with pytest.raises(auth.UsersFileError, match=r"users:2: role must be"):
        auth.read_users(path)


def test_users_are_read_again_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "users"
    auth.add_user(path, "ada", "pw", admin=False)
    users = auth.Users(path, b"s" * 32)
    assert users.check("ada", "pw") is not None
    assert users.check("bob", "pw2") is None
    auth.add_user(path, "bob", "pw2", admin=True)
    bob = users.check("bob", "pw2")
    assert bob is not None and bob.admin
