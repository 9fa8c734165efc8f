"""A PostgreSQL failover under a draining daemon: nothing stays stuck.

Each test makes a primary and a streaming standby of its own
(``pg_basebackup -R``), points a daemon at both through a multi-host DSN
with ``target_session_attrs=read-write``, stops the primary with
``pg_ctl -m immediate`` while the queue drains and promotes the standby.
Caught up, the standby has what the primary had. Lagging (its replication
connection's packets dropped by nftables for a second first), it comes
back with claims whose outcomes it never received: jobs ``executing``
under owner tokens their workers have long moved past. Every job must
still end done, without restarting the daemon, and /livez must answer
throughout.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from devtools.devcluster import LocalCluster, find_bin_dir, free_port
from harness import (
    Daemon,
    TcpRelay,
    create_effects_table,
    daemon_config,
    dropped,
    job_counts,
    nft_unusable,
    wait_until,
)
from pdoflowd.client import Client
from pdoflowd.db.migrate import upgrade
from pdoflowd.status import PostingStatus

DATABASE = "pdoflowd_failover"
SERVER_USER = "postgres"
NFT_TABLE = "pdoflowd_test_failover"
LEASE_S = 3.0
HEARTBEAT_S = 0.3
# Jobs that touch no database, so a failover never fails one: each ends
# done, by its run's outcome or by a run again.
JOB_S = 0.02


# ------------------------------------------------------ primary and standby


def as_server(argv: list[str]) -> list[str]:
    """Run a server binary as the server user when we are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", SERVER_USER, "--", *argv]
    return argv


def server_tool(argv: list[str], cwd: Path) -> None:
    done = subprocess.run(
        as_server(argv),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr}"
        )


def give_to_server_user(path: Path) -> None:
    if os.geteuid() != 0:
        return
    account = pwd.getpwnam(SERVER_USER)
    for each in [path, *path.rglob("*")]:
        os.chown(each, account.pw_uid, account.pw_gid)


@dataclass
class Pair:
    """A primary, its standby, and the path the standby replicates over."""

    primary: LocalCluster
    standby: LocalCluster
    relay: TcpRelay | None

    @property
    def primary_dsn(self) -> str:
        return self.primary.dsn(DATABASE)

    @property
    def standby_dsn(self) -> str:
        return self.standby.dsn(DATABASE)

    @property
    def multi_host_dsn(self) -> str:
        return make_conninfo(
            "",
            host="127.0.0.1,127.0.0.1",
            port=f"{self.primary.port},{self.standby.port}",
            dbname=DATABASE,
            user=SERVER_USER,
            target_session_attrs="read-write",
        )

    def promote(self) -> None:
        bin_dir = find_bin_dir()
        server_tool(
            [
                str(bin_dir / "pg_ctl"),
                "promote",
                "-w",
                "-t",
                "60",
                "-D",
                str(self.standby.data_dir),
            ],
            cwd=self.standby.base_dir,
        )


@contextlib.contextmanager
def replicated_pair(through_relay: bool) -> Iterator[Pair]:
    """A migrated primary (with ``effects``) and a streaming standby.

    With ``through_relay`` the standby replicates through a TCP relay on
    127.0.0.2, a path a test can cut without touching the daemon's own
    connections to the primary.
    """
    base = Path(tempfile.mkdtemp(prefix="pdoflowd-failover-"))
    base.chmod(0o755)
    primary = LocalCluster(
        base / "primary",
        settings={"wal_level": "replica", "max_wal_senders": "5"},
    )
    standby: LocalCluster | None = None
    relay: TcpRelay | None = None
    try:
        primary.init()
        primary.start()
        primary.create_database(DATABASE)
        upgrade(primary.dsn(DATABASE))
        create_effects_table(primary.dsn(DATABASE))
        source = ("127.0.0.1", primary.port)
        if through_relay:
            relay = TcpRelay(source, host="127.0.0.2")
            source = (relay.host, relay.port)
        standby_base = base / "standby"
        (standby_base / "run").mkdir(parents=True)
        give_to_server_user(standby_base)
        server_tool(
            [
                str(find_bin_dir() / "pg_basebackup"),
                "-h",
                source[0],
                "-p",
                str(source[1]),
                "-U",
                SERVER_USER,
                "-D",
                str(standby_base / "data"),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
            cwd=standby_base,
        )
        standby_port = free_port()
        with (standby_base / "data" / "postgresql.auto.conf").open("a") as f:
            f.write(
                f"port = {standby_port}\n"
                f"unix_socket_directories = '{standby_base / 'run'}'\n"
            )
        standby = LocalCluster(standby_base, port=standby_port)
        standby.start()
        pair = Pair(primary, standby, relay)
        wait_until(lambda: streaming(pair), timeout=30, interval=0.1)
        yield pair
    finally:
        if relay is not None:
            relay.close()
        for cluster in (standby, primary):
            if cluster is not None:
                with contextlib.suppress(Exception):
                    cluster.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


def streaming(pair: Pair) -> bool:
    with psycopg.connect(pair.primary_dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
        ).fetchone()
    return row is not None and row[0] > 0


def caught_up(pair: Pair) -> bool:
    """Whether the standby replayed all the primary had written just now."""
    with psycopg.connect(pair.primary_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
        assert row is not None
        written = row[0]
    with psycopg.connect(pair.standby_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (written,)
        ).fetchone()
    return row is not None and bool(row[0])


# ------------------------------------------------------------------ faults


# ----------------------------------------------------------------- watching


class Livez:
    """Probes the daemon's /livez; any answer but a prompt 200 is kept."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.probes = 0
        self.failures: list[tuple[int, float]] = []

    def probe(self) -> None:
        began = time.monotonic()
        url = f"http://127.0.0.1:{self.port}/livez"
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        except OSError:
            status = 0
        took = time.monotonic() - began
        self.probes += 1
        if status != 200 or took > 1.0:
            self.failures.append((status, took))


def wait_probing(
    predicate: Callable[[], bool],
    livez: Livez,
    timeout: float,
    what: Callable[[], str],
) -> float:
    """Seconds until ``predicate`` holds, probing /livez meanwhile."""
    began = time.monotonic()
    while True:
        livez.probe()
        if predicate():
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise AssertionError(f"not within {timeout} s: {what()}")
        time.sleep(0.1)


def executing_jobs(dsn: str) -> dict[int, str]:
    """Executing jobs and their owner tokens."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id, owner::text FROM pdoflowd.jobs"
            " WHERE status = 'executing'"
        ).fetchall()
    return {int(row[0]): str(row[1]) for row in rows}


def done_jobs(dsn: str) -> set[int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id FROM pdoflowd.jobs WHERE status = 'done'"
        ).fetchall()
    return {int(row[0]) for row in rows}


def unfinished(dsn: str, ids: set[int] | None = None) -> str:
    """The jobs of ``ids`` (default: all) not done yet, for a failure."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id, status, attempt, owner, daemon_id, claimed_at"
            " FROM pdoflowd.jobs WHERE status <> 'done'"
            " AND (%s::bigint[] IS NULL OR id = ANY(%s::bigint[]))"
            " ORDER BY id",
            (None if ids is None else sorted(ids),) * 2,
        ).fetchall()
        beats = conn.execute(
            "SELECT id, pid, heartbeat_at, stopped_at, now()"
            " FROM pdoflowd.daemons"
        ).fetchall()
    return "\n".join(
        ["not done (id, status, attempt, owner, daemon, claimed):"]
        + [repr(row) for row in rows]
        + ["daemons (id, pid, heartbeat, stopped, now):"]
        + [repr(row) for row in beats]
    )


def log_tail(daemon: Daemon, lines: int = 40) -> str:
    return "\n".join(daemon.log().splitlines()[-lines:])


def attempts(dsn: str, ids: set[int]) -> list[int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT attempt FROM pdoflowd.jobs WHERE id = ANY(%s)",
            (sorted(ids),),
        ).fetchall()
    return [int(row[0]) for row in rows]


def all_done(dsn: str, total: int) -> bool:
    with contextlib.suppress(psycopg.OperationalError):
        return job_counts(dsn) == {"done": total}
    return False


def failover_daemon(tmp_path: Path, pair: Pair, metrics_port: int) -> Daemon:
    dsn = pair.multi_host_dsn
    return Daemon(
        tmp_path,
        daemon_config(
            dsn,
            workers={
                "count": 2,
                "batch_size": 5,
                "poll_interval_s": 0.2,
                # Outcomes wait a little in the workers: more claims reach
                # the standby without their outcomes.
                "outcome_flush_ms": 200,
            },
            daemon={
                "heartbeat_interval_s": HEARTBEAT_S,
                "host_lease_s": LEASE_S,
                "maintenance_interval_s": 0.2,
            },
            database={"connect_timeout_s": 2.0, "tcp_user_timeout_s": 2.0},
            metrics={"listen": f"127.0.0.1:{metrics_port}"},
        ),
        effects_dsn=dsn,
    )


def drain_until(pair: Pair, done: int) -> None:
    wait_until(
        lambda: len(done_jobs(pair.primary_dsn)) >= done,
        timeout=30,
        interval=0.05,
    )


def finish(
    daemon: Daemon, pair: Pair, posting_id: Any, total: int, livez: Livez
) -> float:
    """Wait for every job and the posting to end, on the new primary; stop
    the daemon, which must have lived through it all; the seconds taken."""
    took = wait_probing(
        lambda: all_done(pair.standby_dsn, total),
        livez,
        timeout=60,
        what=lambda: (
            "every job done on the promoted standby\n"
            + unfinished(pair.standby_dsn)
            + "\n"
            + log_tail(daemon)
        ),
    )
    client = Client(pair.standby_dsn)
    wait_until(
        lambda: client.status(posting_id).status is PostingStatus.FINISHED,
        timeout=10,
        interval=0.1,
    )
    assert daemon.proc is not None and daemon.proc.poll() is None, (
        f"the daemon did not live through the failover:\n{daemon.log()}"
    )
    livez.probe()
    assert livez.failures == [], livez.failures
    assert daemon.stop(signal.SIGTERM, timeout=30) == 0, daemon.log()
    return took


# -------------------------------------------------------------------- tests


@pytest.mark.slow
def test_a_failover_to_a_caught_up_standby_loses_nothing(
    tmp_path: Path,
) -> None:
    total = 300
    with replicated_pair(through_relay=False) as pair:
        metrics_port = free_port()
        livez = Livez(metrics_port)
        daemon = failover_daemon(tmp_path, pair, metrics_port)
        try:
            daemon.start().wait_ready()
            client = Client(pair.multi_host_dsn)
            posting = client.post("jobfns.sleep", [[JOB_S]] * total)
            drain_until(pair, 50)
            wait_until(lambda: caught_up(pair), timeout=10, interval=0.02)
            pair.primary.stop("immediate")
            livez.probe()
            restored = executing_jobs(pair.standby_dsn)
            pair.promote()
            took = finish(daemon, pair, posting.id, total, livez)
            print(
                f"caught up: {len(restored)} jobs restored executing;"
                f" all {total} done {took:.1f} s after promotion"
            )
        finally:
            daemon.close()


@pytest.mark.slow
def test_a_failover_to_a_lagging_standby_leaves_no_job_stuck(
    tmp_path: Path,
) -> None:
    reason = nft_unusable(NFT_TABLE)
    if reason and os.environ.get("PDOFLOWD_PARTITION_TEST_REQUIRED"):
        pytest.fail(f"replication cannot be held back here: {reason}")
    if reason:
        pytest.skip(f"NO LAGGING STANDBY: {reason}")
    total = 400
    with replicated_pair(through_relay=True) as pair:
        assert pair.relay is not None
        metrics_port = free_port()
        livez = Livez(metrics_port)
        daemon = failover_daemon(tmp_path, pair, metrics_port)
        try:
            daemon.start().wait_ready()
            client = Client(pair.multi_host_dsn)
            posting = client.post("jobfns.sleep", [[JOB_S]] * total)
            drain_until(pair, 50)
            with dropped(NFT_TABLE, pair.relay.host, pair.relay.port):
                # The standby falls a second behind while the daemon goes
                # on claiming and finishing jobs on the primary.
                time.sleep(1.0)
                done_on_primary = done_jobs(pair.primary_dsn)
                pair.primary.stop("immediate")
                livez.probe()
                # What the standby has now is what it will be promoted
                # with: no more WAL reaches it.
                restored = executing_jobs(pair.standby_dsn)
                pair.promote()
                promoted_at = time.monotonic()
            lost_outcomes = set(restored) & done_on_primary
            print(
                f"lagging: {len(restored)} jobs restored executing,"
                f" {len(lost_outcomes)} of them done on the primary before"
            )
            assert lost_outcomes, (
                "the standby did not lag: no job it restored as executing"
                f" had been done on the primary (restored: {restored})"
            )
            # Taken back and run again, without a restart, within a few
            # leases of the promotion (reconnecting included).
            bound = 3 * LEASE_S + 5.0
            wait_probing(
                lambda: not set(restored) - done_jobs(pair.standby_dsn),
                livez,
                timeout=bound,
                what=lambda: (
                    f"the {len(restored)} jobs restored as executing\n"
                    + unfinished(pair.standby_dsn, set(restored))
                    + "\n"
                    + log_tail(daemon)
                ),
            )
            restored_done = time.monotonic() - promoted_at
            # Run again under a new claim: their workers' tokens had moved on.
            assert min(attempts(pair.standby_dsn, lost_outcomes)) >= 2
            finish(daemon, pair, posting.id, total, livez)
            print(
                f"lagging: restored jobs done {restored_done:.1f} s after"
                f" promotion, all {total}"
                f" {time.monotonic() - promoted_at:.1f} s after it"
            )
        finally:
            daemon.close()
