"""The errors the client raises, and nothing else.

Owns the exceptions a caller of :mod:`pdoflowd.client` catches: a posting
refused before anything was written, a control its posting's status does
not allow, connection settings that cannot be used, and the two ways a wait
ends without what was waited for (each carries the last state seen). It
must not import the rest of the client: every other module of it may raise
these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdoflowd.client.handles import PostingState

__all__ = [
    "ConnectionConfigError",
    "PostingEnded",
    "PostingError",
    "PostingStateError",
    "PruningNotAllowed",
    "WaitTimeout",
]


class PostingError(ValueError):
    """A posting that cannot be accepted; nothing was written."""


class PostingStateError(ValueError):
    """A posting whose status does not allow what was asked of it."""


class ConnectionConfigError(ValueError):
    """The connection settings cannot be used (never shows a password)."""


class PruningNotAllowed(PermissionError):
    """The role connected may not delete postings and jobs (a submitter):
    pruning is for a daemon's role or the schema's owner."""


class WaitTimeout(TimeoutError):
    """A posting did not get there within the time given; has its state."""

    def __init__(self, state: PostingState) -> None:
        super().__init__(f"posting {state.id} is still {state.status.value}")
        self.state = state


class PostingEnded(RuntimeError):
    """A posting ended before the threshold waited for could be reached."""

    def __init__(self, state: PostingState) -> None:
        super().__init__(
            f"posting {state.id} is {state.status.value}; the threshold "
            "can no longer be reached"
        )
        self.state = state


# They are caught, documented and shown in tracebacks as pdoflowd.client.X,
# the module callers import them from.
for _error in (
    PostingError,
    PostingStateError,
    ConnectionConfigError,
    WaitTimeout,
    PostingEnded,
    PruningNotAllowed,
):
    _error.__module__ = "pdoflowd.client"
del _error
