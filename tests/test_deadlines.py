"""Nothing stalls the supervisor: a poster's lock, a path that drops packets.

The supervisor's loop must keep answering /livez, pinging the watchdog,
reaping and stopping on SIGTERM whatever PostgreSQL or the network does;
its database work happens in the database session, whose statements have
deadlines. Each test makes the fault for real: a submitter role holding a
row lock in an open transaction, and nftables dropping (not refusing) the
packets of the daemon's path to PostgreSQL.
"""

from __future__ import annotations

import itertools
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from devtools.devcluster import free_port
from harness import (
    Daemon,
    Roles,
    TcpRelay,
    daemon_config,
    dropped,
    grant,
    nft_unusable,
    wait_until,
)
from pdoflowd.client import Client
from pdoflowd.status import PostingStatus


def probe(port: int, path: str) -> tuple[int, float]:
    """(HTTP status, seconds it took); status 0 when it did not answer."""
    began = time.monotonic()
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError:
        status = 0
    return status, time.monotonic() - began


class Watch:
    """Probes /livez and reads the watchdog pings for a while."""

    def __init__(self, daemon: Daemon, port: int) -> None:
        self.daemon = daemon
        self.port = port
        self.slowest = 0.0
        self.failures: list[tuple[int, float]] = []
        self.pings: list[float] = []

    def run(self, seconds: float, until: Any = None) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            status, took = probe(self.port, "/livez")
            self.slowest = max(self.slowest, took)
            if status != 200 or took > 1.0:
                self.failures.append((status, took))
            for message in self.daemon.read_notifications(0.05):
                if "WATCHDOG=1" in message.split("\n"):
                    self.pings.append(time.monotonic())
            if until is not None and until():
                return
            time.sleep(0.1)

    def longest_silence(self) -> float:
        gaps = [b - a for a, b in itertools.pairwise(self.pings)]
        return max(gaps, default=float("inf"))


@pytest.mark.slow
def test_a_poster_holding_a_posting_lock_stalls_no_supervisor(
    effects_dsn: str, roles: Roles, tmp_path: Path
) -> None:
    poster = roles.make()
    grant(effects_dsn, submitters=[poster])
    port = free_port()
    daemon = Daemon(
        tmp_path,
        daemon_config(
            effects_dsn,
            metrics={"listen": f"127.0.0.1:{port}"},
            database={"lock_timeout_s": 0.5},
        ),
        effects_dsn=effects_dsn,
        env={"WATCHDOG_USEC": "2000000"},
    )
    hostile = psycopg.connect(roles.dsn_of(poster))
    try:
        daemon.start().wait_ready()
        # A posting with no jobs, which every daemon's maintenance settles,
        # and a transaction that holds its row and never ends.
        empty = uuid.uuid4()
        hostile.execute(
            "INSERT INTO pdoflowd.postings (uuid, target_function,"
            " entry_point) VALUES (%s, 'noop', 'jobfns.noop')",
            (empty,),
        )
        hostile.commit()
        hostile.execute(
            "SELECT * FROM pdoflowd.control_posting(%s, 'pause', NULL)",
            (empty,),
        )
        client = Client(effects_dsn)
        posting = client.post("jobfns.noop", [[i] for i in range(200)])
        watch = Watch(daemon, port)
        watch.run(20.0)
        assert watch.failures == [], watch.failures
        assert watch.longest_silence() < 2.5, watch.pings
        assert client.status(posting.id).status is PostingStatus.FINISHED
        began = time.monotonic()
        assert daemon.stop(timeout=20) == 0
        assert time.monotonic() - began < 10 + 5  # the drain budget, + 5 s
    finally:
        hostile.close()
        daemon.close()
    assert "Traceback" not in daemon.log()


# ---------------------------------------------------------------- dropped


NFT_TABLE = "pdoflowd_test_deadlines"


@pytest.fixture
def relay(effects_dsn: str) -> Iterator[TcpRelay]:
    """The daemon's own path to PostgreSQL, through 127.0.0.2."""
    reason = nft_unusable(NFT_TABLE)
    if reason and os.environ.get("PDOFLOWD_PARTITION_TEST_REQUIRED"):
        pytest.fail(f"a partition cannot be made here: {reason}")
    if reason:
        pytest.skip(f"NO PARTITION: {reason}")
    params = conninfo_to_dict(effects_dsn)
    path = TcpRelay(
        (str(params["host"]), int(params["port"] or 5432)), host="127.0.0.2"
    )
    try:
        yield path
    finally:
        path.close()


@pytest.mark.slow
def test_a_path_that_drops_packets_stalls_no_supervisor(
    effects_dsn: str, tmp_path: Path, relay: TcpRelay
) -> None:
    through = make_conninfo(effects_dsn, host=relay.host, port=str(relay.port))
    port = free_port()
    daemon = Daemon(
        tmp_path,
        daemon_config(
            through,
            metrics={"listen": f"127.0.0.1:{port}"},
            database={"tcp_user_timeout_s": 2.0, "connect_timeout_s": 2.0},
        ),
        effects_dsn=effects_dsn,
        env={"WATCHDOG_USEC": "2000000"},
    )
    try:
        daemon.start().wait_ready()
        client = Client(effects_dsn)
        client.post("jobfns.sleep", [[0.05]] * 400)
        watch = Watch(daemon, port)
        with dropped(NFT_TABLE, relay.host, relay.port):
            watch.run(10.0)
            readiness, _ = probe(port, "/readyz")
        assert watch.failures == [], watch.failures
        assert watch.longest_silence() < 2.5, watch.pings
        assert readiness == 503
        # Healed: the daemon reconnects and the queue drains.
        after = client.post("jobfns.noop", [[1]])
        state = client.wait(after.id, timeout=60, poll_interval=0.2)
        assert state.status is PostingStatus.FINISHED
        wait_until(lambda: probe(port, "/readyz")[0] == 200, timeout=30)
        assert daemon.stop(timeout=30) == 0
    finally:
        daemon.close()


@pytest.mark.slow
def test_a_partitioned_host_is_rescued_fenced_and_stays_responsive(
    effects_dsn: str, tmp_path: Path, relay: TcpRelay
) -> None:
    """Host B reaches PostgreSQL through a path that is cut (packets
    dropped) while its jobs run; host A takes them back after B's lease and
    runs them; B's late outcomes are fenced off, its /livez answers
    throughout, and after the heal it rejoins."""
    lease = 3.0
    timing = {
        "heartbeat_interval_s": 0.3,
        "host_lease_s": lease,
        "maintenance_interval_s": 0.2,
    }
    workers = {"count": 2, "batch_size": 1, "poll_interval_s": 0.2}
    port_b = free_port()
    host_b = Daemon(
        tmp_path,
        daemon_config(
            make_conninfo(effects_dsn, host=relay.host, port=str(relay.port)),
            workers=workers,
            daemon=timing,
            metrics={"listen": f"127.0.0.1:{port_b}"},
            database={"tcp_user_timeout_s": 2.0, "connect_timeout_s": 2.0},
        ),
        effects_dsn=effects_dsn,
        name="b",
    )
    host_a = Daemon(
        tmp_path,
        daemon_config(effects_dsn, workers=workers, daemon=timing),
        effects_dsn=effects_dsn,
        name="a",
    )
    try:
        host_b.start().wait_ready()
        client = Client(effects_dsn)
        posting = client.post(
            "jobfns.sleep", [[3.0, f"k{i}"] for i in range(8)]
        )
        id_b = wait_until(lambda: daemon_of(effects_dsn, host_b.pid))
        wait_until(lambda: len(running_under(effects_dsn, id_b)) == 2)
        host_a.start().wait_ready()
        id_a = daemon_of(effects_dsn, host_a.pid)
        watch = Watch(host_b, port_b)
        with dropped(NFT_TABLE, relay.host, relay.port):
            cut_off = running_under(effects_dsn, id_b)
            assert len(cut_off) == 2
            # B's jobs come back after its lease and run on A.
            watch.run(
                lease * 4,
                until=lambda: set(cut_off) <= set(done_by(effects_dsn, id_a)),
            )
            assert set(cut_off) <= set(done_by(effects_dsn, id_a))
            watch.run(3.0)
        assert watch.failures == [], watch.failures
        state = client.wait(posting.id, timeout=60, poll_interval=0.2)
        assert state.status is PostingStatus.FINISHED
        # B, healed, rejoins: ready again, and its late outcomes for the
        # jobs taken from it changed nothing.
        wait_until(lambda: probe(port_b, "/readyz")[0] == 200, timeout=30)
        assert set(cut_off) <= set(done_by(effects_dsn, id_a))
        runs = runs_per_key(effects_dsn)
        assert set(runs) == {f"k{i}" for i in range(8)}
        # At most the run cut off and the rescued run, for those two.
        assert max(runs.values()) <= 2, runs
        assert host_b.stop(timeout=30) == 0
        assert host_a.stop(timeout=30) == 0
    finally:
        host_a.close()
        host_b.close()


def daemon_of(dsn: str, pid: int) -> str | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT id::text FROM pdoflowd.daemons WHERE pid = %s", (pid,)
        ).fetchone()
    return None if row is None else str(row[0])


def running_under(dsn: str, daemon_id: str | None) -> list[int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id FROM pdoflowd.jobs WHERE status = 'executing'"
            " AND daemon_id = %s::uuid",
            (daemon_id,),
        ).fetchall()
    return [r[0] for r in rows]


def done_by(dsn: str, daemon_id: str | None) -> list[int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id FROM pdoflowd.jobs WHERE status = 'done'"
            " AND daemon_id = %s::uuid",
            (daemon_id,),
        ).fetchall()
    return [r[0] for r in rows]


def runs_per_key(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT key, count(*) FROM effects WHERE note = 'start'"
            " GROUP BY key"
        ).fetchall()
    return {str(key): int(count) for key, count in rows}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_unreachable_database_costs_the_session_no_busy_loop(
    tmp_path: Path,
) -> None:
    daemon = Daemon(
        tmp_path,
        daemon_config("host=127.0.0.1 port=1 dbname=nowhere connect_timeout=1"),
    )
    try:
        daemon.start()
        session = wait_until(daemon.session_pid, timeout=10)
        before = cpu_seconds(session)
        time.sleep(3.0)
        # Waiting for the next attempt, not spinning: a busy loop burns
        # about one CPU second per second.
        assert cpu_seconds(session) - before < 0.5
    finally:
        daemon.close()
