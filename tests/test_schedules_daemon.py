"""Schedules on real daemons: each fire time posted once across daemons,
backfill after downtime, reload, metrics, ``pdoflow schedules``, and the
daemon role's privileges."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.devcluster import free_port
from harness import (
    Daemon,
    daemon_config,
    grant,
    migrate_before,
    wait_until,
    write_config,
)
from pdoflowd.cli.command import main as pdoflow
from scrape import parse_scrape, promtool_check_metrics, scrape_value

SECOND = dt.timedelta(seconds=1)


def every(name: str, seconds: int, **more: Any) -> dict[str, Any]:
    return {
        "name": name,
        "entry_point": "jobfns.noop",
        "every_s": seconds,
        **more,
    }


def runs(dsn: str, schedule: str) -> list[tuple[dt.datetime, dt.datetime]]:
    """(fire time, when posted) of a schedule's runs, oldest first."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT run_at, posted_at FROM pdoflowd.schedule_runs"
            " WHERE schedule = %s ORDER BY run_at",
            (schedule,),
        ).fetchall()


def fire_times(dsn: str, schedule: str) -> list[dt.datetime]:
    return [run_at for run_at, _ in runs(dsn, schedule)]


def published_at(dsn: str, daemon: Daemon) -> dt.datetime:
    """When the daemon's session published its schedules: the database
    time its scheduler began to watch from."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT s.published_at FROM pdoflowd.schedules AS s"
            " JOIN pdoflowd.daemons AS d ON d.id = s.daemon_id"
            " WHERE d.pid = %s AND d.stopped_at IS NULL",
            (daemon.pid,),
        ).fetchone()
    assert row is not None
    return row[0]


# Fire times the two-daemon test waits for: 12 in make test; set
# PDOFLOWD_TEST_SCHEDULE_RUNS=60 for the minute the issue asks for.
TWO_DAEMON_RUNS = int(os.environ.get("PDOFLOWD_TEST_SCHEDULE_RUNS", "12"))


@pytest.mark.slow
def test_two_daemons_post_each_fire_time_exactly_once(
    effects_dsn: str, daemons: Any
) -> None:
    schedule = [every("tick", 1)]
    first = daemons(schedules=schedule)
    second = daemons(schedules=schedule)
    wait_until(
        lambda: len(fire_times(effects_dsn, "tick")) >= TWO_DAEMON_RUNS,
        timeout=TWO_DAEMON_RUNS + 30,
    )
    assert first.stop(signal.SIGTERM) == 0
    assert second.stop(signal.SIGTERM) == 0
    times = fire_times(effects_dsn, "tick")
    # No gaps, no duplicates (the primary key forbids those anyway).
    assert all(b - a == SECOND for a, b in itertools.pairwise(times)), times
    with psycopg.connect(effects_dsn) as conn:
        postings = conn.execute(
            "SELECT count(*), count(DISTINCT p.idempotency_key),"
            " count(DISTINCT r.daemon_id), count(DISTINCT j.id)"
            " FROM pdoflowd.schedule_runs AS r"
            " JOIN pdoflowd.postings AS p ON p.id = r.posting_id"
            " JOIN pdoflowd.jobs AS j ON j.posting_id = p.id"
        ).fetchone()
        keys = conn.execute(
            "SELECT idempotency_key, key_scope FROM pdoflowd.postings"
            " ORDER BY id LIMIT 1"
        ).fetchone()
        entry = conn.execute(
            "SELECT DISTINCT entry_point, target_function"
            " FROM pdoflowd.postings"
        ).fetchall()
    assert postings is not None
    count, distinct_keys, posters, jobs = postings
    assert count == distinct_keys == jobs == len(times)
    assert posters in (1, 2)
    assert keys == (f"schedule:tick:{times[0].isoformat()}", "forever")
    assert entry == [("jobfns.noop", "noop")]


@pytest.mark.slow
def test_a_daemon_down_for_several_periods_backfills_exactly_backfill(
    effects_dsn: str, daemons: Any
) -> None:
    config = {"schedules": [every("beat", 1, backfill=2)]}
    daemon = daemons(**config)
    wait_until(lambda: len(fire_times(effects_dsn, "beat")) >= 3, timeout=30)
    assert daemon.stop(signal.SIGTERM) == 0
    last_before = fire_times(effects_dsn, "beat")[-1]
    time.sleep(7)  # about six fire times pass with nobody watching
    again = daemons(**config)
    watched = published_at(effects_dsn, again)
    wait_until(
        lambda: fire_times(effects_dsn, "beat")[-1] >= watched + 2 * SECOND,
        timeout=30,
    )
    after = [t for t in fire_times(effects_dsn, "beat") if t > last_before]
    # Missed: the fire times whose grace (one period) ended before anyone
    # watched again. Exactly the newest two of them were posted.
    missed = []
    moment = last_before + SECOND
    while moment + SECOND <= watched:
        missed.append(moment)
        moment += SECOND
    assert len(missed) >= 4, (last_before, watched)
    assert [t for t in after if t + SECOND <= watched] == missed[-2:]
    on_time = [t for t in after if t + SECOND > watched]
    assert on_time[0] == moment
    assert all(b - a == SECOND for a, b in itertools.pairwise(on_time))


def test_reload_adds_and_removes_schedules(
    effects_dsn: str, daemons: Any
) -> None:
    daemon = daemons(schedules=[every("old", 1)])
    wait_until(lambda: fire_times(effects_dsn, "old"), timeout=30)
    write_config(
        daemon.config_path,
        daemon_config(effects_dsn, schedules=[every("new", 1)]),
    )
    daemon.send(signal.SIGHUP)
    wait_until(lambda: len(fire_times(effects_dsn, "new")) >= 2, timeout=30)
    stopped_at = fire_times(effects_dsn, "old")[-1]
    time.sleep(2.5)
    assert fire_times(effects_dsn, "old")[-1] == stopped_at
    assert len(fire_times(effects_dsn, "new")) >= 4
    # A bad schedule is refused on reload: the running ones go on.
    write_config(
        daemon.config_path,
        daemon_config(
            effects_dsn,
            schedules=[
                {"name": "bad", "entry_point": "jobfns.noop", "cron": "x"}
            ],
        ),
    )
    daemon.send(signal.SIGHUP)
    daemon.wait_for_text("schedules[0].cron", timeout=30)
    count = len(fire_times(effects_dsn, "new"))
    wait_until(lambda: len(fire_times(effects_dsn, "new")) > count + 1)
    assert not fire_times(effects_dsn, "bad")


def fetch_metrics(port: int) -> str:
    import urllib.request

    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def test_schedule_metrics_on_a_real_scrape(
    effects_dsn: str, tmp_path: Path, promtool: str
) -> None:
    port = free_port()
    config = daemon_config(
        effects_dsn,
        metrics={"listen": f"127.0.0.1:{port}"},
        schedules=[every("tick", 1), every("slow", 3600)],
    )
    daemon = Daemon(tmp_path, config, effects_dsn=effects_dsn)
    try:
        daemon.start().wait_ready()
        wait_until(
            lambda: len(fire_times(effects_dsn, "tick")) >= 3, timeout=30
        )

        def scraped() -> Any:
            scrape = parse_scrape(fetch_metrics(port))
            ran = scrape_value(
                scrape, "pdoflowd_schedule_runs_total", schedule="tick"
            )
            return scrape if ran >= 3 else None

        scrape = wait_until(scraped, timeout=30)
        newest = fire_times(effects_dsn, "tick")[-1].timestamp()
        last = scrape_value(
            scrape,
            "pdoflowd_schedule_last_run_timestamp_seconds",
            schedule="tick",
        )
        assert newest - 5 <= last <= newest
        assert (
            scrape_value(
                scrape, "pdoflowd_schedule_runs_total", schedule="slow"
            )
            == 0
        )
        promtool_check_metrics(promtool, fetch_metrics(port).encode())
        # A reload that removes a schedule removes its series.
        write_config(
            daemon.config_path,
            daemon_config(
                effects_dsn,
                metrics={"listen": f"127.0.0.1:{port}"},
                schedules=[every("tick", 1)],
            ),
        )
        daemon.send(signal.SIGHUP)
        wait_until(
            lambda: 'schedule="slow"' not in fetch_metrics(port), timeout=30
        )
    finally:
        daemon.close()


def test_pdoflow_schedules_lists_last_and_next_runs(
    effects_dsn: str, daemons: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    daemons(
        schedules=[
            every("tick", 1, priority=3),
            {
                "name": "nightly",
                "entry_point": "jobfns.noop",
                "cron": "0 3 * * *",
                "timezone": "Europe/Paris",
                "args": [1, "two"],
                "kwargs": {"flag": True},
            },
        ]
    )
    wait_until(lambda: len(fire_times(effects_dsn, "tick")) >= 2, timeout=30)
    assert pdoflow(["--dsn", effects_dsn, "schedules", "--json"]) == 0
    listed = {s["name"]: s for s in json.loads(capsys.readouterr().out)}
    assert set(listed) == {"tick", "nightly"}
    tick, nightly = listed["tick"], listed["nightly"]
    assert tick["every_s"] == 1 and tick["priority"] == 3
    assert tick["last_posting"] and tick["last_posting_status"]
    last = dt.datetime.fromisoformat(tick["last_run_at"])
    upcoming = dt.datetime.fromisoformat(tick["next_run_at"])
    assert last < upcoming <= last + 30 * SECOND
    assert nightly["last_run_at"] is None and nightly["last_posting"] is None
    assert nightly["args"] == [1, "two"] and nightly["kwargs"] == {"flag": True}
    assert nightly["cron"] == "0 3 * * *"
    assert nightly["timezone"] == "Europe/Paris"
    assert dt.datetime.fromisoformat(nightly["next_run_at"]).astimezone(
        dt.timezone.utc
    ).hour in (1, 2)
    assert len(tick["hosts"]) == 1
    assert pdoflow(["--dsn", effects_dsn, "schedules"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "ENTRY",
        "POINT",
        "WHEN",
        "HOSTS",
        "LAST",
        "RUN",
        "NEXT",
        "RUN",
        "LAST",
        "POSTING",
    ]
    assert lines[1].startswith("nightly ")
    assert "0 3 * * * (Europe/Paris)" in lines[1]
    assert lines[2].startswith("tick ") and "every 1 s" in lines[2]


def test_pdoflow_schedules_without_live_daemons(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pdoflow(["--dsn", dsn, "schedules"]) == 0
    assert capsys.readouterr().out == "no schedules: no live daemon runs any\n"
    assert pdoflow(["--dsn", dsn, "schedules", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_a_daemon_role_posts_schedules_and_a_submitter_cannot_list_them(
    effects_dsn: str,
    roles: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    daemon_role, submitter = roles.make(), roles.make()
    grant(effects_dsn, daemons=[daemon_role], submitters=[submitter])
    with psycopg.connect(effects_dsn, autocommit=True) as conn:
        conn.execute(f'GRANT INSERT ON effects TO "{daemon_role}"')
    daemon = Daemon(
        tmp_path,
        daemon_config(roles.dsn_of(daemon_role), schedules=[every("tick", 1)]),
        effects_dsn=effects_dsn,
    )
    try:
        daemon.start().wait_ready()
        wait_until(
            lambda: len(fire_times(effects_dsn, "tick")) >= 2, timeout=30
        )
        with psycopg.connect(effects_dsn) as conn:
            row = conn.execute(
                "SELECT DISTINCT poster FROM pdoflowd.postings"
            ).fetchall()
        assert row == [(daemon_role,)]
        assert pdoflow(["--dsn", roles.dsn_of(daemon_role), "schedules"]) == 0
        assert "tick" in capsys.readouterr().out
        with pytest.raises(SystemExit) as exited:
            pdoflow(["--dsn", roles.dsn_of(submitter), "schedules"])
        assert exited.value.code == 69
        assert "needs the daemon's privileges" in capsys.readouterr().err
    finally:
        daemon.close()


def test_an_upgrade_gives_older_daemon_roles_what_schedules_need(
    empty_dsn: str, empty_roles: Any
) -> None:
    from psycopg import sql

    from pdoflowd.db import migrate

    role = empty_roles.make()
    new_grants = [
        g for g in migrate.DAEMON_GRANTS if "schedule" in g or "INSERT (" in g
    ]
    assert len(new_grants) == 3
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        with conn.transaction():
            pending = migrate_before(conn, "schedule_runs")
            for template in migrate.DAEMON_GRANTS:
                # Objects of later versions do not exist yet.
                later = "posting_dependencies" in template
                if template not in new_grants and not later:
                    conn.execute(
                        sql.SQL(template).format(role=sql.Identifier(role))
                    )
        assert migrate.upgrade_connection(conn) == pending
        checks = conn.execute(
            "SELECT has_column_privilege(%(r)s, 'pdoflowd.postings',"
            "  'idempotency_key', 'INSERT'),"
            " has_column_privilege(%(r)s, 'pdoflowd.jobs', 'posargs',"
            "  'INSERT'),"
            " has_column_privilege(%(r)s, 'pdoflowd.postings', 'poster',"
            "  'INSERT'),"
            " (SELECT bool_and(has_table_privilege(%(r)s, t, p))"
            "  FROM unnest(ARRAY['pdoflowd.schedule_runs',"
            "                    'pdoflowd.schedules']) AS t,"
            "       unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE'])"
            "       AS p)",
            {"r": role},
        ).fetchone()
    assert checks == (True, True, False, True)


def test_a_reload_without_schedules_unpublishes_them(
    effects_dsn: str, daemons: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = daemons(schedules=[every("tick", 1)])
    wait_until(lambda: fire_times(effects_dsn, "tick"), timeout=30)
    write_config(daemon.config_path, daemon_config(effects_dsn))
    daemon.send(signal.SIGHUP)

    def listed() -> list[Any]:
        assert pdoflow(["--dsn", effects_dsn, "schedules", "--json"]) == 0
        return list(json.loads(capsys.readouterr().out))

    wait_until(lambda: listed() == [], timeout=30)
    last = fire_times(effects_dsn, "tick")[-1]
    time.sleep(2)
    assert fire_times(effects_dsn, "tick")[-1] == last


def test_a_claim_held_past_the_lock_timeout_is_posted_later(
    effects_dsn: str, daemons: Any, tmp_path: Path
) -> None:
    daemons(
        schedules=[every("tick", 1)],
        database={"lock_timeout_s": 0.3},
    )
    wait_until(lambda: fire_times(effects_dsn, "tick"), timeout=30)
    with psycopg.connect(effects_dsn) as conn:
        row = conn.execute(
            "SELECT date_trunc('second', now()) + interval '2 s'"
        ).fetchone()
        assert row is not None
        held = row[0]
        # Another daemon's claim of the next-but-one fire time, not yet
        # committed: this daemon's claim of it waits, past its lock timeout.
        conn.execute(
            "INSERT INTO pdoflowd.schedule_runs (schedule, run_at, daemon_id)"
            " VALUES ('tick', %s, gen_random_uuid())",
            (held,),
        )
        time.sleep(3.5)
        log = (tmp_path / "daemon0.log").read_text()
        assert "not posted this pass" in log
        conn.rollback()
    wait_until(lambda: held in fire_times(effects_dsn, "tick"), timeout=10)
    times = fire_times(effects_dsn, "tick")
    assert all(b - a == SECOND for a, b in itertools.pairwise(times)), times
    log = (tmp_path / "daemon0.log").read_text()
    assert "database unreachable" not in log
    assert "schedules failed" not in log
