"""A measuring stick, not a feature: the capped claim as it would be with
a table of counts kept in step, instead of a count under advisory locks.

:func:`apply` turns a database at the caps schema into that variant:
``pdoflowd.cap_counts`` (one row per capped posting, ``p:ID``, and per
resource, ``r:NAME``) kept by a trigger on every job status change into or
out of ``executing``, the claim reading the counts from it and locking its
rows (sorted) where it took advisory locks. Used by
:mod:`bench.caps.claim_ab` and :mod:`bench.caps.capped_drain` only.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg

_TRIGGER = """
CREATE TABLE pdoflowd.cap_counts (
    key text PRIMARY KEY, running integer NOT NULL DEFAULT 0);
CREATE FUNCTION pdoflowd.count_caps() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    p record;
    delta integer;
BEGIN
    SELECT max_running, uses INTO p
    FROM pdoflowd.postings WHERE id = NEW.posting_id;
    IF p.max_running IS NULL AND p.uses = '{}' THEN
        RETURN NULL;
    END IF;
    delta := CASE WHEN NEW.status = 'executing' THEN 1 ELSE -1 END;
    INSERT INTO pdoflowd.cap_counts AS c (key, running)
    SELECT k, delta
    FROM unnest(
        CASE WHEN p.max_running IS NULL THEN '{}'::text[]
             ELSE ARRAY['p:' || NEW.posting_id] END
        || ARRAY(SELECT 'r:' || u FROM unnest(p.uses) AS u)) AS k
    ORDER BY k
    ON CONFLICT (key) DO UPDATE SET running = c.running + delta;
    RETURN NULL;
END
$$;
CREATE TRIGGER count_caps AFTER UPDATE OF status ON pdoflowd.jobs
    FOR EACH ROW
    WHEN ((OLD.status = 'executing') <> (NEW.status = 'executing'))
    EXECUTE FUNCTION pdoflowd.count_caps();
"""

_RESOURCES_FROM_COUNTS = """
BEGIN
    RETURN (
        SELECT coalesce(jsonb_object_agg(substr(c.key, 3), c.running), '{}')
        FROM pdoflowd.cap_counts AS c WHERE c.key LIKE 'r:%');
END
"""

_POSTING_COUNT = (
    "coalesce((SELECT x.running FROM pdoflowd.cap_counts AS x"
    " WHERE x.key = 'p:' || c.id), 0)"
)

_KEYS = (
    "SELECT 'p:' || p.id FROM pdoflowd.postings AS p"
    " WHERE p.id = ANY(locked) AND p.max_running IS NOT NULL"
    " UNION ALL SELECT 'r:' || u.name FROM pdoflowd.postings AS p,"
    " unnest(p.uses) AS u(name) WHERE p.id = ANY(locked)"
)


def _source(conn: Any, name: str) -> str:
    row = conn.execute(
        "SELECT pg_get_functiondef(p.oid) FROM pg_proc AS p"
        " JOIN pg_namespace AS n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'pdoflowd' AND p.proname = %s",
        (name,),
    ).fetchone()
    return str(row[0])


def apply(dsn: str) -> None:
    """Make the database at ``dsn`` claim capped jobs by a counts table."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_TRIGGER)
        source = _source(conn, "resources_in_use")
        start = source.index("AS $function$") + len("AS $function$")
        end = source.rindex("$function$")
        conn.execute(source[:start] + _RESOURCES_FROM_COUNTS + source[end:])
        source = _source(conn, "capped_candidates")
        count = re.search(
            r"\(\s*SELECT count\(\*\) FROM pdoflowd\.jobs AS j\s*"
            r"WHERE j\.posting_id = c\.id AND j\.status = 'executing'\)",
            source,
        )
        assert count is not None, source
        conn.execute(source.replace(count.group(0), _POSTING_COUNT))
        source = _source(conn, "claim_jobs")
        start = source.index("PERFORM pg_advisory_xact_lock(k.key)")
        end = source.index(") AS k;", start) + len(") AS k;")
        lock = (
            f"INSERT INTO pdoflowd.cap_counts (key) {_KEYS}"
            " ON CONFLICT DO NOTHING;"
            f" PERFORM FROM pdoflowd.cap_counts AS x WHERE x.key IN ({_KEYS})"
            " ORDER BY x.key FOR UPDATE;"
        )
        conn.execute(source[:start] + lock + source[end:])
