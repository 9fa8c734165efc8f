"""The client: defining jobs, posting work and following it.

Rows are read back with SQL from a real PostgreSQL; the one test of
``wait`` on a finished posting runs the real daemon.
"""

from __future__ import annotations

import functools
import time
import uuid
from pathlib import Path
from typing import Any

import clientjobs
import psycopg
import pytest

from harness import Daemon, daemon_config
from pdoflowd.client import (
    Client,
    PostingError,
    Registry,
    WaitTimeout,
    job,
)
from pdoflowd.db import common, postings
from pdoflowd.status import JobStatus, PostingStatus


def job_rows(dsn: str) -> list[tuple[Any, ...]]:
    """(uuid, priority, posargs, kwargs, tries_remaining), in insert order."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT uuid, priority, posargs, kwargs, tries_remaining "
            "FROM pdoflowd.jobs ORDER BY id"
        ).fetchall()


def posting_rows(dsn: str) -> list[tuple[Any, ...]]:
    """(uuid, target_function, entry_point, status), in insert order."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT uuid, target_function, entry_point, status "
            "FROM pdoflowd.postings ORDER BY id"
        ).fetchall()


def row_counts(dsn: str) -> tuple[int, int]:
    """How many postings and jobs there are."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM pdoflowd.postings), "
            "(SELECT count(*) FROM pdoflowd.jobs)"
        ).fetchone()
    assert row is not None
    return row[0], row[1]


# ---------------------------------------------------------------- posting


def test_post_work_returns_a_posting_uuid_and_one_uuid_per_job_in_order(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PDOFLOW_DSN", dsn)
    posting_id, job_ids = Registry[clientjobs.add].post_work(
        posargs=[(1, 2.0, "a"), (2, 3.0, "b")], kwargs=[], priority=0
    )
    assert isinstance(posting_id, uuid.UUID)
    assert all(isinstance(j, uuid.UUID) for j in job_ids)
    assert [row[0] for row in posting_rows(dsn)] == [posting_id]
    assert [row[0] for row in job_rows(dsn)] == job_ids


def test_job_rows_hold_priority_arguments_and_tries(dsn: str) -> None:
    Registry[clientjobs.add].post_work(
        posargs=[(1, 2.0, "a"), (2, 3.0, "b")],
        kwargs=[{"label": "x"}, {}],
        priority=7,
        dsn=dsn,
    )
    assert [row[1:] for row in job_rows(dsn)] == [
        (7, [1, 2.0, "a"], {"label": "x"}, 3),
        (7, [2, 3.0, "b"], {}, 3),
    ]


def test_posting_row_names_the_job_and_its_entry_point(dsn: str) -> None:
    posting_id, _ = Registry[clientjobs.add].post_work([[1, 2]], dsn=dsn)
    assert posting_rows(dsn) == [
        (posting_id, "add", "clientjobs.add", "executing")
    ]


def test_a_priority_list_gives_each_job_its_own_priority(dsn: str) -> None:
    Registry[clientjobs.add].post_work(
        [[1, 1], [2, 2], [3, 3]], priority=[5, -1, 0], dsn=dsn
    )
    assert [row[1] for row in job_rows(dsn)] == [5, -1, 0]


def test_a_priority_list_of_the_wrong_length_is_refused_and_nothing_written(
    dsn: str,
) -> None:
    with pytest.raises(PostingError, match="2 priorities given for 3 jobs"):
        Registry[clientjobs.add].post_work(
            [[1, 1], [2, 2], [3, 3]], priority=[1, 2], dsn=dsn
        )
    assert row_counts(dsn) == (0, 0)


@pytest.mark.parametrize("priority", [2**31, -(2**31) - 1, "5", 1.5, True])
def test_a_priority_postgresql_cannot_store_is_refused(
    dsn: str, priority: Any
) -> None:
    with pytest.raises(PostingError, match="priority"):
        Client(dsn).post(clientjobs.add, [[1, 1]], priority=priority)
    assert row_counts(dsn) == (0, 0)


def test_posargs_and_kwargs_of_different_lengths_are_refused(
    dsn: str,
) -> None:
    with pytest.raises(PostingError, match="posargs has 2 entries"):
        Client(dsn).post(clientjobs.add, [[1, 1], [2, 2]], [{}, {}, {}])
    assert row_counts(dsn) == (0, 0)


def test_kwargs_alone_make_one_job_each(dsn: str) -> None:
    Client(dsn).post(clientjobs.add, [], [{"a": 1, "b": 2}, {"a": 3, "b": 4}])
    assert [row[2:4] for row in job_rows(dsn)] == [
        ([], {"a": 1, "b": 2}),
        ([], {"a": 3, "b": 4}),
    ]


def test_a_posting_without_jobs_is_refused(dsn: str) -> None:
    with pytest.raises(PostingError, match="at least one job"):
        Client(dsn).post(clientjobs.add, [])
    assert row_counts(dsn) == (0, 0)


@pytest.mark.parametrize(
    ("posargs", "kwargs"),
    [({"a": 1}, None), ("ab", None), ([[1]], {"a": 1})],
)
def test_arguments_of_one_job_given_for_the_whole_posting_are_refused(
    dsn: str, posargs: Any, kwargs: Any
) -> None:
    with pytest.raises(PostingError, match=r"one .* per job"):
        Client(dsn).post(clientjobs.add, posargs, kwargs)
    assert row_counts(dsn) == (0, 0)


def test_a_bad_argument_rejects_the_whole_posting_and_names_index_and_path(
    dsn: str,
) -> None:
    posargs: list[list[Any]] = [[1, 2]] * 5
    posargs[3] = [1, {"when": {1, 2}}]
    with pytest.raises(PostingError) as caught:
        Client(dsn).post(clientjobs.add, posargs)
    assert str(caught.value).startswith("job 3: posargs[1]['when']: ")
    assert row_counts(dsn) == (0, 0)


def test_a_bad_keyword_argument_names_index_and_keyword(dsn: str) -> None:
    with pytest.raises(PostingError, match=r"job 1: kwargs\['b'\]: "):
        Client(dsn).post(clientjobs.add, [], [{"b": 1}, {"b": {1.5}}])
    assert row_counts(dsn) == (0, 0)


def test_tries_default_to_the_job_definition(dsn: str) -> None:
    Client(dsn).post(clientjobs.patient, [[]])
    assert [row[4] for row in job_rows(dsn)] == [5]


def test_tries_given_when_posting_win_over_the_definition(dsn: str) -> None:
    Client(dsn).post(clientjobs.patient, [[], []], tries=1)
    assert [row[4] for row in job_rows(dsn)] == [1, 1]


@pytest.mark.parametrize("tries", [0, -1, 2**31, True, 2.0])
def test_tries_postgresql_cannot_store_or_below_one_are_refused(
    dsn: str, tries: Any
) -> None:
    with pytest.raises(PostingError, match="tries"):
        Client(dsn).post(clientjobs.add, [[1, 1]], tries=tries)
    assert row_counts(dsn) == (0, 0)


def test_job_ids_are_uuid7_increasing_within_a_posting(dsn: str) -> None:
    posting = Client(dsn).post(clientjobs.add, [[i, i] for i in range(200)])
    assert posting.id.version == 7
    assert {j.version for j in posting.job_ids} == {7}
    assert posting.job_ids == sorted(posting.job_ids)
    assert len(set(posting.job_ids)) == 200


def test_job_ids_are_consecutive_uuid7s_of_one_millisecond(dsn: str) -> None:
    posting = Client(dsn).post(clientjobs.add, [[i, i] for i in range(300)])
    numbers = [j.int for j in posting.job_ids]
    assert len({n >> 80 for n in numbers}) == 1
    randoms = [((n >> 64) & 0xFFF) << 62 | (n & (2**62 - 1)) for n in numbers]
    assert randoms == list(range(randoms[0], randoms[0] + 300))
    assert [row[0] for row in job_rows(dsn)] == list(posting.job_ids)


def test_a_later_postings_ids_sort_after_an_earlier_ones(dsn: str) -> None:
    client = Client(dsn)
    first = client.post(clientjobs.add, [[1, 1], [2, 2]])
    second = client.post(clientjobs.add, [[3, 3], [4, 4]])
    ids = [first.id, *first.job_ids, second.id, *second.job_ids]
    assert ids == sorted(ids)


def test_arguments_with_copy_text_specials_round_trip_exactly(
    dsn: str,
) -> None:
    texts = [
        "back\\slash",
        "\\n is not a newline",
        "\\\\N",
        "\\.",
        "tab\there",
        "new\nline",
        "carriage\rreturn",
        "\r\n",
        "\"quoted\" 'single'",
        "\x01\x08\x0b\x0c\x1f\x7f",
        "é ü 漢字 🎉 \u202e",
        "",
    ]
    posargs = [[text, {text: [text]}] for text in texts]
    kwargs = [{"label": text} for text in texts]
    Client(dsn).post(clientjobs.add, posargs, kwargs)
    assert [(row[2], row[3]) for row in job_rows(dsn)] == [
        ([text, {text: [text]}], {"label": text}) for text in texts
    ]


def test_copy_fields_escape_backslash_tab_newline_and_return() -> None:
    assert postings.copy_field("plain [1,2]") == "plain [1,2]"
    assert postings.copy_field("a\\nb\tc\nd\re\\") == (
        "a\\\\nb\\tc\\nd\\re\\\\"
    )


def test_json_with_raw_whitespace_goes_through_copy_intact(dsn: str) -> None:
    job_id = uuid.uuid4()
    with psycopg.connect(dsn) as conn:
        postings.insert_posting(
            conn,
            posting_uuid=uuid.uuid4(),
            target_function="add",
            entry_point="clientjobs.add",
            jobs=[
                (
                    str(job_id),
                    3,
                    '[1,\n\t2,\r\n"a\\\\n\\tb"]',
                    '{\n"k": "\\\\"}',
                )
            ],
            tries=1,
        )
    assert job_rows(dsn) == [(job_id, 3, [1, 2, "a\\n\tb"], {"k": "\\"}, 1)]


def test_a_bad_argument_deep_in_a_large_posting_leaves_no_row(
    dsn: str,
) -> None:
    posargs: list[list[Any]] = [[i, 0.5] for i in range(60_000)]
    posargs[50_000] = [1, {"when": {1, 2}}]
    with pytest.raises(PostingError) as caught:
        Client(dsn).post(clientjobs.add, posargs)
    assert str(caught.value) == (
        "job 50000: posargs[1]['when']: set is not a JSON value"
    )
    assert row_counts(dsn) == (0, 0)


def _orders(dsn: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM orders ORDER BY id")]


@pytest.fixture
def orders(dsn: str) -> str:
    """``dsn`` with a table ``orders`` for the caller's own writes."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    return dsn


def _large_posting_bad_at(count: int, bad: int) -> list[list[Any]]:
    posargs: list[list[Any]] = [[i, 1.5] for i in range(count)]
    posargs[bad] = [1, float("nan"), object()]
    return posargs


def test_a_bad_argument_mid_posting_keeps_the_callers_transaction(
    orders: str,
) -> None:
    with psycopg.connect(orders) as conn:
        conn.execute("INSERT INTO orders VALUES (1)")
        with pytest.raises(
            PostingError, match=r"^job 20000: posargs\[2\]: object is not"
        ):
            Client().post(
                clientjobs.add, _large_posting_bad_at(30_000, 20_000), conn=conn
            )
        assert conn.info.transaction_status.name == "INTRANS"
        conn.execute("INSERT INTO orders VALUES (2)")
        posting = Client().post(clientjobs.add, [[5, 6]], conn=conn)
        conn.commit()
    assert _orders(orders) == [1, 2]
    assert row_counts(orders) == (1, 1)
    assert [row[0] for row in job_rows(orders)] == posting.job_ids


def test_a_bad_argument_mid_posting_keeps_an_autocommit_callers_block(
    orders: str,
) -> None:
    with psycopg.connect(orders, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("INSERT INTO orders VALUES (1)")
            with pytest.raises(PostingError, match=r"^job 20000: "):
                Client().post(
                    clientjobs.add,
                    _large_posting_bad_at(30_000, 20_000),
                    conn=conn,
                )
            conn.execute("INSERT INTO orders VALUES (2)")
        assert conn.info.transaction_status.name == "IDLE"
    assert _orders(orders) == [1, 2]
    assert row_counts(orders) == (0, 0)


def test_a_bad_argument_leaves_a_connection_without_a_transaction_as_it_was(
    orders: str,
) -> None:
    with psycopg.connect(orders) as conn:
        with pytest.raises(PostingError, match=r"^job 20000: "):
            Client().post(
                clientjobs.add, _large_posting_bad_at(30_000, 20_000), conn=conn
            )
        assert conn.info.transaction_status.name == "IDLE"
        conn.execute("INSERT INTO orders VALUES (3)")
        conn.commit()
    assert _orders(orders) == [3]
    assert row_counts(orders) == (0, 0)


def test_a_job_whose_arguments_are_not_a_list_is_refused_before_writing(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_write(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(
            "a posting of the wrong shape reached the database"
        )

    monkeypatch.setattr(postings, "insert_posting", no_write)
    posargs: list[Any] = [[1, 2]] * 10
    posargs[7] = "12"
    with pytest.raises(
        PostingError, match=r"^job 7: posargs: positional arguments must be"
    ):
        Client(dsn).post(clientjobs.add, posargs)
    kwargs: list[Any] = [{}] * 10
    kwargs[8] = [("a", 1)]
    with pytest.raises(
        PostingError, match=r"^job 8: kwargs: keyword arguments must be a dict"
    ):
        Client(dsn).post(clientjobs.add, [[1, 2]] * 10, kwargs)


def test_the_first_bad_job_is_named_even_when_a_later_one_is_misshapen(
    dsn: str,
) -> None:
    posargs: list[Any] = [[1, 2]] * 10
    posargs[3] = [1, {2}]
    posargs[6] = "not a list"
    with pytest.raises(PostingError, match=r"^job 3: posargs\[1\]: set"):
        Client(dsn).post(clientjobs.add, posargs)
    assert row_counts(dsn) == (0, 0)


# ---------------------------------------------------------------- targets


def test_job_name_given_to_the_decorator_is_stored_as_target_function(
    dsn: str,
) -> None:
    Registry[clientjobs.original_name].post_work([[]], dsn=dsn)
    assert posting_rows(dsn)[0][1:3] == (
        "renamed",
        "clientjobs.original_name",
    )


def test_a_job_can_be_looked_up_by_its_name() -> None:
    assert Registry["renamed"] is Registry[clientjobs.original_name]


def test_an_undecorated_function_is_not_in_the_registry() -> None:
    with pytest.raises(KeyError, match="decorate it with @job"):
        Registry[functools.reduce]


def test_an_entry_point_string_target_is_accepted(dsn: str) -> None:
    Client(dsn).post("some.package.work", [[1]])
    assert posting_rows(dsn)[0][1:3] == ("work", "some.package.work")


def test_the_entry_point_of_a_decorated_job_keeps_its_definition(
    dsn: str,
) -> None:
    Client(dsn).post("clientjobs.original_name", [[]])
    Client(dsn).post("clientjobs.patient", [[]])
    assert [row[1] for row in posting_rows(dsn)] == ["renamed", "patient"]
    assert [row[4] for row in job_rows(dsn)] == [3, 5]


@pytest.mark.parametrize(
    "target",
    ["noop", "jobfns.", ".noop", "jobfns..noop", "jobfns.no-op", "a b.c", ""],
)
def test_a_malformed_entry_point_string_is_refused(
    dsn: str, target: str
) -> None:
    with pytest.raises(PostingError, match="not a dotted path"):
        Client(dsn).post(target, [[1]])
    assert row_counts(dsn) == (0, 0)


def test_a_classmethod_is_refused_for_no_worker_runs_it(dsn: str) -> None:
    with pytest.raises(PostingError, match="is a method"):
        Client(dsn).post(clientjobs.Shapes.area, [[2.0]])
    assert row_counts(dsn) == (0, 0)


def _defined_in_main() -> Any:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec("def work(x):\n    return x\n", namespace)
    return namespace["work"]


def test_a_function_defined_in_main_is_refused_at_decoration() -> None:
    work = _defined_in_main()
    assert work.__module__ == "__main__"
    with pytest.raises(PostingError, match="defined in __main__"):
        job()(work)
    assert work not in Registry


def test_a_function_defined_in_main_is_refused_at_post_time(
    dsn: str,
) -> None:
    with pytest.raises(PostingError, match="defined in __main__"):
        Client(dsn).post(_defined_in_main(), [[1]])
    assert row_counts(dsn) == (0, 0)


def test_a_nested_function_is_refused_at_decoration() -> None:
    with pytest.raises(PostingError, match="nested or lambda"):

        @job()
        def inner() -> None:
            pass


def test_a_lambda_is_refused_at_post_time(dsn: str) -> None:
    with pytest.raises(PostingError, match="nested or lambda"):
        Client(dsn).post(lambda: None, [[]])


def test_a_partial_is_refused_for_want_of_an_importable_name(
    dsn: str,
) -> None:
    with pytest.raises(PostingError, match="no importable name"):
        Client(dsn).post(functools.partial(clientjobs.add, 1), [[2]])


def test_a_method_bound_to_an_instance_is_refused(dsn: str) -> None:
    with pytest.raises(PostingError, match="is a method"):
        Client(dsn).post(clientjobs.Shapes().perimeter, [[1.0]])


# ---------------------------------------------------------------- transactions


def test_posting_in_a_transaction_that_rolls_back_writes_nothing(
    dsn: str,
) -> None:
    with psycopg.connect(dsn) as conn:
        Client().post(clientjobs.add, [[1, 2]], conn=conn)
        conn.rollback()
    assert row_counts(dsn) == (0, 0)


def test_posting_in_a_transaction_that_commits_writes_the_posting(
    dsn: str,
) -> None:
    with psycopg.connect(dsn) as conn:
        posting = Client().post(clientjobs.add, [[1, 2], [3, 4]], conn=conn)
        assert row_counts(dsn) == (0, 0)
        conn.commit()
    assert [row[0] for row in job_rows(dsn)] == posting.job_ids


def test_posting_rolls_back_together_with_the_callers_own_insert(
    dsn: str,
) -> None:
    with psycopg.connect(dsn, autocommit=True) as setup:
        setup.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO orders VALUES (1)")
        Client().post(clientjobs.add, [[1, 2]], conn=conn)
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (0,)
    assert row_counts(dsn) == (0, 0)


def test_posting_joins_a_transaction_block_of_an_autocommit_connection(
    dsn: str,
) -> None:
    class Abandon(Exception):
        pass

    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(Abandon), conn.transaction():
            Client().post(clientjobs.add, [[1, 2]], conn=conn)
            raise Abandon
        assert row_counts(dsn) == (0, 0)
        Client().post(clientjobs.add, [[1, 2]], conn=conn)
    assert row_counts(dsn) == (1, 1)


def test_listeners_are_notified_only_when_the_posting_commits(
    dsn: str,
) -> None:
    with (
        psycopg.connect(dsn, autocommit=True) as listener,
        psycopg.connect(dsn) as conn,
    ):
        listener.execute(f"LISTEN {common.NOTIFY_CHANNEL}")
        Client().post(clientjobs.add, [[1, 2]], conn=conn)
        assert list(listener.notifies(timeout=0.2)) == []
        conn.commit()
        heard = list(listener.notifies(timeout=5, stop_after=1))
    assert [n.channel for n in heard] == [common.NOTIFY_CHANNEL]


# ---------------------------------------------------------------- following


def _set_job_statuses(dsn: str, statuses: list[str]) -> None:
    with psycopg.connect(dsn) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM pdoflowd.jobs")]
        for job_id, status in zip(sorted(ids), statuses, strict=True):
            conn.execute(
                "UPDATE pdoflowd.jobs SET status = %s WHERE id = %s",
                (status, job_id),
            )


def test_status_counts_the_jobs_in_each_status(dsn: str) -> None:
    client = Client(dsn)
    posting = client.post(clientjobs.add, [[i, i] for i in range(6)])
    _set_job_statuses(
        dsn,
        ["waiting", "executing", "done", "done", "done", "errored_out"],
    )
    state = client.status(posting.id)
    assert state.id == posting.id
    assert state.status is PostingStatus.EXECUTING
    assert state.jobs == {
        JobStatus.WAITING: 1,
        JobStatus.EXECUTING: 1,
        JobStatus.DONE: 3,
        JobStatus.ERRORED_OUT: 1,
        JobStatus.HELD: 0,
    }
    assert state.total == 6
    assert not state.finished


def test_status_accepts_the_posting_id_as_a_string(dsn: str) -> None:
    client = Client(dsn)
    posting = client.post(clientjobs.add, [[1, 1]])
    assert client.status(str(posting.id)).jobs[JobStatus.WAITING] == 1


def test_status_as_json_has_the_documented_shape(dsn: str) -> None:
    client = Client(dsn)
    posting = client.post(clientjobs.add, [[1, 1], [2, 2]])
    assert client.status(posting.id).as_json() == {
        "id": str(posting.id),
        "status": "executing",
        "jobs": {
            "waiting": 2,
            "executing": 0,
            "done": 0,
            "errored_out": 0,
            "held": 0,
        },
        "waiting_for": [],
    }


def test_a_paused_posting_reports_paused(dsn: str) -> None:
    client = Client(dsn)
    posting = client.post(clientjobs.add, [[1, 1]], paused=True)
    assert client.status(posting.id).status is PostingStatus.PAUSED


def test_status_of_an_unknown_posting_raises_key_error(dsn: str) -> None:
    unknown = uuid.uuid4()
    with pytest.raises(KeyError, match=f"no posting {unknown}"):
        Client(dsn).status(unknown)


def test_status_of_something_not_a_uuid_raises_key_error(dsn: str) -> None:
    with pytest.raises(KeyError, match="not a posting id"):
        Client(dsn).status("not-a-uuid")


def test_wait_on_a_posting_nobody_runs_times_out_quickly(dsn: str) -> None:
    client = Client(dsn)
    posting = client.post(clientjobs.add, [[1, 1]])
    began = time.monotonic()
    with pytest.raises(WaitTimeout) as caught:
        client.wait(posting.id, timeout=0.3, poll_interval=0.05)
    assert time.monotonic() - began < 2
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.state.jobs[JobStatus.WAITING] == 1


def test_wait_on_an_unknown_posting_raises_key_error(dsn: str) -> None:
    with pytest.raises(KeyError):
        Client(dsn).wait(uuid.uuid4(), timeout=5)


@pytest.mark.parametrize(
    ("timeout", "poll_interval"),
    [(float("nan"), 0.5), (-1.0, 0.5), (None, 0.0), (None, -1.0)],
)
def test_wait_refuses_meaningless_times(
    dsn: str, timeout: float | None, poll_interval: float
) -> None:
    with pytest.raises(ValueError):
        Client(dsn).wait(uuid.uuid4(), timeout, poll_interval=poll_interval)


def test_wait_returns_when_the_daemon_has_finished_the_posting(
    dsn: str, tmp_path: Path
) -> None:
    daemon = Daemon(tmp_path, daemon_config(dsn), effects_dsn=dsn)
    try:
        daemon.start().wait_ready()
        client = Client(dsn)
        posting = client.post("jobfns.noop", [[i] for i in range(5)])
        seen: list[PostingStatus] = []
        state = client.wait(
            posting.id,
            timeout=30,
            poll_interval=0.1,
            on_progress=lambda s: seen.append(s.status),
        )
        assert state.status is PostingStatus.FINISHED
        assert state.jobs[JobStatus.DONE] == 5
        assert state.finished
        assert seen[-1] is PostingStatus.FINISHED
        assert daemon.stop() == 0
    finally:
        daemon.close()
