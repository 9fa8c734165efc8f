"""Concurrency caps in real daemons: max_running and a shared resource
limit kept across two daemons (executing rows sampled concurrently), a
killed worker's slot free at once, and daemons whose jobs.limits differ
told of in the log and on /metrics."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
import uuid
from typing import Any

import psycopg

from devtools.devcluster import free_port
from harness import daemon_config, wait_until, write_config
from pdoflowd.client import Client
from pdoflowd.status import PostingStatus
from scrape import parse_scrape, scrape_value


class Sampler:
    """Counts executing jobs of some postings, as often as it can, from a
    thread of its own, until stopped: the most it saw."""

    def __init__(self, dsn: str, postings: list[uuid.UUID]) -> None:
        self.dsn = dsn
        self.postings = postings
        self.most = 0
        self.samples = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.done.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pdoflowd.jobs AS j"
                    " JOIN pdoflowd.postings AS p ON p.id = j.posting_id"
                    " WHERE j.status = 'executing' AND p.uuid = ANY(%s)",
                    (self.postings,),
                ).fetchone()
                assert row is not None
                self.most = max(self.most, int(row[0]))
                self.samples += 1

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def test_max_running_holds_across_two_daemons(
    effects_dsn: str, daemons: Any
) -> None:
    setup = {"workers": {"count": 3, "batch_size": 5}}
    daemons(**setup)
    daemons(**setup)
    client = Client(effects_dsn)
    posting = client.post(
        "jobfns.sleep", [[0.05] for _ in range(40)], max_running=2
    )
    with Sampler(effects_dsn, [posting.id]) as sampler:
        state = client.wait(posting.id, 60, poll_interval=0.05)
    assert state.status is PostingStatus.FINISHED
    assert sampler.samples > 50
    assert sampler.most == 2


def test_a_resource_limit_is_shared_by_two_postings_across_daemons(
    effects_dsn: str, daemons: Any
) -> None:
    setup = {
        "workers": {"count": 3, "batch_size": 5},
        "jobs": {"allowed_modules": ["jobfns"], "limits": {"tape": 3}},
    }
    daemons(**setup)
    daemons(**setup)
    client = Client(effects_dsn)
    one = client.post(
        "jobfns.sleep", [[0.05] for _ in range(20)], uses=["tape"]
    )
    other = client.post(
        "jobfns.sleep", [[0.05] for _ in range(20)], uses=["tape"]
    )
    with Sampler(effects_dsn, [one.id, other.id]) as sampler:
        for posting in (one, other):
            state = client.wait(posting.id, 60, poll_interval=0.05)
            assert state.status is PostingStatus.FINISHED
    assert sampler.samples > 50
    assert sampler.most == 3


def executing_pids(dsn: str, key: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT pid FROM effects WHERE key = %s AND note = 'start'"
                " ORDER BY id",
                (key,),
            ).fetchall()
        ]


def test_a_killed_worker_frees_its_slot_at_once(
    effects_dsn: str, daemons: Any
) -> None:
    # A lease far longer than the test: only the supervisor's reaping can
    # free the slot in time.
    daemons(
        workers={"count": 2, "batch_size": 1},
        daemon={"host_lease_s": 60.0, "heartbeat_interval_s": 1.0},
    )
    client = Client(effects_dsn)
    # One try: the killed job errors out, so the slot it frees goes to the
    # other job, not to its own next attempt.
    posting = client.post(
        "jobfns.sleep",
        [[30.0, "first"], [0.0, "second"]],
        max_running=1,
        tries=1,
    )
    [pid] = wait_until(lambda: executing_pids(effects_dsn, "first"))
    time.sleep(0.5)
    # The other worker polls, but the cap keeps the second job waiting.
    assert executing_pids(effects_dsn, "second") == []
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: executing_pids(effects_dsn, "second"), timeout=10)
    assert time.monotonic() - killed < 5
    state = client.wait(posting.id, 30, poll_interval=0.05)
    assert state.status is PostingStatus.FINISHED


def scrape(port: int) -> Any:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return parse_scrape(response.read().decode())


def test_daemons_whose_limits_differ_say_so_in_the_log_and_on_metrics(
    effects_dsn: str, daemons: Any
) -> None:
    port = free_port()
    first = daemons(
        jobs={"allowed_modules": ["jobfns"], "limits": {"tape": 2}},
        metrics={"listen": f"127.0.0.1:{port}"},
    )
    wait_until(
        lambda: (
            scrape_value(scrape(port), "pdoflowd_resource_limits_differ") == 0
        )
    )
    second = daemons(
        jobs={"allowed_modules": ["jobfns"], "limits": {"tape": 3}}
    )
    line = wait_until(
        lambda: next(
            (
                entry
                for entry in first.log().splitlines()
                if "jobs.limits differ" in entry
            ),
            None,
        )
    )
    assert '"tape": 2' in line and '"tape": 3' in line
    assert os.uname().nodename in line
    wait_until(
        lambda: (
            scrape_value(scrape(port), "pdoflowd_resource_limits_differ") == 1
        )
    )
    # A reload publishes the new limits: the two agree again.
    write_config(
        second.config_path,
        daemon_config(
            effects_dsn,
            jobs={"allowed_modules": ["jobfns"], "limits": {"tape": 2}},
        ),
    )
    second.send(signal.SIGHUP)
    wait_until(
        lambda: (
            scrape_value(scrape(port), "pdoflowd_resource_limits_differ") == 0
        )
    )
