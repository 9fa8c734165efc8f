"""The claim statement of two checkouts, interleaved call by call:
``python -m bench.caps.claim_ab BASE_CHECKOUT [N] [B] [ROUNDS] [MODE]
[counts]``.

Starts a throwaway PostgreSQL with two databases, ``base`` migrated by the
checkout at BASE_CHECKOUT (e.g. ``git archive c154e7a | tar -x -C
/tmp/base``) and
``caps`` by this one, and drains N no-op jobs (default 10,000) from each
with one connection per database and no daemon: each call of
``pdoflowd.claim_jobs`` writes the outcomes of the batch before it (done)
and claims the next B (default 100). The two databases are called in turn,
so the machine's noise falls on both alike. MODE ``uncapped`` (default)
posts plain postings to both; ``max_running`` and ``uses`` post capped ones
to ``caps`` (caps that never bind), so its claim takes the capped path.
``counts`` turns ``caps`` into the counts-table variant first
(:mod:`bench.caps.counts_variant`). Prints, per database, the claim
statements' time per job in each round after a warm-up round, and the
median. Measures statements, not a daemon: see ``bench.cpuprobe`` for that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from bench.caps import counts_variant
from devtools import devcluster

_CLAIM = {
    "base": "SELECT * FROM pdoflowd.claim_jobs("
    "%s, %s::json, %s, %s, %s, '{}', '{}')",
    "caps": "SELECT * FROM pdoflowd.claim_jobs("
    "%s, %s::json, %s, %s, %s, '{}', '{}', '{tape}', '{1000000}')",
}
_CAPS_COLUMNS = {
    "uncapped": ("", ""),
    "max_running": (", max_running, uses", ", 1000000, '{}'"),
    "uses": (", max_running, uses", ", NULL, '{tape}'"),
}
_MIGRATE = (
    "import sys; from pdoflowd.db import migrate; migrate.upgrade(sys.argv[1])"
)


def _post(conn: Any, jobs: int, columns: str, values: str) -> None:
    posting = conn.execute(
        "INSERT INTO pdoflowd.postings (uuid, target_function, entry_point"
        f"{columns}) VALUES (gen_random_uuid(), 'noop', 'bench.jobs.noop'"
        f"{values}) RETURNING id"
    ).fetchone()[0]
    conn.execute(
        "INSERT INTO pdoflowd.jobs (uuid, posting_id, posargs)"
        " SELECT gen_random_uuid(), %s, jsonb_build_array(g)"
        " FROM generate_series(1, %s) AS g",
        (posting, jobs),
    )


def _drain(conns: dict[str, Any], batch: int) -> dict[str, float]:
    """Drain every database, a call in each in turn; seconds spent in
    the claim statements, per database."""
    spent = dict.fromkeys(conns, 0.0)
    state: dict[str, tuple[uuid.UUID | None, str | None]] = dict.fromkeys(
        conns, (None, None)
    )
    daemon = uuid.uuid4()
    left = set(conns)
    while left:
        for name in sorted(left):
            finishing, outcomes = state[name]
            owner = uuid.uuid4()
            began = time.perf_counter()
            rows = (
                conns[name]
                .execute(
                    _CLAIM[name],
                    (finishing, outcomes, owner, daemon, batch),
                    binary=True,
                )
                .fetchall()
            )
            spent[name] += time.perf_counter() - began
            now = time.time()
            claimed = [row for row in rows if not row[0]]
            done = [
                {
                    "id": row[1],
                    "attempt": row[9],
                    "kind": "done",
                    "started": now,
                    "completed": now,
                }
                for row in claimed
            ]
            state[name] = (owner, json.dumps(done) if done else None)
            if not rows:
                left.discard(name)
    return spent


def main(argv: list[str]) -> int:
    base = argv[0]
    jobs = int(argv[1]) if len(argv) > 1 else 10_000
    batch = int(argv[2]) if len(argv) > 2 else 100
    rounds = int(argv[3]) if len(argv) > 3 else 3
    mode = argv[4] if len(argv) > 4 else "uncapped"
    counts = len(argv) > 5 and argv[5] == "counts"
    here = str(Path(__file__).resolve().parents[2])
    work = Path(tempfile.mkdtemp(prefix="pdoflowd-claim-ab-"))
    with devcluster.LocalCluster(work / "pg") as cluster:
        dsns = {}
        for name, root in (("base", base), ("caps", here)):
            dsns[name] = cluster.create_database(name)
            subprocess.run(
                [sys.executable, "-c", _MIGRATE, dsns[name]],
                env={**os.environ, "PYTHONPATH": root},
                cwd=root,
                check=True,
            )
        if counts:
            counts_variant.apply(dsns["caps"])
        conns = {
            k: psycopg.connect(v, autocommit=True) for k, v in dsns.items()
        }
        per_job: dict[str, list[float]] = {name: [] for name in conns}
        for round_ in range(rounds + 1):
            for name, conn in conns.items():
                columns, values = _CAPS_COLUMNS[
                    mode if name == "caps" else "uncapped"
                ]
                _post(conn, jobs, columns, values)
            spent = _drain(conns, batch)
            if round_:
                for name in conns:
                    per_job[name].append(spent[name] * 1e6 / jobs)
        for conn in conns.values():
            conn.close()
    for name, values in per_job.items():
        median = sorted(values)[len(values) // 2]
        shown = " ".join(f"{v:.1f}" for v in values)
        print(
            f"{name} ({mode if name == 'caps' else 'uncapped'}), B={batch}:"
            f" {shown} us of claim statement per job, median {median:.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
