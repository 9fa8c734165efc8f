"""Profiles of sampled jobs: when to take one, and its rows for SQL.

Owns the sampling decision (a pure function of the configured rate and a
random draw), and turning a finished ``cProfile.Profile`` into the rows
of ``pdoflowd.job_profiles``, ``profile_functions``,
``profile_function_stats`` and ``profile_call_map``. Writing them is one
transaction after the job (:func:`pdoflowd.profiles.insert_profile`), never
inside a claim. It must not decide anything else about a job.
"""

from __future__ import annotations

import cProfile
import pstats

from pdoflowd.db import common, profiles

__all__ = ["profile_record", "sampled"]

FunctionKey = tuple[str, int, str]


def sampled(rate: float, draw: float) -> bool:
    """Whether a job is profiled: ``draw`` from [0, 1) below ``rate``.

    Rate 0 never profiles, rate 1 always does.
    """
    return draw < rate


def profile_record(
    profile: cProfile.Profile, *, job_id: int, attempt: int, entry_point: str
) -> profiles.ProfileRecord:
    """The rows for one job's profile, functions numbered from 0."""
    stats = pstats.Stats(profile)
    raw = stats.stats  # type: ignore[attr-defined]
    index: dict[FunctionKey, int] = {}

    def number(key: FunctionKey) -> int:
        if key not in index:
            index[key] = len(index)
        return index[key]

    rows = []
    calls = []
    for key, (primitive, ncalls, tottime, cumtime, callers) in raw.items():
        callee = number(key)
        rows.append((callee, ncalls, primitive, tottime, cumtime))
        for caller_key, edge in callers.items():
            c_primitive, c_ncalls, c_tottime, c_cumtime = edge
            calls.append(
                (
                    number(caller_key),
                    callee,
                    c_ncalls,
                    c_primitive,
                    c_tottime,
                    c_cumtime,
                )
            )
    # File names may carry undecodable bytes as lone surrogates, which
    # PostgreSQL refuses: spelt out instead of losing the profile.
    text = common.storable_text
    functions = [
        (text(filename), line, text(name)) for (filename, line, name) in index
    ]
    return profiles.ProfileRecord(
        job_id=job_id,
        attempt=attempt,
        entry_point=entry_point,
        total_time=float(stats.total_tt),  # type: ignore[attr-defined]
        ncalls=int(stats.total_calls),  # type: ignore[attr-defined]
        primitive_calls=int(stats.prim_calls),  # type: ignore[attr-defined]
        functions=functions,
        stats=rows,
        calls=calls,
    )
