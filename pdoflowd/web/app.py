"""The web console's HTTP side: routes, login, pages, actions, live events.

Owns the Starlette application :func:`create_app` builds: who is asking
(basic auth against the users file, a TLS client certificate, or nobody
on loopback without a users file), the read-only pages, the confirmed and
CSRF-checked actions with their audit log line, the results download and
the server-sent progress events. Each request opens its own database
connection with a statement deadline; every input is checked
(:mod:`pdoflowd.web.inputs`) and a bad one is a 400 with its message. It
must not talk to the daemons: it reads and writes the database only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import http
import json
import logging
import os
import secrets
import time
import urllib.parse
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from jinja2 import Environment, FileSystemLoader, select_autoescape
from psycopg import errors
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from pdoflowd import __version__
from pdoflowd.arguments import decode
from pdoflowd.db import console, postings, singlejob, upkeep
from pdoflowd.db import shared as dbshared
from pdoflowd.db.common import Connection
from pdoflowd.status import JobStatus, PostingStatus
from pdoflowd.web import auth
from pdoflowd.web.inputs import (
    PAGE_SIZE,
    BadInput,
    age_text,
    bars,
    counts_json,
    eta_s,
    max_age_s,
    one_of,
    page_number,
    percent,
    text_filter,
    uuid_of,
)

__all__ = ["POSTING_ACTIONS", "ConsoleSettings", "create_app"]

audit = logging.getLogger("pdoflowd.web.audit")
log = logging.getLogger("pdoflowd.web")

HERE = Path(__file__).resolve().parent
POSTING_ACTIONS = ("pause", "resume", "cancel", "retry")
JOB_ACTIONS = singlejob.JOB_ACTIONS
_PAST = {
    "pause": "paused",
    "resume": "resumed",
    "cancel": "cancelled",
    "retry": "retried",
}
_STATIC = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self';"
        " img-src 'self'; connect-src 'self'; form-action 'self';"
        " frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
_MAX_FORM_BYTES = 4096
_MAX_STREAMED_POSTINGS = 100
_CREDENTIALS_KEPT_S = 300.0
_CHART_MINUTES = 60


@dataclass(frozen=True)
class ConsoleSettings:
    """What the console needs to run: how to connect, who may log in.

    ``connect`` opens a new connection; ``users_file`` None means no
    login (only allowed on loopback, or with client certificates);
    ``client_certificates`` says the TLS layer verified one.
    """

    connect: Callable[[], Connection]
    users_file: Path | None = None
    client_certificates: bool = False
    allow_actions: bool = False
    refresh_s: float = 2.0
    statement_timeout_s: float = 5.0
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))


@dataclass(frozen=True)
class Identity:
    """Who asks: a user of the users file, or someone the TLS layer or
    loopback let in (never an admin)."""

    name: str
    admin: bool
    logged_in: bool


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Users:
    """The users file, read again when it changes; passwords checked once
    per few minutes per user, not at every request (scrypt is slow on
    purpose)."""

    def __init__(self, path: Path, secret: bytes) -> None:
        self.path = path
        self.secret = secret
        self.stamp: tuple[float, int] | None = None
        self.users: dict[str, auth.User] = {}
        self.verified: dict[tuple[str, str], float] = {}

    def _current(self) -> dict[str, auth.User]:
        try:
            info = os.stat(self.path)
        except OSError as exc:
            raise _Refused(503, f"users file: {exc.strerror}") from None
        stamp = (info.st_mtime, info.st_size)
        if stamp != self.stamp:
            try:
                self.users = auth.read_users(self.path)
            except auth.UsersFileError as exc:
                raise _Refused(503, str(exc)) from None
            self.stamp = stamp
            self.verified.clear()
        return self.users

    def check(self, name: str, password: str) -> auth.User | None:
        user = self._current().get(name)
        if user is None:
            return None
        key = (name, auth.csrf_token(self.secret, password))
        now = time.monotonic()
        if self.verified.get(key, 0.0) > now:
            return user
        if not auth.verify_password(password, user.password_hash):
            return None
        self.verified[key] = now + _CREDENTIALS_KEPT_S
        return user


def _templates() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["age"] = age_text
    env.filters["when"] = _when
    env.filters["pct"] = lambda v: f"{v:.0f}%"
    # The end of a version 7 UUID: its start is a timestamp, alike for
    # every job of a posting, its end random.
    env.filters["short"] = lambda u: "\u2026" + str(u)[-12:]
    env.globals["version"] = __version__
    return env


def _when(moment: dt.datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _shown(value: Any) -> str:
    with contextlib.suppress(ValueError):
        value = decode(value)
    return json.dumps(value, indent=2, default=repr, ensure_ascii=False)


class Console:
    """The handlers, sharing the settings, the templates and the users."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.env = _templates()
        self.users = (
            None
            if settings.users_file is None
            else _Users(settings.users_file, settings.secret)
        )

    # ---------------------------------------------------------- plumbing

    def identify(self, request: Request) -> Identity:
        credentials = auth.basic_credentials(
            request.headers.get("authorization")
        )
        if self.users is None:
            return Identity("anonymous", admin=False, logged_in=False)
        if credentials is not None:
            user = self.users.check(*credentials)
            if user is not None:
                return Identity(user.name, user.admin, logged_in=True)
            raise _Refused(401, "wrong user name or password")
        if self.settings.client_certificates:
            return Identity("client-certificate", admin=False, logged_in=False)
        raise _Refused(401, "log in with a user of web.users_file")

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection]:
        try:
            conn = self.settings.connect()
        except psycopg.OperationalError as exc:
            message = str(exc).strip().splitlines()[0] if str(exc) else ""
            raise _Refused(
                503, f"the database cannot be reached: {message}"
            ) from None
        try:
            console.set_read_deadline(conn, self.settings.statement_timeout_s)
            yield conn
        except errors.QueryCanceled:
            raise _Refused(
                503, "the database did not answer in time; try again"
            ) from None
        except errors.InsufficientPrivilege as exc:
            raise _Refused(
                403,
                "the console's database role may not read this:"
                f" {exc.diag.message_primary}",
            ) from None
        finally:
            conn.close()

    def page(
        self,
        request: Request,
        who: Identity,
        template: str,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        body = self.env.get_template(template).render(
            who=who,
            actions=self.settings.allow_actions,
            path=request.url.path,
            **context,
        )
        return HTMLResponse(body, status_code=status, headers=_HEADERS)

    def refused(self, request: Request, exc: _Refused) -> Response:
        headers = dict(_HEADERS)
        if exc.status == 401:
            headers["WWW-Authenticate"] = (
                'Basic realm="pdoflowd", charset="UTF-8"'
            )
        wants_html = "text/html" in request.headers.get("accept", "")
        if not wants_html:
            return Response(
                exc.message + "\n",
                status_code=exc.status,
                media_type="text/plain; charset=utf-8",
                headers=headers,
            )
        body = self.env.get_template("error.html").render(
            who=None,
            actions=False,
            path=request.url.path,
            status=exc.status,
            reason=http.HTTPStatus(exc.status).phrase,
            message=exc.message,
        )
        return HTMLResponse(body, status_code=exc.status, headers=headers)

    def handler(
        self, read: Callable[[Request, Identity], Response]
    ) -> Callable[[Request], Response]:
        """A sync endpoint (run in Starlette's thread pool) with login,
        bad input as 400 and database trouble as 503, never a traceback."""

        def endpoint(request: Request) -> Response:
            try:
                who = self.identify(request)
                return read(request, who)
            except BadInput as exc:
                return self.refused(request, _Refused(400, str(exc)))
            except _Refused as exc:
                return self.refused(request, exc)
            except psycopg.Error as exc:
                log.warning("database error on %s: %s", request.url.path, exc)
                return self.refused(
                    request,
                    _Refused(503, f"database error: {type(exc).__name__}"),
                )

        return endpoint

    # ---------------------------------------------------------- pages

    def overview(self, request: Request, who: Identity) -> Response:
        if request.query_params:
            raise BadInput("the overview takes no parameters")
        with self.connection() as conn:
            by_priority = console.jobs_by_priority(conn)
            _, oldest_s = upkeep.queue_stats(conn)
            try:
                daemons = console.daemons(conn)
                daemons_hidden = ""
            except errors.InsufficientPrivilege as exc:
                daemons, daemons_hidden = [], exc.diag.message_primary or ""
            minutes = console.ended_per_minute(conn, _CHART_MINUTES)
        totals = dict.fromkeys(JobStatus, 0)
        for row in by_priority.values():
            for status, count in row.items():
                totals[status] += count
        done = bars(
            [(m.minute.strftime("%H:%M"), m.done) for m in minutes],
            width=600,
            height=100,
        )
        errored = bars(
            [(m.minute.strftime("%H:%M"), m.errored) for m in minutes],
            width=600,
            height=60,
        )
        return self.page(
            request,
            who,
            "overview.html",
            by_priority=by_priority,
            totals=totals,
            statuses=list(JobStatus),
            oldest_s=oldest_s,
            daemons=daemons,
            daemons_hidden=daemons_hidden,
            done_bars=done,
            errored_bars=errored,
            done_hour=sum(m.done for m in minutes),
            errored_hour=sum(m.errored for m in minutes),
            first_minute=minutes[0].minute if minutes else None,
        )

    def postings_list(self, request: Request, who: Identity) -> Response:
        q = request.query_params
        unknown = set(q) - {"status", "target", "poster", "age", "q", "page"}
        if unknown:
            raise BadInput(f"unknown parameter {sorted(unknown)[0]!r}")
        status = one_of(q.get("status"), PostingStatus, "status")
        where = console.PostingFilter(
            status=status if isinstance(status, PostingStatus) else None,
            target=text_filter(q.get("target"), "target"),
            poster=text_filter(q.get("poster"), "poster"),
            max_age_s=max_age_s(q.get("age")),
            search=text_filter(q.get("q"), "search"),
        )
        page = page_number(q.get("page"))
        with self.connection() as conn:
            rows = console.filtered_postings(
                conn, where, limit=PAGE_SIZE + 1, offset=(page - 1) * PAGE_SIZE
            )
        more = len(rows) > PAGE_SIZE
        rows = rows[:PAGE_SIZE]
        shown = [
            {
                "row": r,
                "percent": percent(r.ended, r.total),
                "eta": None
                if r.status is not PostingStatus.EXECUTING
                else eta_s(r.ended, r.total, r.age_s),
            }
            for r in rows
        ]
        kept = {k: v for k, v in q.items() if k != "page" and v}
        return self.page(
            request,
            who,
            "postings.html",
            postings=shown,
            filters=q,
            statuses=list(PostingStatus),
            page=page,
            previous=_query(kept, page - 1) if page > 1 else None,
            next=_query(kept, page + 1) if more else None,
            live=[r.uuid for r in rows if not r.status.is_final],
        )

    def posting(self, request: Request, who: Identity) -> Response:
        ident = uuid_of(request.path_params["posting"], "posting")
        q = request.query_params
        unknown = set(q) - {"status", "page", "did"}
        if unknown:
            raise BadInput(f"unknown parameter {sorted(unknown)[0]!r}")
        status = one_of(q.get("status"), JobStatus, "status")
        job_status = status if isinstance(status, JobStatus) else None
        page = page_number(q.get("page"))
        did = q.get("did", "")
        if did and did not in _PAST:
            raise BadInput(f"unknown action {did[:20]!r}")
        with self.connection() as conn:
            summary = postings.posting_summary(conn, ident)
            if summary is None:
                raise _Refused(404, f"no posting {ident}")
            jobs = console.jobs_page(
                conn,
                ident,
                status=job_status,
                limit=PAGE_SIZE,
                offset=(page - 1) * PAGE_SIZE,
            )
            failures = console.failures(conn, ident)
            shared = dbshared.shared_all(conn, ident)
            profile = console.posting_profile(conn, ident)
            runs = console.posting_schedule_runs(conn, ident)
        matching = (
            summary.total if job_status is None else summary.jobs[job_status]
        )
        pages = max(1, -(-matching // PAGE_SIZE))
        if page > pages:
            raise BadInput(f"page {page} is past the last page, {pages}")
        ended = (
            summary.jobs[JobStatus.DONE] + summary.jobs[JobStatus.ERRORED_OUT]
        )
        elapsed = (
            dt.datetime.now(dt.timezone.utc) - summary.created_at
        ).total_seconds()
        kept = {"status": job_status.value} if job_status else {}
        return self.page(
            request,
            who,
            "posting.html",
            p=summary,
            statuses=list(JobStatus),
            percent=percent(ended, summary.total),
            eta=None
            if summary.status is not PostingStatus.EXECUTING
            else eta_s(ended, summary.total, elapsed),
            jobs=jobs,
            job_status=job_status,
            page=page,
            pages=pages,
            previous=_query(kept, page - 1) if page > 1 else None,
            next=_query(kept, page + 1) if page < pages else None,
            failures=failures,
            shared={k: _shown(v) for k, v in (shared or {}).items()},
            profile=profile,
            runs=runs,
            did=_PAST.get(did),
            can=_posting_actions(
                summary.status, summary.jobs[JobStatus.ERRORED_OUT]
            ),
        )

    def results(self, request: Request, who: Identity) -> Response:
        ident = uuid_of(request.path_params["posting"], "posting")
        if request.query_params:
            raise BadInput("the results take no parameters")
        with self.connection() as conn:
            rows = postings.posting_results(conn, ident)
        if rows is None:
            raise _Refused(404, f"no posting {ident}")
        lines = [
            json.dumps(
                {
                    "job": str(r.job_uuid),
                    "status": r.status.value,
                    "stored": r.stored,
                    "result": r.value,
                    "error": r.error,
                },
                ensure_ascii=False,
            )
            + "\n"
            for r in rows
        ]
        return Response(
            "".join(lines),
            media_type="application/x-ndjson; charset=utf-8",
            headers={
                **_HEADERS,
                "Content-Disposition": (
                    f'attachment; filename="posting-{ident}.jsonl"'
                ),
            },
        )

    def job(self, request: Request, who: Identity) -> Response:
        ident = uuid_of(request.path_params["job"], "job")
        q = request.query_params
        if set(q) - {"did"}:
            raise BadInput("a job's page takes no parameters but did")
        did = q.get("did", "")
        if did and did not in _PAST:
            raise BadInput(f"unknown action {did[:20]!r}")
        with self.connection() as conn:
            details = singlejob.job_details(conn, ident)
            if details is None:
                raise _Refused(404, f"no job {ident}")
            output = singlejob.job_output(conn, ident)
        return self.page(
            request,
            who,
            "job.html",
            j=details,
            posargs=_shown(details.posargs),
            kwargs=_shown(details.kwargs),
            result=_shown(details.result) if details.result_stored else None,
            output=output,
            did=_PAST.get(did),
            can=_job_actions(details.status, details.posting_status),
        )

    # ---------------------------------------------------------- actions

    def _admin(self, who: Identity) -> None:
        if not self.settings.allow_actions:
            raise _Refused(403, "actions are off: set web.allow_actions = true")
        if not (who.logged_in and who.admin):
            raise _Refused(
                403, "actions need a logged-in admin user of web.users_file"
            )

    def confirm(self, kind: str, request: Request, who: Identity) -> Response:
        ident = uuid_of(request.path_params["ident"], kind)
        action = request.query_params.get("action", "")
        allowed = POSTING_ACTIONS if kind == "posting" else JOB_ACTIONS
        if action not in allowed:
            raise BadInput(
                f"action must be one of {', '.join(allowed)},"
                f" got {action[:20]!r}"
            )
        self._admin(who)
        return self.page(
            request,
            who,
            "confirm.html",
            kind=kind,
            ident=ident,
            action=action,
            target=f"/{kind}s/{ident}",
            token=auth.csrf_token(self.settings.secret, who.name),
        )

    def act(
        self,
        kind: str,
        request: Request,
        who: Identity,
        form: Mapping[str, str],
    ) -> Response:
        ident = uuid_of(request.path_params["ident"], kind)
        self._admin(who)
        if not auth.csrf_valid(
            self.settings.secret, who.name, form.get("csrf", "")
        ):
            raise _Refused(
                403,
                "the form's token is not valid: reload the page and confirm",
            )
        action = form.get("action", "")
        allowed = POSTING_ACTIONS if kind == "posting" else JOB_ACTIONS
        if action not in allowed:
            raise BadInput(
                f"action must be one of {', '.join(allowed)},"
                f" got {action[:20]!r}"
            )
        with self.connection() as conn:
            try:
                if kind == "posting":
                    new, changed = postings.control_posting(conn, ident, action)
                    outcome = f"now {new.value}, {changed} jobs changed"
                else:
                    job_new, posting_new = singlejob.control_job(
                        conn, ident, action
                    )
                    outcome = (
                        f"now {job_new.value}, posting {posting_new.value}"
                    )
            except errors.NoDataFound:
                raise _Refused(404, f"no {kind} {ident}") from None
            except errors.ObjectNotInPrerequisiteState as exc:
                raise _Refused(
                    409, exc.diag.message_primary or str(exc)
                ) from None
        host = request.client.host if request.client else "?"
        audit.info(
            "web action: user %s from %s: %s %s %s: %s",
            who.name,
            host,
            action,
            kind,
            ident,
            outcome,
        )
        return RedirectResponse(
            f"/{kind}s/{ident}?did={action}", status_code=303, headers=_HEADERS
        )

    # ---------------------------------------------------------- live

    def progress(self, idents: list[UUID]) -> dict[str, Any]:
        now = dt.datetime.now(dt.timezone.utc)
        result: dict[str, Any] = {}
        with self.connection() as conn:
            for ident in idents:
                s = postings.posting_summary(conn, ident)
                if s is None:
                    continue
                ended = s.jobs[JobStatus.DONE] + s.jobs[JobStatus.ERRORED_OUT]
                eta = (
                    None
                    if s.status is not PostingStatus.EXECUTING
                    else eta_s(
                        ended, s.total, (now - s.created_at).total_seconds()
                    )
                )
                result[str(ident)] = {
                    "status": s.status.value,
                    "final": s.status.is_final,
                    "jobs": counts_json(s.jobs),
                    "total": s.total,
                    "percent": round(percent(ended, s.total), 1),
                    "eta": None if eta is None else age_text(eta),
                }
        return result


def _query(params: Mapping[str, str], page: int) -> str:
    return "?" + urllib.parse.urlencode({**params, "page": str(page)})


def _posting_actions(status: PostingStatus, errored: int) -> list[str]:
    can = []
    if status is PostingStatus.EXECUTING:
        can.append("pause")
    if status in (PostingStatus.PAUSED, PostingStatus.ERRORED_OUT):
        can.append("resume")
    if status in (
        PostingStatus.PAUSED,
        PostingStatus.EXECUTING,
        PostingStatus.ERRORED_OUT,
    ):
        can.append("cancel")
    if errored:
        can.append("retry")
    return can


def _job_actions(job: JobStatus, posting: PostingStatus) -> list[str]:
    if job in (JobStatus.WAITING, JobStatus.EXECUTING):
        return ["cancel"]
    if job is JobStatus.ERRORED_OUT and posting is not PostingStatus.CANCELLED:
        return ["retry"]
    return []


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
                raise _Refused(403, "the form came from another site")
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
            return await run_in_threadpool(c.act, kind, request, who, form)
        except BadInput as exc:
            return c.refused(request, _Refused(400, str(exc)))
        except _Refused as exc:
            return c.refused(request, exc)
        except psycopg.Error as exc:
            log.warning("database error on %s: %s", request.url.path, exc)
            return c.refused(
                request, _Refused(503, f"database error: {type(exc).__name__}")
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
            return c.refused(request, _Refused(400, str(exc)))
        except _Refused as exc:
            return c.refused(request, exc)

        async def stream() -> AsyncIterator[str]:
            last: dict[str, Any] | None = None
            quiet = 0.0
            # Tell the browser how long to wait before it reconnects.
            yield f"retry: {round(settings.refresh_s * 1000)}\n\n"
            while True:
                try:
                    now = await run_in_threadpool(c.progress, idents)
                except (_Refused, psycopg.Error) as exc:
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
                await asyncio.sleep(settings.refresh_s)
                quiet += settings.refresh_s

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={**_HEADERS, "Cache-Control": "no-store"},
        )

    def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC:
            return Response("not found\n", status_code=404, headers=_HEADERS)
        return Response(
            (HERE / "static" / name).read_bytes(),
            media_type=_STATIC[name],
            headers={**_HEADERS, "Cache-Control": "max-age=3600"},
        )

    def not_found(request: Request) -> Response:
        return c.refused(request, _Refused(404, f"no page {request.url.path}"))

    routes = [
        Route("/", c.handler(c.overview)),
        Route("/postings", c.handler(c.postings_list)),
        Route("/postings/{posting}", c.handler(c.posting)),
        Route("/postings/{posting}/results.jsonl", c.handler(c.results)),
        Route("/jobs/{job}", c.handler(c.job)),
        Route(
            "/postings/{ident}/confirm",
            c.handler(functools.partial(c.confirm, "posting")),
        ),
        Route(
            "/jobs/{ident}/confirm",
            c.handler(functools.partial(c.confirm, "job")),
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
