"""What is wrong with a configuration: :class:`ConfigProblem` under its
dotted key, and :class:`ConfigError`, which carries every one found.

Owns those and the few ways a value or an OS error is written in their
messages. Callers exit with EXIT_CONFIG (78). It must not import the rest
of :mod:`pdoflowd.config`: every part of it raises these.
"""

from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["ConfigError", "ConfigProblem", "number_text", "reason"]


class ConfigProblem(NamedTuple):
    """One thing wrong with the configuration, under its dotted key."""

    key: str
    message: str


class ConfigError(Exception):
    """The configuration cannot be used; every problem found, sorted by key."""

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        # A stable sort keeps the problems of one key (array items) in order.
        self.problems = tuple(sorted(problems, key=lambda p: p.key))
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "\n".join(f"{p.key}: {p.message}" for p in self.problems)


def number_text(value: float) -> str:
    """300 rather than 300.0, as an operator would write it."""
    if isinstance(value, int):
        return str(value)
    return repr(value).removesuffix(".0")


def reason(exc: OSError) -> str:
    """Why a file could not be read, in a message's words."""
    return exc.strerror.lower() if exc.strerror else str(exc)
