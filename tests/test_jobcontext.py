"""The job context, results and profiles of one job call, run in this
process against a real PostgreSQL (the daemon's side is in
test_job_features.py)."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdoflowd import current_job
from pdoflowd.client import Client
from pdoflowd.config import Config, DatabaseConfig, JobsConfig
from pdoflowd.db import profiles, queue
from pdoflowd.jobcontext import (
    JobCall,
    NoJobContext,
    ResultNotStorable,
    encode_result,
    job_connector,
)
from pdoflowd.profiling import sampled

DAEMON = uuid.uuid4()


def seen_context() -> dict[str, Any]:
    context = current_job()
    return {
        "job_id": str(context.job_id),
        "posting_id": str(context.posting_id),
        "attempt": context.attempt,
        "tries_remaining": context.tries_remaining,
    }


def progress_then_fail() -> None:
    current_job().progress(0.25, "a quarter")
    raise ValueError("after progress")


def busy_work(n: int) -> int:
    return sum(_square(i) for i in range(n))


def _square(i: int) -> int:
    return i * i


def echo(*args: Any, **kwargs: Any) -> Any:
    return [list(args), kwargs]


class Claimed:
    """A posted and claimed job, and a JobCall for it."""

    def __init__(self, dsn: str, **post: Any) -> None:
        self.dsn = dsn
        self.posting = Client(dsn).post("tests.jobcontext", [[]], **post)
        self.owner = uuid.uuid4()
        with psycopg.connect(dsn, autocommit=True) as conn:
            [self.job] = queue.claim(
                conn, owner=self.owner, daemon_id=DAEMON, limit=1
            )

    def call(self, draw: float = 0.5, **jobs: Any) -> JobCall:
        config = Config(
            database=DatabaseConfig(dsn=self.dsn), jobs=JobsConfig(**jobs)
        )
        return JobCall(
            self.job,
            owner=self.owner,
            config=config,
            connect=job_connector(config.database, None),
            draw=draw,
        )

    def row(self) -> dict[str, Any]:
        with psycopg.connect(self.dsn) as conn:
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            row = cur.execute(
                "SELECT * FROM pdoflowd.jobs WHERE id = %s", (self.job.id,)
            ).fetchone()
        assert row is not None
        return dict(row)


def test_current_job_outside_a_job_is_a_clear_error() -> None:
    with pytest.raises(NoJobContext, match="only available inside a job"):
        current_job()


def test_inside_a_job_the_context_tells_the_job_about_itself(dsn: str) -> None:
    claimed = Claimed(dsn, store_result=True)
    call = claimed.call()
    call.run(seen_context)
    assert call.result_json is not None
    assert json.loads(call.result_json) == {
        "job_id": str(claimed.job.uuid),
        "posting_id": str(claimed.posting.id),
        "attempt": 1,
        "tries_remaining": 3,
    }
    with pytest.raises(NoJobContext):
        current_job()


def test_progress_is_recorded_on_the_job_and_the_context_ends_with_it(
    dsn: str,
) -> None:
    claimed = Claimed(dsn)
    with pytest.raises(ValueError, match="after progress"):
        claimed.call().run(progress_then_fail)
    row = claimed.row()
    assert (row["progress"], row["progress_note"]) == (0.25, "a quarter")
    assert row["progress_at"] is not None
    with pytest.raises(NoJobContext):
        current_job()


def test_progress_of_a_job_no_longer_this_runs_returns_false(
    dsn: str,
) -> None:
    claimed = Claimed(dsn)
    Client(dsn).cancel(claimed.posting.id)
    answers: list[bool] = []

    def report() -> None:
        answers.append(current_job().progress(0.5))

    claimed.call().run(report)
    assert answers == [False]
    assert claimed.row()["progress"] is None


@pytest.mark.parametrize(
    ("fraction", "note"),
    [(1.5, None), (-0.1, None), (math.nan, None), (True, None), (0.5, "a\x00")],
)
def test_meaningless_progress_is_refused(
    dsn: str, fraction: Any, note: Any
) -> None:
    claimed = Claimed(dsn)

    def report() -> None:
        current_job().progress(fraction, note)

    with pytest.raises(ValueError):
        claimed.call().run(report)


def test_the_context_connection_reaches_the_database(dsn: str) -> None:
    claimed = Claimed(dsn, store_result=True)

    def ask() -> Any:
        row = current_job().connection().execute("SELECT 41 + 1").fetchone()
        return row[0] if row else None

    call = claimed.call()
    call.run(ask)
    assert call.result_json == "42"


def test_stored_arguments_are_decoded_for_the_function(dsn: str) -> None:
    posting = Client(dsn).post(
        "tests.echo",
        [[math.nan, {"__pdoflowd_float__": "nan"}]],
        [{"x": -math.inf}],
        store_result=True,
    )
    owner = uuid.uuid4()
    with psycopg.connect(dsn, autocommit=True) as conn:
        [job] = queue.claim(conn, owner=owner, daemon_id=DAEMON, limit=1)
    config = Config(database=DatabaseConfig(dsn=dsn))
    got: list[Any] = []

    def keep(*args: Any, **kwargs: Any) -> None:
        got.append((args, kwargs))

    JobCall(
        job,
        owner=owner,
        config=config,
        connect=job_connector(config.database, None),
        draw=0.5,
    ).run(keep)
    [(args, kwargs)] = got
    assert math.isnan(args[0])
    assert args[1] == {"__pdoflowd_float__": "nan"}
    assert kwargs == {"x": -math.inf}
    assert posting.id == job.posting_uuid


def test_a_result_is_kept_only_when_the_posting_asks(dsn: str) -> None:
    call = Claimed(dsn).call()
    call.run(lambda: 42)
    assert call.result_json is None


def test_a_result_past_the_cap_is_refused_naming_the_cap(dsn: str) -> None:
    call = Claimed(dsn, store_result=True).call(result_max_bytes=10)
    with pytest.raises(ResultNotStorable, match=r"12 bytes .*\(10\)"):
        call.run(lambda: "x" * 10)


def test_a_result_that_is_not_json_is_refused(dsn: str) -> None:
    call = Claimed(dsn, store_result=True).call()
    with pytest.raises(ResultNotStorable, match="set is not a JSON value"):
        call.run(lambda: {"a": {1}})


def test_non_finite_results_are_stored_tagged() -> None:
    assert encode_result([math.nan, 1.0], 100) == (
        '[{"__pdoflowd_float__":"nan"},1.0]'
    )


# ---------------------------------------------------------------- profiles


@given(st.floats(0, 1), st.floats(0, 1, exclude_max=True))
def test_sampling_profiles_a_draw_below_the_rate(
    rate: float, draw: float
) -> None:
    assert sampled(rate, draw) is (draw < rate)


@given(st.floats(0, 1, exclude_max=True))
def test_rate_zero_never_samples_and_rate_one_always_does(draw: float) -> None:
    assert not sampled(0.0, draw)
    assert sampled(1.0, draw)


def test_a_sampled_job_stores_its_profile_queryable_by_function(
    dsn: str,
) -> None:
    claimed = Claimed(dsn)
    call = claimed.call(draw=0.3, profile_sample_rate=0.5)
    call.run(lambda: busy_work(2000))
    with psycopg.connect(dsn, autocommit=True) as conn:
        call.save_profile(lambda: conn)
        [(profile_id, job_id, attempt, total)] = conn.execute(
            "SELECT id, job_id, attempt, total_time FROM pdoflowd.job_profiles"
        ).fetchall()
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM pdoflowd.profile_function_stats"
            "        WHERE profile_id = %(p)s),"
            "       (SELECT count(*) FROM pdoflowd.profile_call_map"
            "        WHERE profile_id = %(p)s)",
            {"p": profile_id},
        ).fetchone()
        stats = profiles.function_stats(conn, entry_point="tests.jobcontext")
    assert (job_id, attempt) == (claimed.job.id, 1)
    assert total > 0
    assert counts is not None and min(counts) > 0
    square = next(s for s in stats if s.name == "_square")
    assert (square.ncalls, square.profiles) == (2000, 1)
    assert square.filename.endswith("test_jobcontext.py")


def test_a_job_not_sampled_stores_no_profile(dsn: str) -> None:
    claimed = Claimed(dsn)
    call = claimed.call(draw=0.5, profile_sample_rate=0.5)
    call.run(lambda: busy_work(10))
    with psycopg.connect(dsn, autocommit=True) as conn:
        call.save_profile(lambda: conn)
        assert conn.execute(
            "SELECT count(*) FROM pdoflowd.job_profiles"
        ).fetchone() == (0,)


def test_profiles_of_two_jobs_share_their_functions(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(2):
            call = Claimed(dsn).call(draw=0.0, profile_sample_rate=1.0)
            call.run(lambda: busy_work(10))
            call.save_profile(lambda: conn)
        [square] = [
            s for s in profiles.function_stats(conn) if s.name == "_square"
        ]
        assert (square.profiles, square.ncalls) == (2, 20)
        assert conn.execute(
            "SELECT count(*) FROM pdoflowd.profile_functions"
            " WHERE name = '_square'"
        ).fetchone() == (1,)


def test_a_profile_that_cannot_be_written_is_logged_not_raised(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    call = Claimed(dsn).call(draw=0.0, profile_sample_rate=1.0)
    call.run(lambda: busy_work(10))

    def unreachable() -> Any:
        raise psycopg.OperationalError("the database is gone")

    call.save_profile(unreachable)
    assert "profile of job" in caplog.text
    assert "the database is gone" in caplog.text
