"""Shared variables: small JSON values that the jobs of one posting share.

Owns the API over ``pdoflowd.shared_variables``: get, set, an atomic
update (the variable's row locked with ``SELECT … FOR UPDATE`` for one short
transaction while a function computes the new value), delete and listing,
from the client or from inside a job. Names are checked and values encoded
like job arguments (non-finite floats round-trip) before anything is
written. It must not keep a transaction open beyond one call.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import psycopg

from pdoflowd.arguments import (
    ValueNotStorable,
    check_text,
    decode,
    encode_value,
)
from pdoflowd.db import shared

__all__ = ["MAX_NAME_BYTES", "SharedVariableError", "SharedVariables"]

# The name is part of a btree key, whose entries PostgreSQL caps at about
# 2.7 kB; a name is an identifier, not a place for data.
MAX_NAME_BYTES = 1024

Session = Callable[[], AbstractContextManager[psycopg.Connection[Any]]]


class SharedVariableError(ValueError):
    """A name or value that cannot be stored; nothing was written."""


def check_name(name: Any) -> str:
    """Accept a variable name as it is, or refuse it."""
    if not isinstance(name, str) or not name:
        raise SharedVariableError(
            f"a shared variable name must be a non-empty string: {name!r}"
        )
    try:
        check_text(name, "name", "the name")
    except ValueNotStorable as exc:
        raise SharedVariableError(exc.problem) from None
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise SharedVariableError(
            f"a shared variable name may have at most {MAX_NAME_BYTES} "
            f"bytes, this one has {size}"
        )
    return name


def _encoded(value: Any) -> str:
    try:
        return encode_value(value, "value")
    except ValueNotStorable as exc:
        raise SharedVariableError(str(exc)) from None


class SharedVariables:
    """The shared variables of one posting.

    ``session`` gives a connection (in autocommit mode) for the length of
    one call: the client opens one per call, a job uses its own.
    """

    def __init__(self, posting_id: uuid.UUID, session: Session) -> None:
        self.posting_id = posting_id
        self._session = session

    def _no_posting(self) -> KeyError:
        return KeyError(f"no posting {self.posting_id}")

    def get(self, name: str, default: Any = None) -> Any:
        """The variable's value, or ``default`` when it is not set."""
        check_name(name)
        with self._session() as conn:
            read = shared.shared_get(conn, self.posting_id, name)
        if read is None:
            raise self._no_posting()
        return decode(read.value) if read.found else default

    def set(self, name: str, value: Any) -> None:
        """Create the variable or replace its value."""
        check_name(name)
        text = _encoded(value)
        with self._session() as conn:
            if not shared.shared_set(conn, self.posting_id, name, text):
                raise self._no_posting()

    def update(
        self,
        name: str,
        function: Callable[[Any], Any],
        default: Any = None,
    ) -> Any:
        """Replace the value by ``function(value)`` atomically; return it.

        The variable (created as ``default`` when absent) stays locked
        while ``function`` runs, so concurrent updates of it never lose one
        another; keep ``function`` quick and free of side effects. If it
        raises, nothing changes.
        """
        check_name(name)
        default_text = _encoded(default)
        with self._session() as conn, conn.transaction():
            locked = shared.shared_lock(
                conn, self.posting_id, name, default_text
            )
            if locked is None:
                raise self._no_posting()
            posting_key, stored = locked
            new = function(decode(stored))
            shared.shared_store(conn, posting_key, name, _encoded(new))
        return new

    def delete(self, name: str) -> bool:
        """Remove the variable; whether it was set."""
        check_name(name)
        with self._session() as conn:
            existed = shared.shared_delete(conn, self.posting_id, name)
        if existed is None:
            raise self._no_posting()
        return existed

    def all(self) -> dict[str, Any]:
        """Every variable of the posting, by name."""
        with self._session() as conn:
            values = shared.shared_all(conn, self.posting_id)
        if values is None:
            raise self._no_posting()
        return {name: decode(value) for name, value in values.items()}
