"""The statements of job profiles.

Owns storing one sampled job's cProfile statistics and reading them back
as per-function statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from pdoflowd.db.common import (
    Connection,
)

# ---------------------------------------------------------------- profiles


@dataclass(frozen=True)
class ProfileRecord:
    """One job's profile, flattened: functions are (file, line, name);
    stats and calls refer to them by their index in ``functions``."""

    job_id: int
    attempt: int
    entry_point: str
    total_time: float
    ncalls: int
    primitive_calls: int
    functions: list[tuple[str, int, str]]
    # (function, ncalls, primitive calls, tottime, cumtime)
    stats: list[tuple[int, int, int, float, float]]
    # (caller, callee, ncalls, primitive calls, tottime, cumtime)
    calls: list[tuple[int, int, int, int, float, float]]


_INSERT_PROFILE = """
INSERT INTO pdoflowd.job_profiles
    (job_id, attempt, entry_point, total_time, ncalls, primitive_calls)
VALUES (%(job_id)s, %(attempt)s, %(entry_point)s, %(total_time)s,
        %(ncalls)s, %(primitive_calls)s)
RETURNING id
"""

# Sorted, so that concurrent writers take the unique index's locks in the
# same order and cannot deadlock.
_ADD_PROFILE_FUNCTIONS = """
INSERT INTO pdoflowd.profile_functions (filename, line, name)
SELECT * FROM unnest(%(files)s::text[], %(lines)s::integer[],
                     %(names)s::text[]) AS f(filename, line, name)
ORDER BY filename, line, name
ON CONFLICT (filename, line, name) DO NOTHING
"""

_PROFILE_FUNCTION_IDS = """
SELECT f.id, k.n
FROM unnest(%(files)s::text[], %(lines)s::integer[], %(names)s::text[])
     WITH ORDINALITY AS k(filename, line, name, n)
JOIN pdoflowd.profile_functions AS f
  ON f.filename = k.filename AND f.line = k.line AND f.name = k.name
"""

_INSERT_FUNCTION_STATS = """
INSERT INTO pdoflowd.profile_function_stats
    (profile_id, function_id, ncalls, primitive_calls, tottime, cumtime)
SELECT %(profile_id)s, * FROM unnest(
    %(functions)s::bigint[], %(ncalls)s::bigint[], %(pcalls)s::bigint[],
    %(tottime)s::double precision[], %(cumtime)s::double precision[])
"""

_INSERT_CALL_MAP = """
INSERT INTO pdoflowd.profile_call_map
    (profile_id, caller_id, callee_id, ncalls, primitive_calls, tottime,
     cumtime)
SELECT %(profile_id)s, * FROM unnest(
    %(callers)s::bigint[], %(callees)s::bigint[], %(ncalls)s::bigint[],
    %(pcalls)s::bigint[], %(tottime)s::double precision[],
    %(cumtime)s::double precision[])
"""


def insert_profile(conn: Connection, record: ProfileRecord) -> int:
    """Store one job's profile in one transaction; returns its id."""
    keys = {
        "files": [f[0] for f in record.functions],
        "lines": [f[1] for f in record.functions],
        "names": [f[2] for f in record.functions],
    }
    with conn.transaction():
        row = conn.execute(
            _INSERT_PROFILE,
            {
                "job_id": record.job_id,
                "attempt": record.attempt,
                "entry_point": record.entry_point,
                "total_time": record.total_time,
                "ncalls": record.ncalls,
                "primitive_calls": record.primitive_calls,
            },
        ).fetchone()
        assert row is not None
        profile_id: int = row[0]
        conn.execute(_ADD_PROFILE_FUNCTIONS, keys)
        ids = {
            n - 1: fid
            for fid, n in conn.execute(_PROFILE_FUNCTION_IDS, keys).fetchall()
        }
        conn.execute(
            _INSERT_FUNCTION_STATS,
            {
                "profile_id": profile_id,
                "functions": [ids[s[0]] for s in record.stats],
                "ncalls": [s[1] for s in record.stats],
                "pcalls": [s[2] for s in record.stats],
                "tottime": [s[3] for s in record.stats],
                "cumtime": [s[4] for s in record.stats],
            },
        )
        conn.execute(
            _INSERT_CALL_MAP,
            {
                "profile_id": profile_id,
                "callers": [ids[c[0]] for c in record.calls],
                "callees": [ids[c[1]] for c in record.calls],
                "ncalls": [c[2] for c in record.calls],
                "pcalls": [c[3] for c in record.calls],
                "tottime": [c[4] for c in record.calls],
                "cumtime": [c[5] for c in record.calls],
            },
        )
    return profile_id


@dataclass(frozen=True)
class FunctionStat:
    """One function's time summed over the profiles of matching jobs."""

    filename: str
    line: int
    name: str
    profiles: int
    ncalls: int
    tottime: float
    cumtime: float


_FUNCTION_STATS = """
SELECT f.filename, f.line, f.name, count(*), sum(s.ncalls), sum(s.tottime),
       sum(s.cumtime)
FROM pdoflowd.profile_function_stats AS s
JOIN pdoflowd.profile_functions AS f ON f.id = s.function_id
JOIN pdoflowd.job_profiles AS jp ON jp.id = s.profile_id
WHERE (%(entry_point)s::text IS NULL OR jp.entry_point = %(entry_point)s)
  AND (%(posting)s::uuid IS NULL OR jp.job_id IN (
      SELECT j.id FROM pdoflowd.jobs AS j
      JOIN pdoflowd.postings AS p ON p.id = j.posting_id
      WHERE p.uuid = %(posting)s))
GROUP BY f.id
ORDER BY sum(s.tottime) DESC, f.id
LIMIT %(limit)s
"""


def function_stats(
    conn: Connection,
    *,
    entry_point: str | None = None,
    posting: UUID | None = None,
    limit: int = 20,
) -> list[FunctionStat]:
    """The functions that took most time in profiled jobs (of one entry
    point, of one posting's jobs, if given), by total time spent in the
    function itself."""
    rows = conn.execute(
        _FUNCTION_STATS,
        {"entry_point": entry_point, "posting": posting, "limit": limit},
    ).fetchall()
    return [
        FunctionStat(r[0], r[1], r[2], int(r[3]), int(r[4]), r[5], r[6])
        for r in rows
    ]
