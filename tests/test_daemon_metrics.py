"""The real daemon's endpoint: exact counts, health, Prometheus' format.

Every claim ends in exactly one outcome, so after a run the outcomes
counted over all workers (including ones that died or retired) must add up
to the attempts the database recorded, outcome by outcome.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg

from devtools.devcluster import free_port
from harness import Daemon, create_effects_table, daemon_config, wait_until
from pdoflowd.client import Client
from scrape import parse_scrape, promtool_check_metrics, scrape_sum


def fetch(port: int, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def database_counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT sum(attempt),"
            " count(*) FILTER (WHERE status = 'done'),"
            " count(*) FILTER (WHERE status = 'errored_out'),"
            " count(*) FILTER (WHERE status IN ('waiting', 'executing'))"
            " FROM pdoflowd.jobs"
        ).fetchone()
    assert row is not None
    attempts, done, errored, open_ = row
    return {
        "attempts": int(attempts),
        "done": done,
        "errored_out": errored,
        "open": open_,
    }


def test_counters_over_all_workers_equal_what_the_database_recorded(
    dsn: str, tmp_path: Path, promtool: str
) -> None:
    create_effects_table(dsn)
    port = free_port()
    daemon = Daemon(
        tmp_path,
        daemon_config(
            dsn,
            workers={"count": 2, "max_jobs_per_worker": 40},
            metrics={
                "listen": f"127.0.0.1:{port}",
                "queue_stats_interval_s": 1.0,
            },
        ),
        effects_dsn=dsn,
    )
    try:
        daemon.start().wait_ready()
        assert fetch(port, "/readyz")[0] == 200
        assert fetch(port, "/livez")[0] == 200
        client = Client(dsn)
        postings = [
            client.post("jobfns.record", [[f"r{i}"] for i in range(150)]),
            client.post("jobfns.fail", [["x"]] * 4, tries=2),
            client.post("jobfns.kill_self_once", [["k1"], ["k2"]]),
            client.post("jobfns.spin", [[30]], tries=1, timeout_s=0.3),
        ]
        for posting in postings:
            client.wait(posting.id, 60, poll_interval=0.05)
        recorded = database_counts(dsn)
        assert recorded["open"] == 0

        def settled() -> Any:
            scrape = parse_scrape(fetch(port, "/metrics")[1])
            total = scrape_sum(scrape, "pdoflowd_jobs_processed_total")
            return scrape if total == recorded["attempts"] else None

        scrape = wait_until(settled, timeout=15)
        processed = "pdoflowd_jobs_processed_total"
        assert (
            scrape_sum(scrape, processed, outcome="done") == (recorded["done"])
        )
        assert scrape_sum(scrape, processed, outcome="worker_died") == 2
        assert scrape_sum(scrape, processed, outcome="timeout") == 1
        assert scrape_sum(scrape, processed, outcome="failed") == 4
        assert scrape_sum(scrape, processed, outcome="errored_out") == 4
        assert (
            scrape_sum(scrape, "pdoflowd_jobs_claimed_total")
            == (recorded["attempts"])
        )
        assert (
            scrape_sum(
                scrape, "pdoflowd_worker_restarts_total", reason="max_jobs"
            )
            >= 1
        )
        # A worker may be between retirement and its replacement.
        wait_until(
            lambda: (
                scrape_sum(
                    parse_scrape(fetch(port, "/metrics")[1]), "pdoflowd_workers"
                )
                == 2
            )
        )
        assert scrape_sum(scrape, "pdoflowd_build_info") == 1 and scrape_sum(
            scrape, "pdoflowd_job_queue_wait_seconds_count"
        )
        promtool_check_metrics(promtool, fetch(port, "/metrics")[1].encode())
        assert daemon.stop() == 0
    finally:
        daemon.close()


def test_readyz_says_not_ready_while_draining(dsn: str, tmp_path: Path) -> None:
    create_effects_table(dsn)
    port = free_port()
    daemon = Daemon(
        tmp_path,
        daemon_config(
            dsn,
            workers={"count": 1, "drain_timeout_s": 10.0},
            metrics={"listen": f"127.0.0.1:{port}"},
        ),
        effects_dsn=dsn,
    )
    try:
        daemon.start().wait_ready()
        Client(dsn).post("jobfns.sleep", [[2.0, "d"]])
        with psycopg.connect(dsn) as conn:
            wait_until(
                lambda: (
                    conn.execute(
                        "SELECT count(*) FROM effects WHERE key = 'd'"
                    ).fetchone()
                    == (1,)
                )
            )
        daemon.send(15)
        _, body = wait_until(
            lambda: (r := fetch(port, "/readyz"))[0] == 503 and r, timeout=5
        )
        assert "draining" in body
        assert fetch(port, "/livez")[0] == 200
        assert daemon.wait(30) == 0
    finally:
        daemon.close()
