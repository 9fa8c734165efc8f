"""The measurements, one function each, on a database given to them.

Owns how each figure is taken: enqueue (``Client.post`` in a process of
its own), PostgreSQL's COPY limit (the rows such a post sends, rendered
beforehand), PostgreSQL's limit (pgbench running ``cycle.sql`` on the same
table), drain (a daemon started on a paused posting, which is then resumed;
timed from the resuming transaction to the posting's ``finished_at``, both
on the database clock), pickup latency (single-job postings to an idle
daemon), claim latency (``queue.claim`` timed from the client), many
single-job postings against one posting of as many jobs, and hoarding
(how many jobs of known length one claim takes). A function
leaves the queue as it found it only where it says so; the caller resets.
"""

from __future__ import annotations

import json
import math
import random
import re
import resource
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import cpu, database
from bench.daemon import Daemon, DaemonSettings, Memory
from pdoflowd.arguments import encode_job
from pdoflowd.client import DEFAULT_TRIES, Client
from pdoflowd.config import APPLICATION_NAME
from pdoflowd.db import postings, queue
from pdoflowd.ids import uuid7_run

CYCLE_SQL = Path(__file__).resolve().parent / "cycle.sql"
_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)


@dataclass(frozen=True)
class Stage:
    """Where the benchmark runs: its database and its scratch directory."""

    dsn: str
    daemon_dsn: str
    work_dir: Path
    pgbench: Path
    # The postmaster, when the cluster is local: its CPU time is read.
    server_pid: int | None = None

    def server_cpu(self) -> float:
        """CPU-seconds of the whole cluster so far (nan when not local)."""
        if self.server_pid is None:
            return math.nan
        return cpu.tree_seconds(self.server_pid)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- enqueue


def enqueue(stage: Stage, count: int) -> dict[str, float]:
    """``Client.post`` of ``count`` jobs in a fresh process (bench.enqueue)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.enqueue", stage.dsn, str(count)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench.enqueue failed:\n{done.stderr}")
    result: dict[str, float] = json.loads(done.stdout)
    result["jobs_per_s"] = count / result["seconds"]
    return result


def copy_limit(stage: Stage, count: int) -> dict[str, float]:
    """PostgreSQL's own rate for the COPY of ``count`` rows of a posting.

    The rows are those ``bench.enqueue`` has ``Client.post`` send (same
    columns, arguments ``[index]``, no keywords, priority 0, default
    tries), rendered as COPY text before the clock starts and sent from
    memory into a paused posting. Timed from here around the COPY and its
    commit; the posting and its rows are deleted afterwards.
    """
    with database.connect(stage.dsn) as conn:
        posting_id = database.new_posting(conn, paused=True)
        tail = postings.copy_tail(posting_id, DEFAULT_TRIES, None)
        jobs = (
            (job_id, 0, *encode_job(index, [index], {}))
            for index, job_id in enumerate(uuid7_run(count).texts())
        )
        data = "".join(postings.copy_blocks(jobs, tail)).encode()
        started = time.perf_counter()
        database.copy_jobs(conn, data)
        seconds = time.perf_counter() - started
        conn.execute(
            "DELETE FROM pdoflowd.postings WHERE id = %s", (posting_id,)
        )
    return {"jobs": count, "seconds": seconds, "jobs_per_s": count / seconds}


# ---------------------------------------------------------------- pgbench


def pg_limit(
    stage: Stage, *, clients: int, batch: int, jobs: int
) -> dict[str, float]:
    """PostgreSQL's own rate for ``cycle.sql`` with these clients and batch.

    Loads enough waiting jobs that every cycle claims a full batch, runs
    pgbench, then deletes the jobs no cycle claimed. Jobs per second are
    the jobs completed over pgbench's time without connection set-up.
    """
    cycles = max(1, math.ceil(jobs / (clients * batch)))
    with database.connect(stage.dsn) as conn:
        posting_id = database.load_waiting(
            conn, clients * batch * (cycles + 1), paused=False
        )
        database.settle_storage(conn)
    server_before, client_before = stage.server_cpu(), _children_cpu()
    done = subprocess.run(
        [
            str(stage.pgbench),
            "-n",
            "-c",
            str(clients),
            "-j",
            str(clients),
            "-t",
            str(cycles),
            "-D",
            f"batch={batch}",
            "-f",
            str(CYCLE_SQL),
            stage.dsn,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    found = _TPS.search(done.stdout)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"pgbench failed:\n{done.stdout}\n{done.stderr}")
    tps = float(found[1])
    server_s = stage.server_cpu() - server_before
    client_s = _children_cpu() - client_before
    with database.connect(stage.dsn) as conn:
        completed = database.job_counts(conn, posting_id).get("done", 0)
        conn.execute(
            "DELETE FROM pdoflowd.jobs WHERE posting_id = %s"
            " AND status = 'waiting'",
            (posting_id,),
        )
        conn.execute(
            "UPDATE pdoflowd.postings SET status = 'finished',"
            " finished_at = now() WHERE id = %s",
            (posting_id,),
        )
    seconds = clients * cycles / tps
    return {
        "jobs": completed,
        "seconds": seconds,
        "jobs_per_s": completed / seconds,
        "cycles_per_s": tps,
        "client_cpu_us_per_job": client_s / completed * 1e6,
        "server_cpu_us_per_job": server_s / completed * 1e6,
    }


# ---------------------------------------------------------------- claim


def claim_latency(
    stage: Stage, *, batch: int, claims: int
) -> dict[str, float | list[float]]:
    """Time ``queue.claim`` of ``batch`` jobs, ``claims`` times, alone.

    The probe's jobs are deleted afterwards.
    """
    with database.connect(stage.dsn) as conn:
        posting_id = database.load_waiting(
            conn, batch * claims, paused=False, priority=1
        )
        conn.execute("ANALYZE pdoflowd.jobs")
        owner, daemon_id = uuid.uuid4(), uuid.uuid4()
        seconds = []
        for _ in range(claims):
            started = time.perf_counter()
            got = queue.claim(
                conn, owner=owner, daemon_id=daemon_id, limit=batch
            )
            seconds.append(time.perf_counter() - started)
            if len(got) != batch:
                raise RuntimeError(f"a probe claim got {len(got)} jobs")
        conn.execute(
            "DELETE FROM pdoflowd.postings WHERE id = %s", (posting_id,)
        )
    return {"seconds": seconds, **percentiles(seconds)}


# ---------------------------------------------------------------- drain


@dataclass
class DrainResult:
    """One drain, and what was seen of the daemon around it."""

    settings: DaemonSettings
    jobs: int
    seconds: float
    claims: int
    largest_claim: int
    reruns: int
    supervisor: Memory | None = None
    worker: Memory | None = None
    workers: list[Memory] = field(default_factory=list)
    connections: int | None = None
    pickup: dict[str, Any] | None = None
    client_cpu_s: float = math.nan
    server_cpu_s: float = math.nan
    supervisor_cpu_s: float = math.nan

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds

    def as_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings.__dict__,
            "jobs": self.jobs,
            "seconds": self.seconds,
            "jobs_per_s": self.jobs_per_s,
            "claims": self.claims,
            "mean_claim": self.jobs / self.claims if self.claims else 0,
            "largest_claim": self.largest_claim,
            "reruns": self.reruns,
            "supervisor": _memory_json(self.supervisor),
            "worker": _memory_json(self.worker),
            "workers": [_memory_json(m) for m in self.workers],
            "connections": self.connections,
            "pickup": self.pickup,
            "client_cpu_us_per_job": self.client_cpu_s / self.jobs * 1e6,
            "server_cpu_us_per_job": self.server_cpu_s / self.jobs * 1e6,
            "supervisor_cpu_us_per_job": self.supervisor_cpu_s
            / self.jobs
            * 1e6,
        }


def _memory_json(memory: Memory | None) -> dict[str, int] | None:
    return None if memory is None else memory.__dict__


def drain(
    stage: Stage,
    settings: DaemonSettings,
    *,
    jobs: int,
    footprint: bool = False,
    pickups: int = 0,
) -> DrainResult:
    """Start a daemon on ``jobs`` paused no-op jobs, resume, time the drain.

    With ``footprint``, the idle daemon's memory and connections are read
    first (no job has run yet, so no job module is imported). With
    ``pickups``, that many single-job postings follow the drain.
    """
    with database.connect(stage.dsn) as conn:
        posting_id = database.load_waiting(conn, jobs, paused=True)
        database.settle_storage(conn)
        with Daemon(stage.work_dir, stage.daemon_dsn, settings) as daemon:
            supervisor = worker = None
            workers: list[Memory] = []
            connections = None
            if footprint:
                # READY=1 comes when every worker has connected; give them
                # a moment to reach their idle wait.
                time.sleep(1.0)
                supervisor = Memory.of(daemon.pid)
                workers = [Memory.of(pid) for pid in daemon.workers()]
                worker = workers[0] if workers else None
                connections = database.daemon_connections(
                    conn, APPLICATION_NAME
                )
            client_before = cpu.tree_seconds(daemon.pid)
            supervisor_before = cpu.own_seconds(daemon.pid)
            server_before = stage.server_cpu()
            resumed = database.resume(conn, posting_id)
            finished = database.wait_finished(
                conn,
                posting_id,
                timeout_s=max(120.0, jobs / 200),
                interval=0.02,
            )
            client_s = cpu.tree_seconds(daemon.pid) - client_before
            supervisor_s = cpu.own_seconds(daemon.pid) - supervisor_before
            server_s = stage.server_cpu() - server_before
            counts = database.job_counts(conn, posting_id)
            if counts.get("done", 0) != jobs:
                raise RuntimeError(f"drain ended with {counts}")
            shape = database.claim_shape(conn, posting_id)
            pickup = pickup_latency(stage, conn, pickups) if pickups else None
    return DrainResult(
        settings=settings,
        jobs=jobs,
        seconds=finished - resumed,
        claims=shape.claims,
        largest_claim=shape.largest,
        reruns=shape.reruns,
        supervisor=supervisor,
        worker=worker,
        workers=workers,
        connections=connections,
        pickup=pickup,
        client_cpu_s=client_s,
        server_cpu_s=server_s,
        supervisor_cpu_s=supervisor_s,
    )


def pickup_latency(
    stage: Stage, conn: database.Connection, count: int
) -> dict[str, Any]:
    """Post ``count`` single-job postings, one at a time, to an idle daemon.

    Each post waits 50-70 ms after the previous one, long enough for the
    daemon to run and record the job and go idle again. Latency is taken
    up to the job's ``work_started_at`` (the worker's clock; one host, one
    clock) from: the moment ``post`` returned here (after the commit made
    the posting visible: a lower bound); the posting's commit record (when
    track_commit_timestamp is on; written before the commit's WAL flush,
    so an upper bound); and the posting's ``created_at`` (its transaction's
    start: includes writing and committing the posting).
    """
    client = Client(stage.dsn)
    rng = random.Random(1)
    posted: dict[uuid.UUID, tuple[str, float]] = {}
    with database.connect(stage.dsn, autocommit=False) as poster:
        for index in range(count):
            posting = client.post(database.NOOP, [[index]], conn=poster)
            row = poster.execute("SELECT pg_current_xact_id()::text").fetchone()
            assert row is not None
            poster.commit()
            posted[posting.id] = (str(row[0]), time.time())
            time.sleep(0.05 + 0.02 * rng.random())
    ids = list(posted)
    deadline = time.monotonic() + 30
    while True:
        rows = conn.execute(
            "SELECT p.uuid, extract(epoch FROM p.created_at)::float8,"
            " extract(epoch FROM j.work_started_at)::float8"
            " FROM pdoflowd.postings AS p"
            " JOIN pdoflowd.jobs AS j ON j.posting_id = p.id"
            " WHERE p.uuid = ANY(%s) AND j.status = 'done'",
            (ids,),
        ).fetchall()
        if len(rows) == count or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if len(rows) != count:
        raise RuntimeError(f"{count - len(rows)} pickup job(s) never ran")
    committed = database.commit_times(conn, [xid for xid, _ in posted.values()])
    result: dict[str, Any] = {
        "from_created": percentiles(
            [started - created for _, created, started in rows]
        ),
        "from_returned": percentiles(
            [started - posted[ident][1] for ident, _, started in rows]
        ),
        "from_commit": None,
    }
    if committed is not None:
        result["from_commit"] = percentiles(
            [
                started - committed[posted[ident][0]]
                for ident, _, started in rows
            ]
        )
    return result


# ---------------------------------------------------------------- postings


def drain_one_posting(conn: database.Connection, count: int) -> float:
    """Jobs per second draining one posting of ``count`` no-op jobs.

    The posting is loaded paused and resumed when storage has settled; a
    daemon must be running. Timed from the resuming transaction to the
    posting's ``finished_at``, both on the database clock.
    """
    posting_id = database.load_waiting(conn, count, paused=True)
    database.settle_storage(conn)
    began = database.resume(conn, posting_id)
    ended = database.wait_finished(
        conn, posting_id, timeout_s=max(120.0, count / 100), interval=0.02
    )
    return count / (ended - began)


def drain_small_postings(conn: database.Connection, count: int) -> float:
    """Jobs per second draining ``count`` postings of one no-op job each.

    As :func:`drain_one_posting`, all resumed in one transaction, up to
    the last posting's ``finished_at``: settling every posting is in it.
    """
    low, high = database.load_single_job_postings(conn, count)
    database.settle_storage(conn)
    began = database.resume_all(conn)
    ended = database.wait_all_finished(
        conn, low, high, timeout_s=max(120.0, count / 50), interval=0.05
    )
    return count / (ended - began)


def warm_up(conn: database.Connection, settings: DaemonSettings) -> None:
    """Drain two full batches per worker, untimed, on a running daemon.

    Its workers import the job module and make their first claims here.
    """
    drain_one_posting(conn, 2 * settings.workers * settings.batch)


def postings_drains(
    stage: Stage, settings: DaemonSettings, *, jobs: int
) -> dict[str, float]:
    """One daemon drains ``jobs`` no-op jobs as one posting, then as
    ``jobs`` postings of one job each; both rates and their ratio.

    An untimed posting is drained first (:func:`warm_up`), so that the
    first timed drain does not alone pay for a fresh daemon.
    """
    with (
        database.connect(stage.dsn) as conn,
        Daemon(stage.work_dir, stage.daemon_dsn, settings),
    ):
        warm_up(conn, settings)
        one = drain_one_posting(conn, jobs)
        small = drain_small_postings(conn, jobs)
    return {
        "jobs": jobs,
        "one_posting_jobs_per_s": one,
        "small_postings_jobs_per_s": small,
        "ratio": small / one,
    }


# ---------------------------------------------------------------- hoarding


def hoarding(stage: Stage, *, nap_s: float, jobs: int) -> dict[str, float]:
    """The largest claim of ``nap_s`` jobs by 2 workers with batch 100.

    The claim policy aims at about one second of work per claim, so the
    largest claim should be near ``1 / nap_s`` jobs, far below 100.
    """
    settings = DaemonSettings(workers=2, batch=100)
    with database.connect(stage.dsn) as conn:
        posting_id = database.load_waiting(
            conn,
            jobs,
            paused=True,
            entry_point=database.NAP,
            posargs_sql=f"jsonb_build_array({nap_s!r}::float8)",
        )
        with Daemon(stage.work_dir, stage.daemon_dsn, settings):
            database.resume(conn, posting_id)
            database.wait_finished(
                conn, posting_id, timeout_s=60 + jobs * nap_s, interval=0.05
            )
        shape = database.claim_shape(conn, posting_id)
    return {
        "nap_s": nap_s,
        "jobs": jobs,
        "batch_size": settings.batch,
        "claims": shape.claims,
        "largest_claim": shape.largest,
        "largest_claim_s": shape.largest * nap_s,
    }


# ---------------------------------------------------------------- numbers


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50, p95, p99 and max (linear interpolation between ranks)."""
    ordered = sorted(samples)

    def rank(q: float) -> float:
        if not ordered:
            return math.nan
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        share = position - low
        return ordered[low] * (1 - share) + ordered[high] * share

    return {
        "p50": rank(0.50),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "max": ordered[-1] if ordered else math.nan,
    }
