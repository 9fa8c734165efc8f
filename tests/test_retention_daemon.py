"""Retention in real daemons: pruning while the queue drains, one daemon
at a time, counted on /metrics; and a posting's export before it goes."""

from __future__ import annotations

import io
import json
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.devcluster import free_port
from harness import Daemon, create_effects_table, daemon_config, wait_until
from pdoflowd.arguments import decode
from pdoflowd.cli import main
from pdoflowd.client import Client
from pdoflowd.status import JobStatus, PostingStatus
from scrape import parse_scrape, promtool_check_metrics, scrape_value

HOUR = 3600.0


def retention_config(dsn: str, port: int, **retention: Any) -> Any:
    return daemon_config(
        dsn,
        jobs={"allowed_modules": ["jobfns", "featurejobs"]},
        metrics={"listen": f"127.0.0.1:{port}"},
        retention={
            "enabled": True,
            "finished_after_s": HOUR,
            "errored_after_s": HOUR,
            "batch": 10,
            "interval_s": 0.2,
            **retention,
        },
    )


def old_posting(dsn: str, jobs: int, *, hours_ago: float = 2.0) -> uuid.UUID:
    """A posting whose jobs all ran, finished ``hours_ago`` hours ago."""
    posting = Client(dsn).post("jobfns.noop", [[i] for i in range(jobs)])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE pdoflowd.jobs SET status = 'done', attempt = 1"
            " WHERE posting_id ="
            " (SELECT id FROM pdoflowd.postings WHERE uuid = %s)",
            (posting.id,),
        )
        conn.execute(
            "UPDATE pdoflowd.postings SET status = 'finished',"
            " finished_at = now() - make_interval(secs => %s)"
            " WHERE uuid = %s",
            (hours_ago * HOUR, posting.id),
        )
    return posting.id


def postings_left(dsn: str, ids: list[uuid.UUID]) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pdoflowd.postings WHERE uuid = ANY(%s)",
            (ids,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def scrape(port: int) -> Any:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return parse_scrape(response.read().decode())


def pruned(port: int, kind: str) -> float:
    return scrape_value(scrape(port), "pdoflowd_pruned_total", kind=kind)


def test_a_daemon_prunes_old_postings_while_it_drains_the_queue(
    dsn: str, tmp_path: Path, promtool: str
) -> None:
    create_effects_table(dsn)
    old = [old_posting(dsn, 35) for _ in range(3)]
    young = old_posting(dsn, 5, hours_ago=0.5)
    draining = Client(dsn).post("jobfns.noop", [[i] for i in range(300)])
    port = free_port()
    daemon = Daemon(tmp_path, retention_config(dsn, port), effects_dsn=dsn)
    try:
        daemon.start().wait_ready()
        state = Client(dsn).wait(draining.id, 60, poll_interval=0.05)
        wait_until(lambda: postings_left(dsn, old) == 0)
        wait_until(lambda: pruned(port, "jobs") == 105)

        assert state.status is PostingStatus.FINISHED
        assert state.jobs[JobStatus.DONE] == 300
        assert postings_left(dsn, [young, draining.id]) == 2
        assert pruned(port, "postings") == 3
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=10
        ) as response:
            promtool_check_metrics(promtool, response.read())
        assert "this daemon prunes ended postings" in daemon.log()
        # Its heartbeat never fell behind the pruning passes.
        assert "declared lost" not in daemon.log()
        with psycopg.connect(dsn) as conn:
            assert conn.execute(
                "SELECT count(*) FROM pdoflowd.daemons WHERE stopped_at IS NULL"
            ).fetchone() == (1,)
        assert daemon.stop() == 0
    finally:
        daemon.close()


def test_only_one_daemon_prunes_and_another_takes_over_when_it_stops(
    dsn: str, tmp_path: Path
) -> None:
    create_effects_table(dsn)
    first_batch = [old_posting(dsn, 12) for _ in range(4)]
    ports = [free_port(), free_port()]
    daemons = [
        Daemon(
            tmp_path,
            retention_config(dsn, port),
            effects_dsn=dsn,
            name=f"daemon{n}",
        )
        for n, port in enumerate(ports)
    ]
    try:
        for daemon in daemons:
            daemon.start().wait_ready()
        wait_until(lambda: postings_left(dsn, first_batch) == 0)
        wait_until(lambda: sum(pruned(port, "postings") for port in ports) == 4)
        counts = [pruned(port, "postings") for port in ports]
        # The whole lot by one: the other never got the lock.
        assert sorted(counts) == [0, 4]
        leader = counts.index(4)
        other = 1 - leader
        assert daemons[leader].stop() == 0

        second_batch = [old_posting(dsn, 3) for _ in range(2)]
        wait_until(lambda: postings_left(dsn, second_batch) == 0)
        wait_until(lambda: pruned(ports[other], "postings") == 2)
        assert pruned(ports[other], "jobs") == 6
        assert daemons[other].stop() == 0
    finally:
        for daemon in daemons:
            daemon.close()


def run_cli(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    *args: str,
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_an_exported_posting_keeps_its_jobs_outcomes_and_results(
    dsn: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    create_effects_table(dsn)
    client = Client(dsn)
    arguments = [[1.5, "a"], [float("nan"), {"x": [1, 2]}], []]
    posting = client.post(
        "featurejobs.describe",
        arguments,
        kwargs=[{"k": 1}, {}, {"z": None}],
        store_result=True,
    )
    failing = client.post("jobfns.fail", [["boom"]], tries=1)
    daemon = Daemon(
        tmp_path,
        retention_config(dsn, free_port(), enabled=False),
        effects_dsn=dsn,
    )
    try:
        daemon.start().wait_ready()
        client.wait(posting.id, 60, poll_interval=0.05)
        client.wait(failing.id, 60, poll_interval=0.05)
        assert daemon.stop() == 0
    finally:
        daemon.close()
    client.shared(posting.id).set("seed", 42)
    target = tmp_path / "export.jsonl"

    code, out, err = run_cli(
        capsys,
        monkeypatch,
        *("--dsn", dsn, "export", str(posting.id), "--output", str(target)),
    )

    assert (code, out) == (0, ""), err
    assert list(tmp_path.glob(".export.jsonl.*")) == []
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    head, shared, *jobs = lines
    assert head["kind"] == "posting" and head["id"] == str(posting.id)
    assert (head["entry_point"], head["status"]) == (
        "featurejobs.describe",
        "finished",
    )
    assert head["store_result"] is True and head["finished_at"]
    assert shared == {
        "kind": "shared_variable",
        "name": "seed",
        "value": 42,
        "updated_at": shared["updated_at"],
    }
    assert [j["id"] for j in jobs] == [str(i) for i in posting.job_ids]
    results = client.results(posting.id)
    for job, result, args in zip(jobs, results, arguments, strict=True):
        assert job["kind"] == "job" and job["status"] == "done"
        assert job["attempt"] == 1 and job["exited_ok"] is True
        assert job["result_stored"] is True
        assert repr(decode(job["args"])) == repr(args)
        assert repr(decode(job["result"])) == repr(result.value)
        assert job["result"]["job_id"] == job["id"]
    assert [j["kwargs"] for j in jobs] == [{"k": 1}, {}, {"z": None}]

    code, out, err = run_cli(
        capsys, monkeypatch, "--dsn", dsn, "export", str(failing.id)
    )
    assert code == 0, err
    head, job = (json.loads(line) for line in out.splitlines())
    assert (head["status"], job["status"]) == ("finished", "errored_out")
    assert "boom" in job["error"] and "Traceback" in job["traceback"]
    assert job["result_stored"] is False and job["result"] is None
