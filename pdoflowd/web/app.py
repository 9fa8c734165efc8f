"""The web console's HTTP side: routes, forms, live events, static files.

Owns the Starlette application :func:`create_app` builds from the pages
of :mod:`pdoflowd.web.pages`: the routes, reading an action's form (url-
encoded, small, from this console's own origin), the server-sent events
that carry live progress, and the two static files. It must not hold page
logic or SQL, nor talk to the daemons.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from pdoflowd.web import actions
from pdoflowd.web.inputs import BadInput, uuid_of
from pdoflowd.web.pages import HEADERS, Console, ConsoleSettings, Refused

__all__ = ["create_app"]

log = logging.getLogger("pdoflowd.web")

HERE = Path(__file__).resolve().parent
_STATIC = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
_MAX_FORM_BYTES = 4096
_MAX_STREAMED_POSTINGS = 100
_STOP_POLL_S = 0.25


def _same_origin(request: Request) -> bool:
    """A browser sends Origin with every POST: it must be this console."""
    origin = request.headers.get("origin")
    if origin is None:
        referer = request.headers.get("referer")
        if referer is None:
            return True
        parts = urllib.parse.urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


def create_app(settings: ConsoleSettings) -> Starlette:
    """The console as an ASGI application."""
    c = Console(settings)

    def acting(kind: str) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await act(kind, request)

        return endpoint

    async def act(kind: str, request: Request) -> Response:
        try:
            who = await run_in_threadpool(c.identify, request)
            if not _same_origin(request):
                raise Refused(403, "the form came from another site")
            content_type = request.headers.get("content-type", "")
            if (
                content_type.split(";")[0].strip()
                != "application/x-www-form-urlencoded"
            ):
                raise BadInput(
                    "send the form as application/x-www-form-urlencoded"
                )
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > _MAX_FORM_BYTES:
                    raise BadInput("the form is too large")
            try:
                pairs = urllib.parse.parse_qsl(
                    body.decode("ascii"), strict_parsing=bool(body)
                )
            except (UnicodeDecodeError, ValueError):
                raise BadInput("the form is not url-encoded") from None
            form = dict(pairs)
            return await run_in_threadpool(
                actions.act, c, kind, request, who, form
            )
        except BadInput as exc:
            return c.refused(request, Refused(400, str(exc)))
        except Refused as exc:
            return c.refused(request, exc)
        except psycopg.Error as exc:
            log.warning("database error on %s: %s", request.url.path, exc)
            return c.refused(
                request, Refused(503, f"database error: {type(exc).__name__}")
            )

    async def events(request: Request) -> Response:
        try:
            await run_in_threadpool(c.identify, request)
            given = request.query_params.getlist("posting")
            if set(request.query_params) - {"posting"} or not given:
                raise BadInput("name the postings: ?posting=ID&posting=ID")
            if len(given) > _MAX_STREAMED_POSTINGS:
                raise BadInput(
                    f"at most {_MAX_STREAMED_POSTINGS} postings per stream"
                )
            idents = [uuid_of(text, "posting") for text in given]
        except BadInput as exc:
            return c.refused(request, Refused(400, str(exc)))
        except Refused as exc:
            return c.refused(request, exc)

        async def stream() -> AsyncIterator[str]:
            last: dict[str, Any] | None = None
            quiet = 0.0
            # Tell the browser how long to wait before it reconnects.
            yield f"retry: {round(settings.refresh_s * 1000)}\n\n"
            while True:
                try:
                    now = await run_in_threadpool(c.progress, idents)
                except (Refused, psycopg.Error) as exc:
                    message = getattr(exc, "message", type(exc).__name__)
                    yield f"event: trouble\ndata: {json.dumps(message)}\n\n"
                    now = last or {}
                if now != last:
                    yield f"event: progress\ndata: {json.dumps(now)}\n\n"
                    last, quiet = now, 0.0
                elif quiet >= 15.0:
                    yield ": still here\n\n"
                    quiet = 0.0
                if now and all(p["final"] for p in now.values()):
                    yield "event: end\ndata: {}\n\n"
                    return
                # A stream open at shutdown would hold the server up:
                # look for it often, and end the stream then.
                slept = 0.0
                while slept < settings.refresh_s:
                    if settings.stopping():
                        return
                    step = min(_STOP_POLL_S, settings.refresh_s - slept)
                    await asyncio.sleep(step)
                    slept += step
                quiet += settings.refresh_s

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={**HEADERS, "Cache-Control": "no-store"},
        )

    def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC:
            return Response("not found\n", status_code=404, headers=HEADERS)
        return Response(
            (HERE / "static" / name).read_bytes(),
            media_type=_STATIC[name],
            headers={**HEADERS, "Cache-Control": "max-age=3600"},
        )

    def not_found(request: Request) -> Response:
        return c.refused(request, Refused(404, f"no page {request.url.path}"))

    routes = [
        Route("/", c.handler(c.overview)),
        Route("/postings", c.handler(c.postings_list)),
        Route("/postings/{posting}", c.handler(c.posting)),
        Route("/postings/{posting}/results.jsonl", c.handler(c.results)),
        Route("/jobs/{job}", c.handler(c.job)),
        Route(
            "/postings/{ident}/confirm",
            c.handler(functools.partial(actions.confirm, c, "posting")),
        ),
        Route(
            "/jobs/{ident}/confirm",
            c.handler(functools.partial(actions.confirm, c, "job")),
        ),
        Route(
            "/postings/{ident}/action",
            acting("posting"),
            methods=["POST"],
        ),
        Route(
            "/jobs/{ident}/action",
            acting("job"),
            methods=["POST"],
        ),
        Route("/events", events),
        Route("/static/{name}", static),
        Route("/{rest:path}", not_found),
    ]
    return Starlette(routes=routes)
