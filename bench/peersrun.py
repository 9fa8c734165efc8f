"""The ``--peers`` mode: pdoflowd next to PgQueuer and procrastinate.

Owns the order of one comparison run on one server and the figures it
keeps: PostgreSQL's limit (pgbench running ``cycle.sql`` with W clients
and batch B) and pdoflowd's drain (W workers, batch B) on the benchmark's
database, then PgQueuer's and procrastinate's drains of as many no-op jobs
by W worker processes each, each peer on a fresh database. Making the
peers' environment is :mod:`bench.peers.install`'s, timing a peer
:mod:`bench.peers.drain`'s, the table :func:`bench.report.peer_rows`'s.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import database, phases
from bench.daemon import DaemonSettings
from bench.peers import drain, install
from bench.progress import say, timed


@dataclass(frozen=True)
class PeersPlan:
    """What a ``--peers`` comparison runs, and how often."""

    runs: int
    workers: int
    batch: int
    jobs: int
    procrastinate_concurrency: int

    @property
    def knobs(self) -> drain.Knobs:
        return drain.Knobs(self.batch, self.procrastinate_concurrency)


def _rate(result: dict[str, Any]) -> str:
    return f"{result['jobs_per_s']:,.0f} jobs/s"


def _reset(stage: phases.Stage) -> None:
    with database.connect(stage.dsn) as conn:
        database.reset(conn)


def one_run(
    stage: phases.Stage, admin_dsn: str, plan: PeersPlan
) -> dict[str, Any]:
    """Limit, pdoflowd, then each peer, once, on the same server."""
    w, b, n = plan.workers, plan.batch, plan.jobs
    out: dict[str, Any] = {"load_before": os.getloadavg()}
    _reset(stage)
    out["limit"] = timed(
        "PostgreSQL limit",
        lambda: phases.pg_limit(stage, clients=w, batch=b, jobs=n),
        _rate,
    )
    _reset(stage)
    settings = DaemonSettings(w, b)
    out["drain"] = timed(
        f"pdoflowd drain {settings.label()}",
        lambda: phases.drain(stage, settings, jobs=n),
        lambda r: f"{r.jobs_per_s:,.0f} jobs/s",
    ).as_json()
    _reset(stage)
    for peer in drain.PEERS:
        out[peer.key] = timed(
            f"{peer.name} drain",
            functools.partial(
                drain.drain,
                peer,
                admin_dsn=admin_dsn,
                python=install.PYTHON,
                workers=w,
                knobs=plan.knobs,
                jobs=n,
                server_cpu=stage.server_cpu,
                log_dir=stage.work_dir.parent / "peers",
            ),
            _rate,
        )
    out["load_after"] = os.getloadavg()
    return out


def measure(
    stage: phases.Stage, admin_dsn: str, plan: PeersPlan
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every run, and what the peers were: versions and settings."""
    versions = install.ensure(say)
    runs = []
    for index in range(plan.runs):
        say(f"run {index + 1}/{plan.runs}")
        runs.append(one_run(stage, admin_dsn, plan))
    about = {
        "venv": str(install.VENV_DIR),
        "versions": versions,
        "settings": {
            peer.key: peer.settings(plan.knobs) for peer in drain.PEERS
        },
    }
    return runs, about


def describe(about: dict[str, Any]) -> str:
    """One line on the peers' software for the top of the table."""
    v = about["versions"]
    where = Path(about["venv"])
    with_root = where.relative_to(install.REPO_ROOT)
    return (
        f"peers: PgQueuer {v['pgqueuer']} (asyncpg {v['asyncpg']}, uvloop"
        f" {v['uvloop']}), procrastinate {v['procrastinate']} (psycopg"
        f" {v['psycopg']} ({v['psycopg_impl']}), psycopg-pool"
        f" {v['psycopg-pool']}); Python {v['python']} in {with_root}"
    )
