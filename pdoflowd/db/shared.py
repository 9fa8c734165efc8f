"""The statements of a posting's shared variables.

Owns reading, setting, adding, locking, storing and deleting the small JSON
values of a posting (see :mod:`pdoflowd.sharedvars` for their interface).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from pdoflowd.db.common import (
    Connection,
    one_statement,
)

# ---------------------------------------------------------------- shared


@dataclass(frozen=True)
class SharedRead:
    """A shared variable as read: absent, or its stored (tagged) value."""

    found: bool
    value: Any


_SHARED_GET = """
SELECT v.posting_id IS NOT NULL, v.value
FROM pdoflowd.postings AS p
LEFT JOIN pdoflowd.shared_variables AS v
       ON v.posting_id = p.id AND v.name = %(name)s
WHERE p.uuid = %(posting)s
"""

_SHARED_SET = """
INSERT INTO pdoflowd.shared_variables (posting_id, name, value)
SELECT p.id, %(name)s, %(value)s::jsonb
FROM pdoflowd.postings AS p
WHERE p.uuid = %(posting)s
ON CONFLICT (posting_id, name)
DO UPDATE SET value = EXCLUDED.value, updated_at = now()
RETURNING 1
"""

_SHARED_ADD_DEFAULT = """
INSERT INTO pdoflowd.shared_variables (posting_id, name, value)
SELECT p.id, %(name)s, %(value)s::jsonb
FROM pdoflowd.postings AS p
WHERE p.uuid = %(posting)s
ON CONFLICT (posting_id, name) DO NOTHING
"""

_SHARED_LOCK = """
SELECT v.posting_id, v.value
FROM pdoflowd.shared_variables AS v
JOIN pdoflowd.postings AS p ON p.id = v.posting_id
WHERE p.uuid = %(posting)s AND v.name = %(name)s
FOR UPDATE OF v
"""

_SHARED_STORE = """
UPDATE pdoflowd.shared_variables
SET value = %(value)s::jsonb, updated_at = now()
WHERE posting_id = %(posting_id)s AND name = %(name)s
"""

_SHARED_DELETE = """
WITH target AS (
    SELECT id FROM pdoflowd.postings WHERE uuid = %(posting)s
), gone AS (
    DELETE FROM pdoflowd.shared_variables AS v
    USING target
    WHERE v.posting_id = target.id AND v.name = %(name)s
    RETURNING 1
)
SELECT (SELECT count(*) FROM target), (SELECT count(*) FROM gone)
"""

_SHARED_ALL = """
SELECT v.name, v.value
FROM pdoflowd.postings AS p
LEFT JOIN pdoflowd.shared_variables AS v ON v.posting_id = p.id
WHERE p.uuid = %(posting)s
ORDER BY v.name
"""


def shared_get(
    conn: Connection, posting_uuid: UUID, name: str
) -> SharedRead | None:
    """A posting's shared variable; None when there is no such posting."""
    row = conn.execute(
        _SHARED_GET, {"posting": posting_uuid, "name": name}
    ).fetchone()
    return None if row is None else SharedRead(bool(row[0]), row[1])


def shared_set(
    conn: Connection, posting_uuid: UUID, name: str, value_json: str
) -> bool:
    """Create or replace a shared variable; False: no such posting."""
    with one_statement(conn):
        row = conn.execute(
            _SHARED_SET,
            {"posting": posting_uuid, "name": name, "value": value_json},
        ).fetchone()
    return row is not None


def shared_lock(
    conn: Connection, posting_uuid: UUID, name: str, default_json: str
) -> tuple[int, Any] | None:
    """Lock a shared variable (created with the default if absent) for an
    update in the caller's transaction: (posting's internal id, value), or
    None when there is no such posting."""
    params = {"posting": posting_uuid, "name": name, "value": default_json}
    conn.execute(_SHARED_ADD_DEFAULT, params)
    row = conn.execute(_SHARED_LOCK, params).fetchone()
    return None if row is None else (row[0], row[1])


def shared_store(
    conn: Connection, posting_id: int, name: str, value_json: str
) -> None:
    """Write a variable locked by :func:`shared_lock` (same transaction)."""
    conn.execute(
        _SHARED_STORE,
        {"posting_id": posting_id, "name": name, "value": value_json},
    )


def shared_delete(
    conn: Connection, posting_uuid: UUID, name: str
) -> bool | None:
    """Delete a shared variable: whether it existed; None: no such posting."""
    with one_statement(conn):
        row = conn.execute(
            _SHARED_DELETE, {"posting": posting_uuid, "name": name}
        ).fetchone()
    assert row is not None
    return None if row[0] == 0 else row[1] > 0


def shared_all(conn: Connection, posting_uuid: UUID) -> dict[str, Any] | None:
    """Every shared variable of a posting; None when there is no posting."""
    rows = conn.execute(_SHARED_ALL, {"posting": posting_uuid}).fetchall()
    if not rows:
        return None
    return {name: value for name, value in rows if name is not None}
