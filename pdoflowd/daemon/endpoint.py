"""The /metrics, /livez and /readyz pages, and when the daemon is ready.

Owns what the HTTP endpoint answers (:class:`MetricsEndpoint`, the handler
the supervisor gives :mod:`~pdoflowd.daemon.httpserver`) and the readiness
policy behind /readyz (:func:`readiness`, a pure function). It must not
count anything (the registry it renders is
:class:`~pdoflowd.daemon.metrics.PoolMetrics`), touch the database, block
or start threads: it answers inside the supervisor's loop.
"""

from __future__ import annotations

import http
from collections.abc import Callable
from typing import NamedTuple, Protocol

from pdoflowd.daemon.httpserver import Response

__all__ = [
    "CONTENT_TYPE",
    "MetricsEndpoint",
    "Readiness",
    "Registry",
    "readiness",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Readiness(NamedTuple):
    """Whether the daemon should be sent work, and if not, why not."""

    ready: bool
    reasons: tuple[str, ...]


def readiness(
    *,
    started: bool,
    draining: bool,
    live_workers: int,
    database_reachable: bool,
) -> Readiness:
    """The readiness policy behind /readyz: every reason not to be ready."""
    reasons = []
    if draining:
        reasons.append("draining: the daemon is stopping")
    if not started:
        reasons.append("starting: not all workers have connected yet")
    if not database_reachable:
        reasons.append("database unreachable")
    if live_workers <= 0:
        reasons.append("no live worker")
    return Readiness(not reasons, tuple(reasons))


class Registry(Protocol):
    """What /metrics serves: a registry in Prometheus' text format."""

    def render(self) -> bytes: ...


class MetricsEndpoint:
    """The HTTP handler: /metrics, /livez and /readyz.

    ``readiness`` is asked at every /readyz; ``before_scrape`` (e.g. to
    refresh the worker gauges from the scoreboard) runs before every
    /metrics.
    """

    def __init__(
        self,
        metrics: Registry,
        readiness: Callable[[], Readiness],
        before_scrape: Callable[[], None] | None = None,
    ) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.before_scrape = before_scrape

    def __call__(self, method: str, path: str) -> Response:
        if path == "/metrics":
            if self.before_scrape is not None:
                self.before_scrape()
            return Response(200, self.metrics.render(), CONTENT_TYPE)
        if path == "/livez":
            return Response(200, b"ok: the supervisor loop is running\n")
        if path == "/readyz":
            ready, reasons = self.readiness()
            if ready:
                return Response(200, b"ready\n")
            body = "".join(f"not ready: {r}\n" for r in reasons)
            return Response(http.HTTPStatus.SERVICE_UNAVAILABLE, body.encode())
        return Response(
            http.HTTPStatus.NOT_FOUND,
            b"not found; try /metrics, /livez or /readyz\n",
        )
