"""Every executing job has a live owner, whatever breaks that.

A fast stop in the middle of a claim, a claim whose reply is lost after the
server committed it, a claim that commits after its worker was taken back,
workers claiming for a daemon already declared lost: each leaves a job
executing under an owner no live daemon knows, and each must be taken back
within one lease by the same sweep, and then run. The tests make each
fault for real (a trigger that slows the claim, a TCP proxy that loses the
reply, SIGINT, SIGSTOP, SIGKILL) against real daemons.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from harness import (
    Daemon,
    TcpRelay,
    daemon_config,
    job_counts,
    wait_until,
)
from pdoflowd.client import Client
from pdoflowd.db import upkeep
from pdoflowd.status import PostingStatus

LEASE_S = 3.0


def slow_claims(dsn: str, seconds: float, daemon_id: str = "") -> None:
    """Make every claim (of ``daemon_id``'s workers, if given) take longer:
    a trigger sleeps in it, so a test can act while it is in flight."""
    condition = "NEW.status = 'executing'"
    if daemon_id:
        condition += f" AND NEW.daemon_id = '{uuid.UUID(daemon_id)}'"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION public.slow_claim() RETURNS trigger"
            f" LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep({seconds});"
            " RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER slow_claim BEFORE UPDATE ON pdoflowd.jobs"
            f" FOR EACH ROW WHEN ({condition})"
            " EXECUTE FUNCTION public.slow_claim()"
        )


def fast_claims(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TRIGGER IF EXISTS slow_claim ON pdoflowd.jobs")


def claim_in_flight(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE state = 'active' AND query LIKE '%%claim_jobs(%%'"
            " AND pid <> pg_backend_pid()"
        ).fetchone()
    return bool(row and row[0])


def executing_owners(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT j.id, j.owner, j.daemon_id FROM pdoflowd.jobs AS j"
            " WHERE j.status = 'executing'"
        ).fetchall()


def daemon_id_of(dsn: str, pid: int) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT id FROM pdoflowd.daemons WHERE pid = %s"
            " ORDER BY started_at DESC LIMIT 1",
            (pid,),
        ).fetchone()
    assert row is not None
    return str(row[0])


def config(dsn: str, **overrides: Any) -> dict[str, dict[str, Any]]:
    sections = daemon_config(
        dsn,
        workers={"count": 1, "batch_size": 2, "poll_interval_s": 0.2},
        daemon={
            "heartbeat_interval_s": 0.3,
            "host_lease_s": LEASE_S,
            "maintenance_interval_s": 0.2,
        },
    )
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return sections


def all_done(dsn: str, total: int) -> bool:
    return job_counts(dsn).get("done", 0) == total


# ---------------------------------------------------------------- fast stop


def test_a_claim_that_commits_after_a_fast_stop_is_taken_back(
    effects_dsn: str, tmp_path: Path
) -> None:
    first = Daemon(tmp_path, config(effects_dsn), effects_dsn=effects_dsn)
    second = Daemon(
        tmp_path, config(effects_dsn), effects_dsn=effects_dsn, name="second"
    )
    try:
        first.start().wait_ready()
        slow_claims(effects_dsn, 2.0, daemon_id_of(effects_dsn, first.pid))
        Client(effects_dsn).post("jobfns.noop", [[i] for i in range(4)])
        wait_until(lambda: claim_in_flight(effects_dsn), timeout=10)
        assert first.stop(signal.SIGINT) == 0
        # The claim commits after the daemon marked itself stopped.
        wait_until(lambda: not claim_in_flight(effects_dsn), timeout=10)
        stranded = executing_owners(effects_dsn)
        assert stranded, "the fault did not happen: no claim committed late"
        second.start().wait_ready()
        # Taken back within one lease of the second daemon, then run.
        wait_until(lambda: all_done(effects_dsn, 4), timeout=LEASE_S * 3)
        assert executing_owners(effects_dsn) == []
    finally:
        fast_claims(effects_dsn)
        first.close()
        second.close()


# ---------------------------------------------------------------- lost reply


class ReplyCutter(TcpRelay):
    """A relay between the daemon's workers and PostgreSQL that, once armed,
    swallows the next reply from the server and closes the client's side:
    the statement commits, and its client never hears of it."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target)
        self.armed = threading.Event()
        self.cut = threading.Event()

    def relay(
        self,
        data: bytes,
        source: socket.socket,
        sink: socket.socket,
        reply: bool,
    ) -> bool:
        if not (reply and self.armed.is_set()):
            return super().relay(data, source, sink, reply)
        self.armed.clear()
        self.cut.set()
        sink.shutdown(socket.SHUT_RDWR)
        sink.close()
        # Read on what the server still sends, so it commits; answer nothing.
        while source.recv(65536):
            pass
        return False


@pytest.fixture
def cutter(effects_dsn: str) -> Iterator[ReplyCutter]:
    params = conninfo_to_dict(effects_dsn)
    proxy = ReplyCutter(
        (
            str(params.get("host") or "127.0.0.1"),
            int(params.get("port") or 5432),
        )
    )
    try:
        yield proxy
    finally:
        proxy.close()


def test_a_claim_whose_reply_is_lost_is_taken_back_and_run(
    effects_dsn: str, tmp_path: Path, cutter: ReplyCutter
) -> None:
    through_proxy = make_conninfo(
        effects_dsn, host="127.0.0.1", port=str(cutter.port)
    )
    daemon = Daemon(
        tmp_path,
        config(
            through_proxy,
            # The session keeps its own path (LISTEN cannot be proxied
            # statement by statement anyway).
            database={"listen_dsn": effects_dsn},
        ),
        effects_dsn=effects_dsn,
    )
    try:
        daemon.start().wait_ready()
        slow_claims(effects_dsn, 1.0)
        Client(effects_dsn).post("jobfns.noop", [[i] for i in range(2)])
        wait_until(lambda: claim_in_flight(effects_dsn), timeout=10)
        cutter.armed.set()
        wait_until(cutter.cut.is_set, timeout=10)
        fast_claims(effects_dsn)
        # The claim committed; its worker never learnt of it and claims
        # again under a new token. The job is taken back within a lease.
        wait_until(lambda: all_done(effects_dsn, 2), timeout=LEASE_S * 4)
        with psycopg.connect(effects_dsn) as conn:
            errors = conn.execute(
                "SELECT error FROM pdoflowd.jobs WHERE attempt > 1"
            ).fetchall()
        assert errors, "the fault did not happen: no job was claimed twice"
        assert daemon.stop() == 0
    finally:
        fast_claims(effects_dsn)
        daemon.close()


# ---------------------------------------------------------------- frozen


def test_workers_of_a_daemon_declared_lost_claim_nothing(
    effects_dsn: str, tmp_path: Path
) -> None:
    frozen = Daemon(
        tmp_path,
        config(effects_dsn, workers={"count": 2}),
        effects_dsn=effects_dsn,
    )
    rescuer = Daemon(
        tmp_path, config(effects_dsn), effects_dsn=effects_dsn, name="rescuer"
    )
    try:
        frozen.start().wait_ready()
        frozen_id = daemon_id_of(effects_dsn, frozen.pid)
        # A frozen supervisor: its workers still reach the database.
        frozen.send(signal.SIGSTOP)
        rescuer.start().wait_ready()

        def declared_lost() -> bool:
            with psycopg.connect(effects_dsn) as conn:
                row = conn.execute(
                    "SELECT stopped_at IS NOT NULL FROM pdoflowd.daemons"
                    " WHERE id = %s",
                    (frozen_id,),
                ).fetchone()
            return bool(row and row[0])

        wait_until(declared_lost, timeout=LEASE_S * 4)
        Client(effects_dsn).post("jobfns.sleep", [[0.05]] * 20)
        # The frozen daemon's workers claim nothing now; then its host dies.
        time.sleep(1.0)
        frozen.send(signal.SIGCONT)
        frozen.kill_host()
        wait_until(lambda: all_done(effects_dsn, 20), timeout=60)
        with psycopg.connect(effects_dsn) as conn:
            claimed = conn.execute(
                "SELECT count(*) FROM pdoflowd.jobs WHERE daemon_id = %s",
                (frozen_id,),
            ).fetchone()
        assert claimed == (0,)
        assert executing_owners(effects_dsn) == []
    finally:
        with contextlib.suppress(Exception):
            frozen.send(signal.SIGCONT)
        frozen.close()
        rescuer.close()


# ---------------------------------------------------------------- the sweep


def test_a_job_restored_under_a_token_its_worker_moved_past_is_taken_back(
    effects_dsn: str, tmp_path: Path
) -> None:
    """What a failover to a lagging standby makes: a job the standby saw
    claimed but not done, executing again under the token of a claim its
    (live) worker has long finished with."""
    daemon = Daemon(tmp_path, config(effects_dsn), effects_dsn=effects_dsn)
    try:
        daemon.start().wait_ready()
        client = Client(effects_dsn)
        earlier = client.post("jobfns.noop", [[0]])
        client.wait(earlier.id, timeout=30, poll_interval=0.05)
        with psycopg.connect(effects_dsn) as conn:
            row = conn.execute(
                "SELECT owner, daemon_id FROM pdoflowd.jobs"
            ).fetchone()
        assert row is not None
        owner, daemon_id = row
        posting = client.post("jobfns.noop", [[1]], paused=True)
        with psycopg.connect(effects_dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE pdoflowd.jobs SET status = 'executing',"
                " owner = %s, daemon_id = %s, attempt = 1,"
                " claimed_at = now() - interval '1 second'"
                " WHERE posting_id = (SELECT id FROM pdoflowd.postings"
                "                     WHERE uuid = %s)",
                (owner, daemon_id, posting.id),
            )
        client.resume(posting.id)
        state = client.wait(posting.id, timeout=LEASE_S * 3, poll_interval=0.1)
        assert state.status is PostingStatus.FINISHED
        with psycopg.connect(effects_dsn) as conn:
            row = conn.execute(
                "SELECT j.attempt FROM pdoflowd.jobs AS j"
                " JOIN pdoflowd.postings AS p ON p.id = j.posting_id"
                " WHERE p.uuid = %s",
                (posting.id,),
            ).fetchone()
        assert row == (2,)
    finally:
        daemon.close()


@pytest.mark.slow
def test_a_job_whose_owner_is_alive_is_never_taken_back(
    effects_dsn: str, tmp_path: Path
) -> None:
    daemon = Daemon(tmp_path, config(effects_dsn), effects_dsn=effects_dsn)
    try:
        daemon.start().wait_ready()
        client = Client(effects_dsn)
        # Many leases long; heartbeats every 0.3 s, sweeps every 0.2 s.
        posting = client.post("jobfns.sleep", [[LEASE_S * 3]])
        state = client.wait(posting.id, timeout=60, poll_interval=0.2)
        assert state.status is PostingStatus.FINISHED
        with psycopg.connect(effects_dsn) as conn:
            row = conn.execute("SELECT attempt FROM pdoflowd.jobs").fetchone()
        assert row == (1,)
    finally:
        daemon.close()


def test_the_sweep_uses_the_lease_each_daemon_declared(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        patient, hasty = uuid.uuid4(), uuid.uuid4()
        for daemon_id, lease in ((patient, 3600.0), (hasty, 1.0)):
            upkeep.heartbeat(
                conn,
                daemon_id=daemon_id,
                hostname="h",
                pid=1,
                version="0",
                lease_s=lease,
            )
        conn.execute(
            "UPDATE pdoflowd.daemons"
            " SET heartbeat_at = now() - interval '10 seconds'"
        )
        upkeep.take_back_ownerless_jobs(conn, may_declare_lost=True)
        rows = conn.execute(
            "SELECT id, stopped_at IS NOT NULL FROM pdoflowd.daemons"
        ).fetchall()
    assert dict(rows) == {patient: False, hasty: True}
