"""One peer queue's drain of pre-loaded no-op jobs, timed as pdoflowd's is.

Owns, for one peer: a fresh database on the benchmark's server (dropped
afterwards), the peer's schema and N jobs through the peer's own enqueue
helper, the storage settled as before pdoflowd's drain (VACUUM ANALYZE,
CHECKPOINT), W worker processes held at a gate, the clock, the check that
every job ran exactly once, and the CPU the workers and the server spent.
What each peer is (its scripts, its tables, the SQL that reads them, how
it is configured) is in :data:`PEERS`.

The gate: before the workers start, a transaction of the benchmark locks
the peer's job table IN EXCLUSIVE MODE, which lets readers through and
holds every claim. Each worker process starts, imports, connects, does
whatever its start-up does, and then blocks in its first claim. Once all
W of them wait on that lock in their claim statement, and half a second
more has passed, the clock starts and the transaction ends: every claim
goes ahead at once. Start-up, imports and connecting are outside the
clock, and every worker has sent its first claim when it starts. The
clock stops at the last completion as the peer itself records it in its
own tables (read once the benchmark, polling every 10 ms, sees no job
left unfinished), on the database clock, the same host's clock as the
start. The workers' CPU (from /proc) and the server's are read at the
start and when the poll sees the queue empty.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench import cpu, database
from devtools import devcluster

PEERS_DIR = Path(__file__).resolve().parent

# A worker is at the gate when it waits on the lock in its claim; this
# much later the clock starts, so that start-up work still running beside
# the claim (listeners, heartbeats) is done.
_SETTLE_S = 0.5
_GATE_TIMEOUT_S = 120.0
_POLL_S = 0.01
_STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Knobs:
    """What the benchmark sets in a peer; everything else keeps its default."""

    # PgQueuer's batch_size (procrastinate claims one job at a time).
    batch: int
    # How many jobs one procrastinate worker process runs at once (its
    # --concurrency; procrastinate's own default is 1).
    procrastinate_concurrency: int


@dataclass(frozen=True)
class Peer:
    """A peer queue as the benchmark drives and reads it."""

    key: str
    name: str
    # The enqueue helper: ``python SCRIPT N`` prints {"jobs", "seconds"}.
    enqueue_script: str
    # A worker's arguments after the peers' Python.
    worker_args: Callable[[Knobs], list[str]]
    # The table whose lock is the gate, and text of the claim statement.
    jobs_table: str
    claim_marker: str
    # Tables settled (VACUUM ANALYZE) before the drain.
    tables: tuple[str, ...]
    # The lowest id of a job not finished yet, from %(after)s on (NULL
    # when none is left). A finished job never comes back, so each poll
    # starts where the last one found work, and the index scan does not
    # walk again over the entries of every job finished so far.
    remaining_sql: str
    # The last completion the peer recorded, epoch seconds.
    finished_sql: str
    # One row of named counts; those in ``whole`` must equal the number of
    # jobs, every other one 0.
    counts_sql: str
    whole: frozenset[str]
    # How the peer is configured, for the JSON and the docs.
    settings: Callable[[Knobs], dict[str, Any]] = field(repr=False)


PGQUEUER = Peer(
    key="pgqueuer",
    name="PgQueuer",
    enqueue_script="pgqueuer_enqueue.py",
    worker_args=lambda knobs: ["pgqueuer_worker.py", str(knobs.batch)],
    jobs_table="pgqueuer",
    claim_marker="SKIP LOCKED",
    tables=("pgqueuer", "pgqueuer_log", "pgqueuer_statistics"),
    # A job leaves the queue table when its completion is logged.
    remaining_sql="SELECT min(id) FROM pgqueuer WHERE id >= %(after)s",
    # A completion deletes the job and logs it, in one statement.
    finished_sql=(
        "SELECT extract(epoch FROM max(created))::float8 FROM pgqueuer_log"
        " WHERE status = 'successful'"
    ),
    counts_sql=(
        "SELECT (SELECT count(*) FROM pgqueuer) AS left_in_queue,"
        " count(*) FILTER (WHERE status = 'picked') AS picks,"
        " count(DISTINCT job_id) FILTER (WHERE status = 'picked')"
        "  AS jobs_picked,"
        " count(*) FILTER (WHERE status = 'successful') AS successes,"
        " count(DISTINCT job_id) FILTER (WHERE status = 'successful')"
        "  AS jobs_successful,"
        " count(*) FILTER (WHERE status NOT IN"
        "  ('queued', 'picked', 'successful')) AS other_outcomes"
        " FROM pgqueuer_log"
    ),
    whole=frozenset({"picks", "jobs_picked", "successes", "jobs_successful"}),
    settings=lambda knobs: {
        "runner": "pgqueuer.run (what pgq run calls), on uvloop",
        "manager": "QueueManager, no scheduler",
        "driver": "asyncpg, one connection per process",
        "batch_size": knobs.batch,
        "max_concurrent_tasks": None,
        "job": "async def, one asyncio task per job",
        "schema": "Queries.install, default durability (all tables logged)",
        "enqueue": "one Queries.enqueue of lists",
        "completion_time": "max(pgqueuer_log.created) of 'successful'",
    },
)

PROCRASTINATE = Peer(
    key="procrastinate",
    name="procrastinate",
    enqueue_script="procrastinate_enqueue.py",
    worker_args=lambda knobs: [
        "-m",
        "procrastinate",
        "--log-level=warning",
        "--app=procrastinate_worker.app",
        "worker",
        f"--concurrency={knobs.procrastinate_concurrency}",
    ],
    jobs_table="procrastinate_jobs",
    claim_marker="procrastinate_fetch_job",
    tables=("procrastinate_jobs", "procrastinate_events"),
    remaining_sql=(
        "SELECT min(id) FROM procrastinate_jobs"
        " WHERE status IN ('todo', 'doing') AND id >= %(after)s"
    ),
    # Its trigger records every change of status, with the time.
    finished_sql=(
        "SELECT extract(epoch FROM max(at))::float8"
        " FROM procrastinate_events WHERE type = 'succeeded'"
    ),
    counts_sql=(
        "SELECT count(*) FILTER (WHERE status = 'succeeded' AND attempts = 1)"
        "  AS succeeded_once,"
        " count(*) FILTER (WHERE status <> 'succeeded' OR attempts <> 1)"
        "  AS other_jobs,"
        " (SELECT count(*) FROM procrastinate_events WHERE type = 'started')"
        "  AS starts,"
        " (SELECT count(DISTINCT job_id) FROM procrastinate_events"
        "  WHERE type = 'started') AS jobs_started,"
        " (SELECT count(*) FROM procrastinate_events WHERE type = 'succeeded')"
        "  AS successes"
        " FROM procrastinate_jobs"
    ),
    whole=frozenset({"succeeded_once", "starts", "jobs_started", "successes"}),
    settings=lambda knobs: {
        "runner": "procrastinate worker (its command line), on asyncio",
        "connector": "PsycopgConnector, psycopg_pool at its default size",
        "concurrency": knobs.procrastinate_concurrency,
        "batch_size": None,
        "job": "async def task, awaited in the worker's event loop",
        "delete_jobs": "never (default)",
        "schema": "schema_manager.apply_schema_async",
        "enqueue": "one batch_defer_async",
        "completion_time": "max(procrastinate_events.at) of 'succeeded'",
    },
)

PEERS = (PGQUEUER, PROCRASTINATE)

# The connection parameters both asyncpg and libpq read from the
# environment: the peers get the database this way.
_LIBPQ_ENV = {
    "host": "PGHOST",
    "port": "PGPORT",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "dbname": "PGDATABASE",
    "sslmode": "PGSSLMODE",
    "passfile": "PGPASSFILE",
}


def peer_environment(dsn: str) -> dict[str, str]:
    """The environment of a peer's process: the database in PG* variables.

    Inherited PG* variables and PYTHONPATH are dropped, so a peer reaches
    only this database and cannot import from this checkout.
    """
    params = conninfo_to_dict(dsn)
    unknown = sorted(set(params) - set(_LIBPQ_ENV))
    if unknown:
        raise ValueError(f"the peers cannot be given {unknown} of the DSN")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PG") and k != "PYTHONPATH"
    }
    env.update({_LIBPQ_ENV[k]: str(v) for k, v in params.items()})
    return env


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _enqueue(
    peer: Peer, python: Path, jobs: int, env: dict[str, str]
) -> dict[str, float]:
    done = subprocess.run(
        [str(python), peer.enqueue_script, str(jobs)],
        cwd=PEERS_DIR,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{peer.enqueue_script} failed:\n{done.stderr}")
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


@dataclass
class _Workers:
    """The worker processes of one drain, with their logs."""

    processes: list[subprocess.Popen[bytes]]
    logs: list[Path]
    exit_codes: list[int] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        return sum(cpu.tree_seconds(p.pid) for p in self.processes)

    def check_alive(self, peer: Peer) -> None:
        for process, log in zip(self.processes, self.logs, strict=True):
            if process.poll() is not None:
                raise RuntimeError(
                    f"a {peer.name} worker exited with {process.returncode}:"
                    f"\n{_tail(log)}"
                )

    def stop(self) -> None:
        """SIGTERM (each peer's own way to stop), then SIGKILL if need be."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                self.exit_codes.append(process.wait(_STOP_TIMEOUT_S))
            except subprocess.TimeoutExpired:
                process.kill()
                self.exit_codes.append(process.wait())


@contextlib.contextmanager
def _started(
    peer: Peer,
    python: Path,
    count: int,
    knobs: Knobs,
    env: dict[str, str],
    log_dir: Path,
) -> Iterator[_Workers]:
    log_dir.mkdir(parents=True, exist_ok=True)
    workers = _Workers([], [])
    try:
        for index in range(count):
            log = log_dir / f"{peer.key}-{time.time_ns()}-{index}.log"
            with log.open("wb") as out:
                workers.processes.append(
                    subprocess.Popen(
                        [str(python), *peer.worker_args(knobs)],
                        cwd=PEERS_DIR,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            workers.logs.append(log)
        yield workers
    finally:
        workers.stop()


def _wait_at_gate(
    conn: database.Connection, peer: Peer, workers: _Workers, count: int
) -> float:
    """Wait until ``count`` sessions wait on the gate in their claim."""
    started = time.monotonic()
    while True:
        row = conn.execute(
            "SELECT count(DISTINCT a.pid) FROM pg_stat_activity AS a"
            " JOIN pg_locks AS l ON l.pid = a.pid"
            " WHERE a.datname = current_database() AND NOT l.granted"
            " AND l.relation = %s::regclass AND a.query LIKE %s",
            (peer.jobs_table, f"%{peer.claim_marker}%"),
        ).fetchone()
        assert row is not None
        if row[0] >= count:
            return time.monotonic() - started
        workers.check_alive(peer)
        if time.monotonic() - started > _GATE_TIMEOUT_S:
            raise TimeoutError(
                f"{row[0]} of {count} {peer.name} workers reached the gate"
                f" in {_GATE_TIMEOUT_S:g} s"
            )
        time.sleep(0.05)


def _wait_drained(
    conn: database.Connection, peer: Peer, workers: _Workers, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    after = 0
    while True:
        row = conn.execute(peer.remaining_sql, {"after": after}).fetchone()
        assert row is not None
        if row[0] is None:
            return
        after = int(row[0])
        workers.check_alive(peer)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{peer.name} still busy after {timeout_s:g} s")
        time.sleep(_POLL_S)


def _counts(conn: database.Connection, peer: Peer, jobs: int) -> dict[str, int]:
    """The peer's own record of its jobs; raise unless each ran once."""
    cursor = conn.execute(peer.counts_sql)
    row = cursor.fetchone()
    assert row is not None and cursor.description is not None
    counts = {
        column.name: int(value)
        for column, value in zip(cursor.description, row, strict=True)
    }
    expected = {name: jobs if name in peer.whole else 0 for name in counts}
    if counts != expected:
        raise RuntimeError(
            f"{peer.name}: the jobs did not run exactly once: {counts},"
            f" expected {expected}"
        )
    return counts


def _settle(conn: database.Connection, tables: tuple[str, ...]) -> None:
    for table in tables:
        conn.execute(f"VACUUM ANALYZE {table}")
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        conn.execute("CHECKPOINT")


def drain(
    peer: Peer,
    *,
    admin_dsn: str,
    python: Path,
    workers: int,
    knobs: Knobs,
    jobs: int,
    server_cpu: Callable[[], float],
    log_dir: Path,
) -> dict[str, Any]:
    """``jobs`` no-op jobs of ``peer`` drained by ``workers`` processes."""
    name = f"pdoflowd_bench_{os.getpid()}_{peer.key}"
    devcluster.create_database(admin_dsn, name)
    try:
        dsn = make_conninfo(admin_dsn, dbname=name)
        env = peer_environment(dsn)
        enqueued = _enqueue(peer, python, jobs, env)
        with (
            database.connect(dsn) as conn,
            database.connect(dsn, autocommit=False) as gate,
        ):
            _settle(conn, peer.tables)
            gate.execute(f"LOCK TABLE {peer.jobs_table} IN EXCLUSIVE MODE")
            with _started(
                peer, python, workers, knobs, env, log_dir
            ) as started:
                gate_s = _wait_at_gate(conn, peer, started, workers)
                time.sleep(_SETTLE_S)
                client_before = started.cpu_seconds()
                server_before = server_cpu()
                opened = time.time()
                gate.commit()
                _wait_drained(
                    conn, peer, started, timeout_s=max(300.0, jobs / 20)
                )
                client_s = started.cpu_seconds() - client_before
                server_s = server_cpu() - server_before
            row = conn.execute(peer.finished_sql).fetchone()
            assert row is not None
            seconds = float(row[0]) - opened
            counts = _counts(conn, peer, jobs)
    finally:
        devcluster.drop_database(admin_dsn, name)
    return {
        "peer": peer.name,
        "settings": peer.settings(knobs),
        "workers": workers,
        "jobs": jobs,
        "enqueue_s": enqueued["seconds"],
        "gate_s": gate_s,
        "seconds": seconds,
        "jobs_per_s": jobs / seconds,
        "client_cpu_us_per_job": client_s / jobs * 1e6,
        "server_cpu_us_per_job": server_s / jobs * 1e6,
        "counts": counts,
        "exit_codes": started.exit_codes,
    }
