"""Job functions defined with ``@job`` for the client tests.

Nothing here runs: the client tests only post these and read the rows back.
"""

from __future__ import annotations

from pdoflowd.client import job


@job()
def add(a: int, b: float, label: str = "") -> float:
    return a + b


@job(name="renamed")
def original_name() -> None:
    """Posted as the job "renamed"."""


@job(tries=5)
def patient() -> None:
    """A job that gets five tries unless a posting says otherwise."""


class Shapes:
    @classmethod
    def area(cls, side: float) -> float:
        return side * side

    def perimeter(self, side: float) -> float:
        return 4 * side
