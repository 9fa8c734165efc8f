"""The benchmark's command line and the order of its measurements.

``python -m bench`` starts a throwaway PostgreSQL (or uses ``--dsn``),
creates a fresh database in it, and measures, ``--runs`` times: enqueue
and PostgreSQL's limit for the same COPY, PostgreSQL's limit and pdoflowd's
drain on an empty table (at ``--batch`` and again at ``--small-batch``),
claim and pickup latency, the daemon's footprint, many single-job postings
against one posting of as many jobs, hoarding, and limit and drain again
with a history of finished jobs kept.
It prints one table of medians and writes every raw figure to
``bench-results/<timestamp>.json``.
``--sweep`` measures only drain against limit, for every combination of
the ``--workers``, ``--batch`` and ``--flush-ms`` lists. ``--peers``
measures only pdoflowd's drain next to PostgreSQL's limit and two peer
queues, PgQueuer and procrastinate (:mod:`bench.peersrun`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg.conninfo import make_conninfo

from bench import cpu, database, machine, peersrun, phases, report
from bench.daemon import REPO_ROOT, DaemonSettings
from bench.progress import say, timed
from devtools import devcluster
from devtools.devcluster import LocalCluster, find_bin_dir
from pdoflowd.db import migrate


@dataclass(frozen=True)
class Plan:
    """How much of everything one run does."""

    runs: int
    workers: list[int]
    batch: list[int]
    # A second drain and limit at this batch size (0: none).
    small_batch: int
    flush_ms: list[int | None]
    jobs: int
    enqueue_jobs: int
    enqueue_small: int
    # Jobs drained as one posting, then as as many single-job postings.
    postings: int
    history: int
    pickups: int
    claims: int
    hoard_jobs: int

    def summary(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "workers": self.workers[0],
            "batch": self.batch[0],
            "small_batch": self.small_batch,
            "flush_ms": self.flush_ms[0],
            "jobs": self.jobs,
            "enqueue_jobs": self.enqueue_jobs,
            "enqueue_small": self.enqueue_small,
            "postings": self.postings,
            "history": self.history,
            "pickups": self.pickups,
            "claims": self.claims,
            "hoard_jobs": self.hoard_jobs,
        }


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _flushes(text: str) -> list[int | None]:
    return [None if p == "default" else int(p) for p in text.split(",") if p]


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure pdoflowd against PostgreSQL's own limit.",
    )
    parser.add_argument(
        "--dsn",
        help="a server to use instead of a throwaway one (its user needs"
        " CREATEDB; a database pdoflowd_bench_<pid> is made and dropped)",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--workers", type=_ints, default=[4], help="workers (comma list)"
    )
    parser.add_argument(
        "--batch",
        type=_ints,
        help="batch_size (comma list; default 100, with --peers 10)",
    )
    parser.add_argument(
        "--small-batch",
        type=int,
        default=10,
        help="a second drain and limit at this batch_size (default 10;"
        " 0 for none; not with --sweep or --peers)",
    )
    parser.add_argument(
        "--flush-ms",
        type=_flushes,
        default=[None],
        help="outcome_flush_ms, or 'default' (comma list)",
    )
    parser.add_argument("--jobs", type=int, help="jobs per drain")
    parser.add_argument("--history", type=int, help="finished jobs kept")
    parser.add_argument(
        "--postings",
        type=int,
        help="jobs drained as one posting and as as many single-job"
        " postings (default 20,000, --quick 2,000; 0 for none)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="only drain against limit, for every combination of the lists",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="only pdoflowd against PgQueuer and procrastinate (W workers,"
        " batch B, --jobs default 20,000), in .bench-peers/venv",
    )
    # procrastinate's own default is 1; 4 drained no-op jobs a little
    # faster here (docs/performance.md), and the peers get their best.
    parser.add_argument(
        "--procrastinate-concurrency",
        type=int,
        default=4,
        help="with --peers: jobs one procrastinate worker runs at once"
        " (its --concurrency; default 4, procrastinate's own is 1)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, one run: a smoke"
    )
    parser.add_argument(
        "--pg-set",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a server setting for the throwaway cluster",
    )
    parser.add_argument(
        "--daemon-pg-set",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a session setting for the daemon's connections only",
    )
    parser.add_argument(
        "--unix-socket",
        action="store_true",
        help="reach the throwaway cluster over its Unix socket, not TCP",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "bench-results",
        help="where the JSON goes (default bench-results/)",
    )
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = [10] if args.peers else [100]
    if args.peers and args.sweep:
        parser.error("--peers and --sweep are separate modes")
    if args.small_batch < 0:
        parser.error("--small-batch must be 0 (none) or more")
    if args.postings is not None and args.postings < 0:
        parser.error("--postings must be 0 (none) or more")
    if args.dsn and (args.pg_set or args.unix_socket):
        parser.error(
            "--pg-set and --unix-socket apply to the throwaway cluster,"
            " not --dsn"
        )
    if (
        not args.sweep
        and max(len(args.workers), len(args.batch), len(args.flush_ms)) > 1
    ):
        parser.error("lists of --workers/--batch/--flush-ms need --sweep")
    return args


def _default_jobs(args: argparse.Namespace) -> int:
    if args.peers:
        return 2_000 if args.quick else 20_000
    return 5_000 if args.quick else 50_000


def _default_postings(args: argparse.Namespace) -> int:
    if args.postings is not None:
        return int(args.postings)
    return 2_000 if args.quick else 20_000


def make_plan(args: argparse.Namespace) -> Plan:
    quick = args.quick
    return Plan(
        runs=1 if quick and args.runs == 3 else args.runs,
        workers=args.workers,
        batch=args.batch,
        small_batch=args.small_batch,
        flush_ms=args.flush_ms,
        jobs=args.jobs or _default_jobs(args),
        enqueue_jobs=20_000 if quick else 100_000,
        enqueue_small=2_000 if quick else 10_000,
        postings=_default_postings(args),
        history=args.history or (100_000 if quick else 1_000_000),
        pickups=30 if quick else 200,
        claims=30 if quick else 200,
        hoard_jobs=40,
    )


@contextlib.contextmanager
def server(
    args: argparse.Namespace, work_dir: Path
) -> Iterator[tuple[str, Path, int | None]]:
    """An admin DSN, the pgbench to use and the postmaster's pid if local."""
    if args.dsn:
        pgbench = shutil.which("pgbench")
        with contextlib.suppress(RuntimeError):
            pgbench = pgbench or str(find_bin_dir() / "pgbench")
        if not pgbench:
            raise RuntimeError("pgbench not found")
        yield args.dsn, Path(pgbench), None
        return
    # Commit timestamps give the exact moment a posting became visible.
    settings = {"track_commit_timestamp": "on", **dict(args.pg_set)}
    cluster = LocalCluster(work_dir / "pg", settings=settings)
    say(f"starting a throwaway PostgreSQL in {cluster.base_dir}")
    cluster.init()
    cluster.start()
    try:
        dsn = cluster.dsn()
        if args.unix_socket:
            dsn = make_conninfo(dsn, host=str(cluster.socket_dir))
        yield (
            dsn,
            cluster.bin_dir / "pgbench",
            cpu.postmaster_pid(cluster.data_dir),
        )
    finally:
        cluster.stop()


@contextlib.contextmanager
def bench_database(admin_dsn: str) -> Iterator[str]:
    name = f"pdoflowd_bench_{os.getpid()}"
    devcluster.create_database(admin_dsn, name)
    try:
        dsn = make_conninfo(admin_dsn, dbname=name)
        migrate.upgrade(dsn)
        yield dsn
    finally:
        devcluster.drop_database(admin_dsn, name)


def _rate(result: dict[str, Any]) -> str:
    return f"{result['jobs_per_s']:,.0f} jobs/s"


def one_run(stage: phases.Stage, plan: Plan) -> dict[str, Any]:
    """Every measurement once, on the same database."""
    w, b = plan.workers[0], plan.batch[0]
    settings = DaemonSettings(w, b, plan.flush_ms[0])
    out: dict[str, Any] = {"load_before": os.getloadavg()}

    def reset() -> None:
        with database.connect(stage.dsn) as conn:
            database.reset(conn)

    reset()
    out["enqueue_small"] = timed(
        f"post {plan.enqueue_small:,}",
        lambda: phases.enqueue(stage, plan.enqueue_small),
        _rate,
    )
    reset()
    out["enqueue"] = timed(
        f"post {plan.enqueue_jobs:,}",
        lambda: phases.enqueue(stage, plan.enqueue_jobs),
        _rate,
    )
    reset()
    out["copy_limit"] = timed(
        f"PostgreSQL COPY limit, {plan.enqueue_jobs:,} rows",
        lambda: phases.copy_limit(stage, plan.enqueue_jobs),
        _rate,
    )
    reset()
    out["limit"] = timed(
        "PostgreSQL limit",
        lambda: phases.pg_limit(stage, clients=w, batch=b, jobs=plan.jobs),
        _rate,
    )
    reset()
    out["claim"] = timed(
        "claim latency",
        lambda: phases.claim_latency(stage, batch=b, claims=plan.claims),
        lambda r: f"p50 {r['p50'] * 1000:.2f} ms",
    )
    drained = timed(
        f"drain {settings.label()}",
        lambda: phases.drain(
            stage,
            settings,
            jobs=plan.jobs,
            footprint=True,
            pickups=plan.pickups,
        ),
        lambda r: f"{r.jobs_per_s:,.0f} jobs/s",
    )
    out["drain"] = drained.as_json()
    reset()
    if plan.small_batch:
        out.update(small_batch_drain(stage, plan))
        reset()
    if plan.postings:
        out["postings"] = timed(
            f"drain {plan.postings:,} jobs as one posting and as"
            f" {plan.postings:,} postings",
            lambda: phases.postings_drains(stage, settings, jobs=plan.postings),
            lambda r: f"ratio {r['ratio']:.2f}",
        )
        reset()
    out["hoarding"] = timed(
        "hoarding",
        lambda: phases.hoarding(stage, nap_s=0.05, jobs=plan.hoard_jobs),
        lambda r: f"largest claim {r['largest_claim']}",
    )
    reset()

    def history() -> None:
        with database.connect(stage.dsn) as conn:
            database.load_history(conn, plan.history)

    timed(f"insert {plan.history:,} finished jobs", history, lambda _: "done")
    out["limit_history"] = timed(
        "PostgreSQL limit with history",
        lambda: phases.pg_limit(stage, clients=w, batch=b, jobs=plan.jobs),
        _rate,
    )
    out["claim_history"] = timed(
        "claim latency with history",
        lambda: phases.claim_latency(stage, batch=b, claims=plan.claims),
        lambda r: f"p50 {r['p50'] * 1000:.2f} ms",
    )
    out["drain_history"] = timed(
        "drain with history",
        lambda: phases.drain(stage, settings, jobs=plan.jobs),
        lambda r: f"{r.jobs_per_s:,.0f} jobs/s",
    ).as_json()
    reset()
    out["load_after"] = os.getloadavg()
    return out


def small_batch_drain(stage: phases.Stage, plan: Plan) -> dict[str, Any]:
    """PostgreSQL's limit and pdoflowd's drain again, at the small batch.

    Starts on an empty queue; the caller resets afterwards.
    """
    w, b = plan.workers[0], plan.small_batch
    settings = DaemonSettings(w, b, plan.flush_ms[0])
    limit = timed(
        f"PostgreSQL limit, batch {b}",
        lambda: phases.pg_limit(stage, clients=w, batch=b, jobs=plan.jobs),
        _rate,
    )
    with database.connect(stage.dsn) as conn:
        database.reset(conn)
    drained = timed(
        f"drain {settings.label()}",
        lambda: phases.drain(stage, settings, jobs=plan.jobs),
        lambda r: f"{r.jobs_per_s:,.0f} jobs/s",
    )
    return {"small_limit": limit, "small_drain": drained.as_json()}


def sweep(stage: phases.Stage, plan: Plan) -> list[dict[str, Any]]:
    """Drain against limit for every combination, ``plan.runs`` times."""
    configs: dict[str, dict[str, Any]] = {}
    for run in range(plan.runs):
        for w, b in itertools.product(plan.workers, plan.batch):
            say(f"run {run + 1}/{plan.runs}: W={w} B={b}")
            with database.connect(stage.dsn) as conn:
                database.reset(conn)
            limit = timed(
                "PostgreSQL limit",
                functools.partial(
                    phases.pg_limit, stage, clients=w, batch=b, jobs=plan.jobs
                ),
                _rate,
            )
            for flush in plan.flush_ms:
                settings = DaemonSettings(w, b, flush)
                with database.connect(stage.dsn) as conn:
                    database.reset(conn)
                drained = timed(
                    f"drain {settings.label()}",
                    functools.partial(
                        phases.drain, stage, settings, jobs=plan.jobs
                    ),
                    lambda r: f"{r.jobs_per_s:,.0f} jobs/s",
                )
                entry = configs.setdefault(
                    settings.label(),
                    {"label": settings.label(), "runs": []},
                )
                figures = drained.as_json()
                entry["runs"].append(
                    {
                        "drain": drained.jobs_per_s,
                        "limit": limit["jobs_per_s"],
                        "mean_claim": figures["mean_claim"],
                        "drain_client_us": figures["client_cpu_us_per_job"],
                        "drain_server_us": figures["server_cpu_us_per_job"],
                        "limit_client_us": limit["client_cpu_us_per_job"],
                        "limit_server_us": limit["server_cpu_us_per_job"],
                    }
                )
    return list(configs.values())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    peers_plan = peersrun.PeersPlan(
        runs=plan.runs,
        workers=plan.workers[0],
        batch=plan.batch[0],
        jobs=plan.jobs,
        procrastinate_concurrency=args.procrastinate_concurrency,
    )
    peers: dict[str, Any] | None = None
    began = time.monotonic()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    work_dir = Path(tempfile.mkdtemp(prefix="pdoflowd-bench-"))
    try:
        with (
            server(args, work_dir) as (admin_dsn, pgbench, server_pid),
            bench_database(admin_dsn) as dsn,
        ):
            stage = phases.Stage(
                dsn=dsn,
                daemon_dsn=database.with_options(dsn, dict(args.daemon_pg_set)),
                work_dir=work_dir / "daemon",
                pgbench=pgbench,
                server_pid=server_pid,
            )
            with database.connect(dsn) as conn:
                facts = machine.describe(REPO_ROOT, database.server_facts(conn))
            runs: list[dict[str, Any]] = []
            configs: list[dict[str, Any]] = []
            table: list[report.Row | str]
            if args.sweep:
                configs = sweep(stage, plan)
                table = []
            elif args.peers:
                runs, peers = peersrun.measure(stage, admin_dsn, peers_plan)
                table = report.peer_rows(runs, peers_plan.__dict__, peers)
            else:
                for index in range(plan.runs):
                    say(f"run {index + 1}/{plan.runs}")
                    runs.append(one_run(stage, plan))
                table = report.rows(runs, plan.summary())
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    took = time.monotonic() - began
    extra = "; over the Unix socket" if args.unix_socket else ""
    if args.pg_set or args.daemon_pg_set:
        extra += (
            f"; server settings {dict(args.pg_set)}, daemon sessions"
            f" {dict(args.daemon_pg_set)}"
        )
    title = "pdoflowd and its peers" if peers else "pdoflowd benchmark"
    header = (
        f"{title}, {stamp}, {plan.runs} run(s), medians"
        f" [each run], {took:.0f} s{extra}\n{machine.summary(facts)}"
    )
    if peers:
        header += f"\n{peersrun.describe(peers)}"
    if args.sweep:
        print(report.render_sweep(configs, header))
    else:
        print(report.render(table, header))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stamp}.json"
    path.write_text(
        json.dumps(
            {
                "command": ["python", "-m", "bench", *(argv or sys.argv[1:])],
                "machine": facts,
                "plan": peers_plan.__dict__ if peers else plan.__dict__,
                "settings": {
                    "server": dict(args.pg_set),
                    "daemon_sessions": dict(args.daemon_pg_set),
                },
                "seconds": took,
                "table": report.as_json(table),
                "runs": runs,
                "sweep": configs,
                "peers": peers,
            },
            indent=2,
        )
        + "\n"
    )
    say(f"wrote {path}")
    return 0
