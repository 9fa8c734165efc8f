"""Job functions for the tests of outcomes the database refuses (module
``outcomejobs``); the daemon under test imports them."""

from __future__ import annotations

from pdoflowd import job


@job(store_result=True)
def price(amount: str, in_euros: bool) -> str:
    """``amount``, followed by the euro sign if asked: a value that a
    database in the LATIN1 encoding cannot store."""
    return amount + "\u20ac" if in_euros else amount
