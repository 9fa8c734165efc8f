"""The plans PostgreSQL runs for the statements inside pdoflowd's
functions, read with auto_explain (which the test cluster's superuser may
load): a function's plan is not shown by EXPLAIN of its call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def nested_plans(conn: Any, action: Callable[[], object]) -> list[str]:
    """The plans of every statement ``action`` runs on ``conn``, nested
    ones (inside functions) included, as auto_explain logs them."""
    plans: list[str] = []

    def keep(diag: Any) -> None:
        message = diag.message_primary or ""
        if "plan:" in message:
            plans.append(message)

    conn.execute("LOAD 'auto_explain'")
    conn.execute("SET auto_explain.log_min_duration = 0")
    conn.execute("SET auto_explain.log_nested_statements = on")
    conn.execute("SET client_min_messages = log")
    conn.add_notice_handler(keep)
    try:
        action()
    finally:
        conn.remove_notice_handler(keep)
        conn.execute("RESET client_min_messages")
        conn.execute("RESET auto_explain.log_min_duration")
    return plans


def claim_plan(plans: list[str]) -> str:
    """The plan of the claim itself among ``plans``."""
    found = [p for p in plans if "LockRows" in p]
    assert found, plans
    return found[-1]
