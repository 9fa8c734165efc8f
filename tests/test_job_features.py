"""Job features in the real daemon: the job context, shared variables,
progress, results, delayed jobs, capabilities, profiles, cancel and retry.

One daemon serves the whole module (starting one costs a second or two):
it provides "gpu", takes only postings of the test's own database user,
profiles every job and keeps results of at most 1000 bytes.
"""

from __future__ import annotations

import math
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import featurejobs
import psycopg
import pytest

from harness import (
    Daemon,
    create_effects_table,
    daemon_config,
    run_pdoflow,
    wait_until,
)
from pdoflowd.client import Client, PostingState
from pdoflowd.db import profiles
from pdoflowd.status import JobStatus, PostingStatus

assert featurejobs.describe  # its @job definition (stores results) is known


@pytest.fixture(scope="module")
def database(pg_server: Any, pdoflowd_template: str) -> Iterator[str]:
    name = "t_features_" + uuid.uuid4().hex[:10]
    dsn = pg_server.create_database(name, template=pdoflowd_template)
    try:
        yield dsn
    finally:
        pg_server.drop_database(name)


@pytest.fixture(scope="module")
def daemon(
    database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    create_effects_table(database)
    with psycopg.connect(database) as conn:
        row = conn.execute("SELECT session_user").fetchone()
    assert row is not None
    config = daemon_config(
        database,
        workers={"count": 2, "provides": ["gpu"], "posters": [row[0]]},
        jobs={
            "allowed_modules": ["jobfns", "featurejobs"],
            "profile_sample_rate": 1.0,
            "result_max_bytes": 1000,
        },
    )
    started = Daemon(
        tmp_path_factory.mktemp("features"), config, effects_dsn=database
    )
    try:
        yield started.start().wait_ready()
        assert started.stop() == 0
    finally:
        started.close()


@pytest.fixture
def client(database: str, daemon: Daemon) -> Client:
    return Client(database)


def finished(client: Client, posting: Any) -> PostingState:
    state = client.wait(posting.id, timeout=30, poll_interval=0.05)
    assert state.status is PostingStatus.FINISHED, state
    return state


def test_a_job_knows_itself_and_gets_non_finite_arguments_exactly(
    client: Client,
) -> None:
    posting = client.post(
        featurejobs.describe,
        [[math.nan, [math.inf]], [{"__pdoflowd_float__": "nan"}]],
        [{"low": -math.inf}, {}],
    )
    finished(client, posting)
    first, second = client.results(posting.id)
    assert first.stored and first.status is JobStatus.DONE
    nan, infs = first.value["args"]
    assert math.isnan(nan) and infs == [math.inf]
    assert first.value["kwargs"] == {"low": -math.inf}
    assert first.value["job_id"] == str(posting.job_ids[0])
    assert first.value["posting_id"] == str(posting.id)
    assert first.value["attempt"] == 1
    assert second.value["args"] == [{"__pdoflowd_float__": "nan"}]
    assert client.result(posting.job_ids[1]) == second


def test_shared_counter_updates_from_concurrent_jobs_lose_nothing(
    client: Client,
) -> None:
    posting = client.post("featurejobs.count_up", [[5]] * 10)
    finished(client, posting)
    assert client.shared(posting.id).get("counter") == 50


def test_progress_reported_by_a_job_is_kept_on_its_row(client: Client) -> None:
    posting = client.post("featurejobs.report_progress", [[4]])
    finished(client, posting)
    [row] = client.jobs(posting.id)
    assert (row.progress, row.progress_note) == (1.0, "step 4 of 4")


def test_a_result_past_the_cap_fails_the_job_saying_so(client: Client) -> None:
    posting = client.post(
        "featurejobs.big_result", [[10], [2000]], store_result=True, tries=1
    )
    finished(client, posting)
    small, big = client.results(posting.id)
    assert (small.status, small.value) == (JobStatus.DONE, "x" * 10)
    assert big.status is JobStatus.ERRORED_OUT and not big.stored
    assert big.error == (
        "ResultNotStorable: the return value is 2002 bytes as JSON, more "
        "than jobs.result_max_bytes (1000)"
    )


def test_a_result_that_is_not_json_fails_the_job(client: Client) -> None:
    posting = client.post(
        "featurejobs.unstorable_result", [[]], store_result=True, tries=1
    )
    finished(client, posting)
    [result] = client.results(posting.id)
    assert result.error is not None
    assert "set is not a JSON value" in result.error


def test_non_finite_results_round_trip(client: Client) -> None:
    posting = client.post("featurejobs.non_finite", [[]], store_result=True)
    finished(client, posting)
    [result] = client.results(posting.id)
    nan, inf, minus_inf, plain = result.value
    assert math.isnan(nan) and (inf, minus_inf, plain) == (
        math.inf,
        -math.inf,
        1.5,
    )


def test_a_delayed_posting_runs_no_sooner_than_asked(
    client: Client, database: str
) -> None:
    posting = client.post("jobfns.noop", [[1], [2]], run_after=1.5)
    finished(client, posting)
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT j.work_started_at - j.created_at FROM pdoflowd.jobs j"
            " JOIN pdoflowd.postings p ON p.id = j.posting_id"
            " WHERE p.uuid = %s",
            (posting.id,),
        ).fetchall()
    assert all(delay.total_seconds() >= 1.5 for (delay,) in rows)


def test_every_sampled_job_leaves_a_profile(
    client: Client, database: str
) -> None:
    posting = client.post("featurejobs.busy", [[300], [300]])
    finished(client, posting)

    def profiled() -> list[profiles.FunctionStat]:
        stats = client.function_stats(entry_point="featurejobs.busy")
        return [s for s in stats if s.name == "_square" and s.profiles == 2]

    [square] = wait_until(profiled, timeout=10)
    assert square.ncalls == 600


def test_jobs_requiring_what_no_daemon_provides_stay_waiting(
    client: Client, database: str
) -> None:
    tpu = client.post("jobfns.noop", [[1]], requires=["tpu"])
    gpu = client.post("jobfns.noop", [[2]], requires=["gpu"])
    finished(client, gpu)
    assert client.summary(gpu.id).claimable_by == 1
    state = client.status(tpu.id)
    assert (state.status, state.jobs[JobStatus.WAITING]) == (
        PostingStatus.EXECUTING,
        1,
    )
    assert client.summary(tpu.id).claimable_by == 0


def test_retry_runs_errored_out_jobs_again(client: Client) -> None:
    posting = client.post("featurejobs.fail_until_flag", [["go"]] * 3, tries=1)
    state = finished(client, posting)
    assert state.jobs[JobStatus.ERRORED_OUT] == 3
    client.shared(posting.id).set("go", True)
    assert client.retry(posting.id).jobs_changed == 3
    state = finished(client, posting)
    assert state.jobs[JobStatus.DONE] == 3


def test_cancel_ends_running_jobs_by_ending_their_workers(
    client: Client, daemon: Daemon
) -> None:
    workers = set(daemon.workers())
    posting = client.post("featurejobs.wait_for_flag", [["never"]] * 2)

    def running() -> int:
        return sum(r.progress == 0.5 for r in client.jobs(posting.id))

    wait_until(running, timeout=20)
    assert client.cancel(posting.id).jobs_changed == 2
    wait_until(lambda: workers - set(daemon.workers()))
    rows = client.jobs(posting.id)
    assert {(r.status, r.error) for r in rows} == {
        (JobStatus.ERRORED_OUT, "cancelled")
    }
    assert client.status(posting.id).status is PostingStatus.CANCELLED
    killed = daemon.log().count("was cancelled")
    assert 1 <= killed <= 2
    wait_until(lambda: len(workers - set(daemon.workers())) == killed)
    assert "crash loop" not in daemon.log()
    after = client.post("jobfns.noop", [[1]])
    finished(client, after)
    assert len(daemon.workers()) == 2


# ------------------------------------------------------------ async def jobs


def test_an_async_job_runs_in_its_context_on_its_workers_one_loop(
    client: Client,
) -> None:
    posting = client.post(featurejobs.describe_async, [[0.01]] * 8)
    finished(client, posting)
    results = client.results(posting.id)
    values = [r.value for r in results]
    assert [v["job_id"] for v in values] == [str(r.job_id) for r in results]
    assert {v["attempt"] for v in values} == {1}
    loops_by_worker: dict[int, set[int]] = {}
    for value in values:
        loops_by_worker.setdefault(value["pid"], set()).add(value["loop"])
    assert all(len(loops) == 1 for loops in loops_by_worker.values())


def test_an_async_job_that_raises_is_recorded_with_its_traceback(
    client: Client, database: str
) -> None:
    posting = client.post("featurejobs.fail_async", [["boom"]], tries=1)
    state = client.wait(posting.id, timeout=30, poll_interval=0.05)
    assert state.jobs[JobStatus.ERRORED_OUT] == 1
    (row,) = client.jobs(posting.id)
    assert row.error == "ValueError: boom"
    with psycopg.connect(database) as conn:
        found = conn.execute(
            "SELECT traceback FROM pdoflowd.jobs WHERE uuid = %s", (row.uuid,)
        ).fetchone()
    assert found is not None and "fail_async" in found[0]


def test_an_async_job_past_its_timeout_is_cancelled_and_recorded(
    client: Client, daemon: Daemon, database: str
) -> None:
    workers = set(daemon.workers())
    posting = client.post(
        "featurejobs.sleep_async", [[30, "timed-out"]], tries=1, timeout_s=0.5
    )
    state = client.wait(posting.id, timeout=30, poll_interval=0.05)
    assert state.jobs[JobStatus.ERRORED_OUT] == 1
    (row,) = client.jobs(posting.id)
    assert row.error == "timeout after 0.5 s"
    with psycopg.connect(database) as conn:
        found = conn.execute(
            "SELECT note FROM effects WHERE key = 'timed-out'"
        ).fetchall()
    assert found == [("cancelled",)]
    # Ended inside the worker: no worker was killed for it.
    assert set(daemon.workers()) == workers


def test_an_async_job_that_ignores_its_cancel_costs_its_worker_the_loop(
    client: Client, daemon: Daemon
) -> None:
    workers = set(daemon.workers())
    posting = client.post(
        "featurejobs.stubborn_async", [[30]], tries=1, timeout_s=0.5
    )
    state = client.wait(posting.id, timeout=30, poll_interval=0.05)
    assert state.jobs[JobStatus.ERRORED_OUT] == 1
    (row,) = client.jobs(posting.id)
    assert row.error == "timeout after 0.5 s"
    assert "did not end when cancelled" in daemon.log()
    assert set(daemon.workers()) == workers
    after = client.post(featurejobs.describe_async, [[0]] * 4)
    finished(client, after)


def test_a_task_an_async_job_leaves_behind_does_not_outlive_it(
    client: Client, database: str
) -> None:
    posting = client.post("featurejobs.leave_a_task_behind", [["late", 0.2]])
    finished(client, posting)
    (left_in,) = (r.value for r in client.results(posting.id))
    # An async job on the same worker, longer than the task would have
    # waited: had the task survived on that worker's loop, it would run.
    for _ in range(20):
        after = client.post(featurejobs.describe_async, [[0.4]])
        finished(client, after)
        (ran,) = (r.value for r in client.results(after.id))
        if ran["pid"] == left_in:
            break
    else:
        pytest.fail("no async job ran on the worker the task was left in")
    with psycopg.connect(database) as conn:
        row = conn.execute(
            "SELECT count(*) FROM effects WHERE key = 'late'"
        ).fetchone()
    assert row == (0,)


# ------------------------------------------------------------ one job


def test_a_done_job_shows_its_timings_result_and_daemon(
    client: Client, daemon: Daemon
) -> None:
    posting = client.post(featurejobs.describe, [["x"]])
    finished(client, posting)
    info = client.job(posting.job_ids[0])
    assert info.status is JobStatus.DONE
    assert info.result_stored and info.result["args"] == ["x"]
    assert info.attempt == 1
    assert info.created_at <= info.claimed_at <= info.started_at
    assert info.started_at <= info.completed_at
    assert (info.daemon_host, info.daemon_pid) == (
        socket.gethostname(),
        daemon.pid,
    )


def test_cancelling_a_running_job_ends_its_worker_and_only_that_job(
    client: Client, daemon: Daemon
) -> None:
    workers = set(daemon.workers())
    posting = client.post("featurejobs.wait_for_flag", [["later"], ["later"]])

    def running() -> list[Any]:
        return [r for r in client.jobs(posting.id) if r.progress == 0.5]

    first = wait_until(running, timeout=20)[0].uuid
    assert client.cancel_job(first).status is JobStatus.ERRORED_OUT
    wait_until(lambda: len(workers - set(daemon.workers())) == 1)
    assert "was cancelled" in daemon.log()
    # The other job runs on (or again, had the killed worker claimed it
    # too), and the posting ends once it does.
    client.shared(posting.id).set("later", True)
    state = client.wait(posting.id, timeout=30, poll_interval=0.05)
    assert state.status is PostingStatus.FINISHED
    assert (state.jobs[JobStatus.DONE], state.jobs[JobStatus.ERRORED_OUT]) == (
        1,
        1,
    )
    assert client.job(first).error == "cancelled"
    assert len(daemon.workers()) == 2


def test_retry_job_runs_an_errored_out_job_again(client: Client) -> None:
    posting = client.post("featurejobs.fail_until_flag", [["ok"]], tries=1)
    state = client.wait(posting.id, timeout=30, poll_interval=0.05)
    assert state.jobs[JobStatus.ERRORED_OUT] == 1
    (job_id,) = posting.job_ids
    client.shared(posting.id).set("ok", True)
    assert client.retry_job(job_id).status is JobStatus.WAITING
    state = finished(client, posting)
    assert state.jobs[JobStatus.DONE] == 1
    assert client.job(job_id).attempt == 2


# ------------------------------------------------------------ job output


def _printed(count: int) -> bytes:
    return b"".join(
        f"line {n:07d} ".encode() + b"x" * 50 + b"\n" for n in range(count)
    )


def test_a_job_that_prints_a_mebibyte_keeps_its_last_64_kib(
    client: Client, daemon: Daemon
) -> None:
    count = 1024 * 1024 // 64 + 1
    posting = client.post("featurejobs.print_lines", [[count, "on stderr"]])
    finished(client, posting)
    (job_id,) = posting.job_ids
    (output,) = client.job_output(job_id)
    printed = _printed(count) + b"on stderr\n"
    assert output.attempt == 1
    assert output.total_bytes == len(printed)
    assert output.truncated
    assert output.output.encode() == printed[-65536:]
    log = daemon.log()
    assert f"[job {job_id}] line 0000000 " in log
    assert f"[job {job_id}] on stderr" in log


def test_each_attempt_keeps_its_own_output(
    client: Client, database: str
) -> None:
    posting = client.post(
        "featurejobs.print_attempt_then_fail_once", [["no line end"]], tries=2
    )
    finished(client, posting)
    (job_id,) = posting.job_ids
    outputs = client.job_output(job_id)
    assert [(o.attempt, o.output) for o in outputs] == [
        (1, "attempt 1\nno line end"),
        (2, "attempt 2\nno line end"),
    ]
    assert not any(o.truncated for o in outputs)
    done = run_pdoflow(database, "logs", str(job_id), "--attempt", "1")
    assert (done.returncode, done.stdout) == (0, "attempt 1\nno line end")


def test_a_job_that_prints_nothing_stores_nothing_and_takes_nothing(
    client: Client,
) -> None:
    """Output written by a job is never counted as the next one's."""
    loud = client.post("featurejobs.print_lines", [[3]])
    quiet = client.post("jobfns.noop", [[1]] * 5)
    finished(client, loud)
    finished(client, quiet)
    assert [len(client.job_output(j)) for j in quiet.job_ids] == [0] * 5
    (output,) = client.job_output(loud.job_ids[0])
    assert output.output.encode() == _printed(3)


def test_what_a_jobs_child_process_prints_is_its_output(
    client: Client,
) -> None:
    posting = client.post("featurejobs.child_prints", [["from the child"]])
    finished(client, posting)
    (output,) = client.job_output(posting.job_ids[0])
    assert output.output == "from the child\n"
