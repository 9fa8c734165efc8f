"""The one table the benchmark prints, from the runs' raw figures.

Owns turning per-run results into rows: the median over runs, every run's
value, the target, and whether the median meets it (with the ratio). It
computes nothing that was not measured.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Run = dict[str, Any]


@dataclass(frozen=True)
class Row:
    """One line of the table; ``values`` has one entry per run."""

    label: str
    values: list[float]
    unit: str = ""
    digits: int = 0
    target: float | None = None
    # "min": the median must be at least the target; "max": at most;
    # "eq": exactly.
    sense: str = "min"

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def text(self, value: float) -> str:
        return f"{value:,.{self.digits}f}"

    def verdict(self) -> str:
        if self.target is None:
            return ""
        median, target = self.median, self.target
        if self.sense == "eq":
            return "met" if median == target else "NOT met"
        met = median >= target if self.sense == "min" else median <= target
        word = "met" if met else "NOT met"
        if self.sense == "min":
            return f"{word} ({median / target:.2f}x)"
        return f"{word} ({target / median:.2f}x margin)" if met else word

    def target_text(self) -> str:
        if self.target is None:
            return ""
        sign = {"min": ">=", "max": "<=", "eq": "=="}[self.sense]
        return f"{sign} {self.text(self.target)}"


def _series(runs: Sequence[Run], pick: Callable[[Run], float]) -> list[float]:
    return [float(pick(run)) for run in runs]


# The performance issue's targets for a drain of no-op jobs: its rate
# against PostgreSQL's limit (pgbench, same W and B), pdoflowd's own CPU
# per job (all its processes) by batch size (none for other sizes), and
# PostgreSQL's CPU per job serving pdoflowd against serving pgbench.
DRAIN_OVER_LIMIT_MIN = 0.7
DAEMON_CPU_US_MAX = {10: 40.0, 100: 15.0}
SERVER_CPU_OVER_PGBENCH_MAX = 1.2
# Many single-job postings drain at least at this share of the rate of
# one posting of as many jobs: settling postings must not dominate.
SMALL_POSTINGS_OVER_ONE_MIN = 0.5

Add = Callable[..., None]


def _drain_rows(
    add: Add,
    drain: str,
    limit: str,
    *,
    w: int,
    b: int,
    rate_target: float | None = None,
) -> None:
    """A drain next to PostgreSQL's limit: rates, ratio, CPU per job."""
    add(
        "pdoflowd drain",
        lambda r: r[drain]["jobs_per_s"],
        unit="jobs/s",
        target=rate_target,
    )
    add(
        f"PostgreSQL limit (pgbench cycle.sql, -c {w}, batch {b})",
        lambda r: r[limit]["jobs_per_s"],
        unit="jobs/s",
    )
    add(
        "drain / limit (same run)",
        lambda r: r[drain]["jobs_per_s"] / r[limit]["jobs_per_s"],
        digits=2,
        target=DRAIN_OVER_LIMIT_MIN,
    )
    add(
        "CPU per job: pdoflowd daemon (workers, supervisor)",
        lambda r: r[drain]["client_cpu_us_per_job"],
        unit="us",
        digits=1,
        target=DAEMON_CPU_US_MAX.get(b),
        sense="max",
    )
    add(
        "  of which the supervisor",
        lambda r: r[drain]["supervisor_cpu_us_per_job"],
        unit="us",
        digits=1,
    )
    add(
        "CPU per job: PostgreSQL serving pdoflowd",
        lambda r: r[drain]["server_cpu_us_per_job"],
        unit="us",
    )
    add(
        "CPU per job: pgbench",
        lambda r: r[limit]["client_cpu_us_per_job"],
        unit="us",
    )
    add(
        "CPU per job: PostgreSQL serving pgbench",
        lambda r: r[limit]["server_cpu_us_per_job"],
        unit="us",
    )
    add(
        "PostgreSQL CPU per job, pdoflowd / pgbench",
        lambda r: (
            r[drain]["server_cpu_us_per_job"]
            / r[limit]["server_cpu_us_per_job"]
        ),
        digits=2,
        target=SERVER_CPU_OVER_PGBENCH_MAX,
        sense="max",
    )
    add("jobs per claim (mean)", lambda r: r[drain]["mean_claim"], digits=1)
    add("jobs run more than once", lambda r: r[drain]["reruns"])


def rows(runs: Sequence[Run], plan: dict[str, Any]) -> list[Row | str]:
    """The table's rows (a str is a section heading)."""
    mib = 1 / 1024
    w, b = plan["workers"], plan["batch"]
    out: list[Row | str] = []

    def add(label: str, pick: Callable[[Run], float], **kw: Any) -> None:
        values = _series(runs, pick)
        if all(math.isfinite(v) for v in values):
            out.append(Row(label, values, **kw))

    out.append(
        f"Enqueue: Client.post, one COPY (jobs {plan['enqueue_jobs']:,})"
    )
    add(
        f"post {plan['enqueue_jobs']:,} jobs",
        lambda r: r["enqueue"]["jobs_per_s"],
        unit="jobs/s",
        target=100_000,
    )
    add(
        f"PostgreSQL COPY limit, {plan['enqueue_jobs']:,} pre-rendered rows",
        lambda r: r["copy_limit"]["jobs_per_s"],
        unit="rows/s",
    )
    add(
        "post / COPY limit, same run",
        lambda r: r["enqueue"]["jobs_per_s"] / r["copy_limit"]["jobs_per_s"],
        digits=2,
        target=0.9,
    )
    add(
        f"post {plan['enqueue_small']:,} jobs",
        lambda r: r["enqueue_small"]["jobs_per_s"],
        unit="jobs/s",
    )
    add(
        f"RSS growth during post, {plan['enqueue_small']:,} jobs",
        lambda r: r["enqueue_small"]["rss_growth_kib"] * mib,
        unit="MiB",
        digits=1,
    )
    add(
        f"RSS growth during post, {plan['enqueue_jobs']:,} jobs",
        lambda r: r["enqueue"]["rss_growth_kib"] * mib,
        unit="MiB",
        digits=1,
    )
    add(
        "RSS growth per job (large post)",
        lambda r: r["enqueue"]["rss_growth_kib"] * 1024 / r["enqueue"]["jobs"],
        unit="bytes",
    )

    flush = plan["flush_ms"]
    flush_text = "default" if flush is None else f"{flush}"
    out.append(
        f"Drain at batch {b}: {plan['jobs']:,} no-op jobs, W={w} workers,"
        f" outcome_flush_ms {flush_text}, empty table"
    )
    _drain_rows(add, "drain", "limit", w=w, b=b, rate_target=15_000)
    add(
        f"claim latency p50 (queries.claim, {b} jobs)",
        lambda r: r["claim"]["p50"] * 1000,
        unit="ms",
        digits=2,
    )
    add(
        "claim latency p99",
        lambda r: r["claim"]["p99"] * 1000,
        unit="ms",
        digits=2,
    )

    small = plan.get("small_batch", 0)
    if small:
        out.append(
            f"Drain at batch {small}: {plan['jobs']:,} no-op jobs, W={w}"
            f" workers, outcome_flush_ms {flush_text}, empty table"
        )
        _drain_rows(add, "small_drain", "small_limit", w=w, b=small)

    count = plan["pickups"]
    if count:
        out.append(
            f"Pickup: idle daemon, {count} single-job postings, one at a time"
        )

        def latency(kind: str, q: str) -> Callable[[Run], float]:
            def pick(run: Run) -> float:
                return float(run["drain"]["pickup"][kind][q]) * 1000

            return pick

        for q, target in (("p50", 3.0), ("p95", None), ("p99", 20.0)):
            add(
                f"{q} from post() returning (after the commit)",
                latency("from_returned", q),
                unit="ms",
                digits=2,
                target=target,
                sense="max",
            )
        if all(r["drain"]["pickup"]["from_commit"] for r in runs):
            for q in ("p50", "p99"):
                add(
                    f"{q} from the commit record (before its WAL flush)",
                    latency("from_commit", q),
                    unit="ms",
                    digits=2,
                )
        for q in ("p50", "p99"):
            add(
                f"{q} from created_at (the posting's transaction start)",
                latency("from_created", q),
                unit="ms",
                digits=2,
            )

    n = plan.get("postings", 0)
    if n:
        out.append(
            f"Postings: {n:,} no-op jobs as one posting, then as {n:,}"
            f" postings of one job, W={w}, batch {b}"
        )
        add(
            f"one posting of {n:,} jobs",
            lambda r: r["postings"]["one_posting_jobs_per_s"],
            unit="jobs/s",
        )
        add(
            f"{n:,} postings of one job",
            lambda r: r["postings"]["small_postings_jobs_per_s"],
            unit="jobs/s",
        )
        add(
            "single-job postings / one posting (same run)",
            lambda r: r["postings"]["ratio"],
            digits=2,
            target=SMALL_POSTINGS_OVER_ONE_MIN,
        )

    out.append(
        f"History: the same drain with {plan['history']:,} finished jobs kept"
    )
    add(
        "pdoflowd drain",
        lambda r: r["drain_history"]["jobs_per_s"],
        unit="jobs/s",
    )
    add(
        "PostgreSQL limit",
        lambda r: r["limit_history"]["jobs_per_s"],
        unit="jobs/s",
    )
    add(
        "drain with history / drain on empty table",
        lambda r: r["drain_history"]["jobs_per_s"] / r["drain"]["jobs_per_s"],
        digits=2,
        target=0.9,
    )
    add(
        "limit with history / limit on empty table",
        lambda r: r["limit_history"]["jobs_per_s"] / r["limit"]["jobs_per_s"],
        digits=2,
    )
    add(
        "claim latency p50 with history",
        lambda r: r["claim_history"]["p50"] * 1000,
        unit="ms",
        digits=2,
    )
    add(
        "claim latency p99 with history",
        lambda r: r["claim_history"]["p99"] * 1000,
        unit="ms",
        digits=2,
    )

    hoard = runs[0]["hoarding"]
    out.append(
        f"Hoarding: {hoard['jobs']} jobs of {hoard['nap_s'] * 1000:g} ms,"
        f" 2 workers, batch {hoard['batch_size']}"
    )
    add("largest claim", lambda r: r["hoarding"]["largest_claim"], unit="jobs")
    add(
        "work in the largest claim",
        lambda r: r["hoarding"]["largest_claim_s"],
        unit="s",
        digits=2,
        target=1.0,
        sense="max",
    )

    out.append(f"Footprint: idle daemon, W={w}, before any job ran")
    add(
        "supervisor VmRSS",
        lambda r: r["drain"]["supervisor"]["rss_kib"] * mib,
        unit="MiB",
        digits=1,
    )
    add(
        "supervisor Pss",
        lambda r: r["drain"]["supervisor"]["pss_kib"] * mib,
        unit="MiB",
        digits=1,
    )
    add(
        "one worker VmRSS",
        lambda r: r["drain"]["worker"]["rss_kib"] * mib,
        unit="MiB",
        digits=1,
    )
    add(
        "one worker Pss",
        lambda r: r["drain"]["worker"]["pss_kib"] * mib,
        unit="MiB",
        digits=1,
    )
    add(
        "connections held (application_name pdoflowd)",
        lambda r: r["drain"]["connections"],
        target=w + 1,
        sense="eq",
    )
    return out


def peer_rows(
    runs: Sequence[Run], plan: dict[str, Any], about: dict[str, Any]
) -> list[Row | str]:
    """The ``--peers`` table: drains, ratios against targets, CPU per job."""
    w, b, n = plan["workers"], plan["batch"], plan["jobs"]
    versions = about["versions"]
    concurrency = about["settings"]["procrastinate"]["concurrency"]
    out: list[Row | str] = []

    def add(label: str, pick: Callable[[Run], float], **kw: Any) -> None:
        values = _series(runs, pick)
        if all(math.isfinite(v) for v in values):
            out.append(Row(label, values, **kw))

    def rate(key: str) -> Callable[[Run], float]:
        return lambda r: float(r[key]["jobs_per_s"])

    def ratio(key: str) -> Callable[[Run], float]:
        return lambda r: r["drain"]["jobs_per_s"] / r[key]["jobs_per_s"]

    out.append(
        f"Peers: drain of {n:,} pre-loaded no-op jobs, W={w} worker"
        f" processes, batch {b}; each peer on a fresh database"
    )
    add(
        f"PostgreSQL limit (pgbench cycle.sql, -c {w}, batch {b})",
        rate("limit"),
        unit="jobs/s",
    )
    add(f"pdoflowd (batch_size {b})", rate("drain"), unit="jobs/s")
    add(
        f"PgQueuer {versions['pgqueuer']} (batch_size {b})",
        rate("pgqueuer"),
        unit="jobs/s",
    )
    add(
        f"procrastinate {versions['procrastinate']} (concurrency"
        f" {concurrency}, no batch size)",
        rate("procrastinate"),
        unit="jobs/s",
    )
    add("pdoflowd / limit (same run)", ratio("limit"), digits=2)
    add(
        "pdoflowd / PgQueuer (same run)",
        ratio("pgqueuer"),
        digits=2,
        target=2.0,
    )
    add(
        "pdoflowd / procrastinate (same run)",
        ratio("procrastinate"),
        digits=1,
        target=30.0,
    )

    out.append(
        "CPU per job: the queue's own processes, and PostgreSQL serving them"
    )
    for label, key in (
        ("pgbench", "limit"),
        ("pdoflowd daemon (workers, supervisor)", "drain"),
        ("PgQueuer worker processes", "pgqueuer"),
        ("procrastinate worker processes", "procrastinate"),
    ):
        add(
            f"CPU per job: {label}",
            lambda r, key=key: r[key]["client_cpu_us_per_job"],
            unit="us",
        )
        add(
            f"  PostgreSQL serving {label.split()[0]}",
            lambda r, key=key: r[key]["server_cpu_us_per_job"],
            unit="us",
        )
    return out


def render_sweep(results: Sequence[dict[str, Any]], header: str) -> str:
    """A sweep as text: one line per configuration, medians over runs.

    CPU columns are microseconds of CPU per job: client side (the daemon's
    processes, or pgbench) + server side (the whole PostgreSQL cluster).
    """
    lines = [
        header,
        "",
        "Sweep: drain against PostgreSQL's limit (pgbench, same W and B),"
        " medians [each run]",
        "CPU: microseconds of CPU per job, client side + server side",
        "",
        f"  {'configuration':<26}  {'drain jobs/s':<26}  {'limit jobs/s':<26}"
        f"  {'ratio':>5}  {'CPU pdoflowd':>12}  {'CPU pgbench':>11}",
    ]
    for config in results:
        runs = config["runs"]

        def median(key: str, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.median(float(r[key]) for r in runs)

        def cell(key: str, runs: list[dict[str, Any]] = runs) -> str:
            each = " ".join(f"{r[key] / 1000:.1f}k" for r in runs)
            return f"{median(key):,.0f} [{each}]"

        ratio = statistics.median(r["drain"] / r["limit"] for r in runs)
        ours = (
            f"{median('drain_client_us'):.0f}+{median('drain_server_us'):.0f}"
        )
        theirs = (
            f"{median('limit_client_us'):.0f}+{median('limit_server_us'):.0f}"
        )
        lines.append(
            f"  {config['label']:<26}  {cell('drain'):<26}"
            f"  {cell('limit'):<26}  {ratio:>5.2f}  {ours:>12}  {theirs:>11}"
        )
    return "\n".join(lines)


def render(table: Sequence[Row | str], header: str) -> str:
    """The table as text: label, median, runs, target, verdict."""
    lines = [header, ""]
    width = max((len(r.label) for r in table if isinstance(r, Row)), default=20)
    for row in table:
        if isinstance(row, str):
            lines += ["", row, "-" * len(row)]
            continue
        runs = "  ".join(row.text(v) for v in row.values)
        median = f"{row.text(row.median)} {row.unit}".rstrip()
        lines.append(
            f"  {row.label:<{width}}  {median:>16}   [{runs}]"
            f"  {row.target_text()}  {row.verdict()}".rstrip()
        )
    return "\n".join(lines)


def as_json(table: Sequence[Row | str]) -> list[dict[str, Any]]:
    """The table's rows, for the JSON file next to the raw figures."""
    section = ""
    out = []
    for row in table:
        if isinstance(row, str):
            section = row
            continue
        out.append(
            {
                "section": section,
                "label": row.label,
                "unit": row.unit,
                "median": row.median,
                "runs": row.values,
                "target": row.target,
                "verdict": row.verdict(),
            }
        )
    return out
