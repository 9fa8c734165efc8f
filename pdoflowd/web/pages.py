"""The web console's pages: who asks, what they may see, what they may do.

Owns login (basic auth against the users file, a TLS client certificate,
or nobody on loopback without a users file), the read-only pages and the
database reads behind them, the confirmation page and the action itself
with its audit log line, and the progress the live events carry. Each
request opens its own database connection with a statement deadline;
every input is checked (:mod:`pdoflowd.web.inputs`) and a bad one is a
400 with its message. It must not know of routes, forms' bytes or event
streams (:mod:`pdoflowd.web.app`), nor talk to the daemons.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http
import json
import logging
import secrets
from collections.abc import (
    Callable,
    Iterator,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from jinja2 import Environment, FileSystemLoader, select_autoescape
from psycopg import errors
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    Response,
)

from pdoflowd import __version__
from pdoflowd.db import (
    console,
    dependencies,
    postings,
    profiles,
    singlejob,
    upkeep,
)
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
    job_actions,
    max_age_s,
    one_of,
    page_number,
    page_query,
    percent,
    posting_actions,
    text_filter,
    uuid_of,
    value_text,
    when_text,
)

__all__ = [
    "HEADERS",
    "Console",
    "ConsoleSettings",
    "Identity",
    "Refused",
]

log = logging.getLogger("pdoflowd.web")

HERE = Path(__file__).resolve().parent
_PAST = {
    "pause": "paused",
    "resume": "resumed",
    "cancel": "cancelled",
    "retry": "retried",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self';"
        " img-src 'self'; connect-src 'self'; form-action 'self';"
        " frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
_CHART_MINUTES = 60


@dataclass(frozen=True)
class ConsoleSettings:
    """What the console needs to run: how to connect, who may log in.

    ``connect`` opens a new connection; ``users_file`` None means no
    login (only allowed on loopback, or with client certificates);
    ``client_certificates`` says the TLS layer verified one;
    ``stopping`` says the server is shutting down (live streams end).
    """

    connect: Callable[[], Connection]
    users_file: Path | None = None
    client_certificates: bool = False
    allow_actions: bool = False
    refresh_s: float = 2.0
    statement_timeout_s: float = 5.0
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    stopping: Callable[[], bool] = lambda: False


@dataclass(frozen=True)
class Identity:
    """Who asks: a user of the users file, or someone the TLS layer or
    loopback let in (never an admin)."""

    name: str
    admin: bool
    logged_in: bool


class Refused(Exception):
    """A request the console answers with ``status`` and a sentence, never
    a traceback: not logged in (401), not allowed (403), not found (404),
    in conflict (409), the database unavailable (503)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _templates() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["age"] = age_text
    env.filters["when"] = when_text
    env.filters["pct"] = lambda v: f"{v:.0f}%"
    # The end of a version 7 UUID: its start is a timestamp, alike for
    # every job of a posting, its end random.
    env.filters["short"] = lambda u: "\u2026" + str(u)[-12:]
    env.globals["version"] = __version__
    return env


class Console:
    """The handlers, sharing the settings, the templates and the users."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.env = _templates()
        self.users = (
            None
            if settings.users_file is None
            else auth.Users(settings.users_file, settings.secret)
        )

    # ---------------------------------------------------------- plumbing

    def identify(self, request: Request) -> Identity:
        credentials = auth.basic_credentials(
            request.headers.get("authorization")
        )
        if self.users is None:
            name = (
                "client-certificate"
                if self.settings.client_certificates
                else "anonymous"
            )
            return Identity(name, admin=False, logged_in=False)
        if credentials is not None:
            try:
                user = self.users.check(*credentials)
            except auth.UsersFileError as exc:
                raise Refused(503, str(exc)) from None
            if user is not None:
                return Identity(user.name, user.admin, logged_in=True)
            raise Refused(401, "wrong user name or password")
        if self.settings.client_certificates:
            return Identity("client-certificate", admin=False, logged_in=False)
        raise Refused(401, "log in with a user of web.users_file")

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection]:
        try:
            conn = self.settings.connect()
        except psycopg.OperationalError as exc:
            message = str(exc).strip().splitlines()[0] if str(exc) else ""
            raise Refused(
                503, f"the database cannot be reached: {message}"
            ) from None
        try:
            console.set_read_deadline(conn, self.settings.statement_timeout_s)
            yield conn
        except errors.QueryCanceled:
            raise Refused(
                503, "the database did not answer in time; try again"
            ) from None
        except errors.InsufficientPrivilege as exc:
            raise Refused(
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
        return HTMLResponse(body, status_code=status, headers=HEADERS)

    def refused(self, request: Request, exc: Refused) -> Response:
        headers = dict(HEADERS)
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
                return self.refused(request, Refused(400, str(exc)))
            except Refused as exc:
                return self.refused(request, exc)
            except psycopg.Error as exc:
                log.warning("database error on %s: %s", request.url.path, exc)
                return self.refused(
                    request,
                    Refused(503, f"database error: {type(exc).__name__}"),
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
            previous=page_query(kept, page - 1) if page > 1 else None,
            next=page_query(kept, page + 1) if more else None,
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
                raise Refused(404, f"no posting {ident}")
            jobs = postings.posting_jobs(
                conn,
                ident,
                status=job_status,
                limit=PAGE_SIZE,
                offset=(page - 1) * PAGE_SIZE,
            )
            failures = console.failures(conn, ident)
            shared = dbshared.shared_all(conn, ident)
            profile = profiles.function_stats(conn, posting=ident, limit=15)
            runs = console.posting_schedule_runs(conn, ident)
            waited_by = dependencies.dependents(conn, ident)
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
            previous=page_query(kept, page - 1) if page > 1 else None,
            next=page_query(kept, page + 1) if page < pages else None,
            failures=failures,
            shared={k: value_text(v) for k, v in (shared or {}).items()},
            profile=profile,
            runs=runs,
            waited_by=waited_by,
            did=_PAST.get(did),
            can=posting_actions(
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
            raise Refused(404, f"no posting {ident}")
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
                **HEADERS,
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
                raise Refused(404, f"no job {ident}")
            output = singlejob.job_output(conn, ident)
        return self.page(
            request,
            who,
            "job.html",
            j=details,
            posargs=value_text(details.posargs),
            kwargs=value_text(details.kwargs),
            result=(
                value_text(details.result) if details.result_stored else None
            ),
            output=output,
            did=_PAST.get(did),
            can=job_actions(details.status, details.posting_status),
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
