"""The console's actions: pause, resume, cancel, retry, each confirmed.

Owns the confirmation page (its form carries a CSRF token bound to the
user), the action itself through the database's checked functions
(``control_posting``, ``control_job``) and the audit log line saying who
did what. Only a logged-in admin acts, and only with ``web.allow_actions``.
It must not read forms' bytes or check their origin (:mod:`pdoflowd.web.app`
does), nor talk to the daemons.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from psycopg import errors
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from pdoflowd.db import postings, singlejob
from pdoflowd.web import auth
from pdoflowd.web.inputs import BadInput, uuid_of
from pdoflowd.web.pages import HEADERS, Console, Identity, Refused

__all__ = ["JOB_ACTIONS", "POSTING_ACTIONS", "act", "confirm"]

audit = logging.getLogger("pdoflowd.web.audit")

POSTING_ACTIONS = ("pause", "resume", "cancel", "retry")
JOB_ACTIONS = singlejob.JOB_ACTIONS


def _admin(console: Console, who: Identity) -> None:
    if not console.settings.allow_actions:
        raise Refused(403, "actions are off: set web.allow_actions = true")
    if not (who.logged_in and who.admin):
        raise Refused(
            403, "actions need a logged-in admin user of web.users_file"
        )


def confirm(
    console: Console, kind: str, request: Request, who: Identity
) -> Response:
    """The page that asks an admin to confirm ``?action=`` on a posting
    or a job (``kind``), with the form that does it."""
    ident = uuid_of(request.path_params["ident"], kind)
    action = request.query_params.get("action", "")
    allowed = POSTING_ACTIONS if kind == "posting" else JOB_ACTIONS
    if action not in allowed:
        raise BadInput(
            f"action must be one of {', '.join(allowed)}, got {action[:20]!r}"
        )
    _admin(console, who)
    return console.page(
        request,
        who,
        "confirm.html",
        kind=kind,
        ident=ident,
        action=action,
        target=f"/{kind}s/{ident}",
        token=auth.csrf_token(console.settings.secret, who.name),
    )


def act(
    console: Console,
    kind: str,
    request: Request,
    who: Identity,
    form: Mapping[str, str],
) -> Response:
    """Do the confirmed action, log who did it, and send the browser back
    to the page of what changed (303)."""
    ident = uuid_of(request.path_params["ident"], kind)
    _admin(console, who)
    if not auth.csrf_valid(
        console.settings.secret, who.name, form.get("csrf", "")
    ):
        raise Refused(
            403,
            "the form's token is not valid: reload the page and confirm",
        )
    action = form.get("action", "")
    allowed = POSTING_ACTIONS if kind == "posting" else JOB_ACTIONS
    if action not in allowed:
        raise BadInput(
            f"action must be one of {', '.join(allowed)}, got {action[:20]!r}"
        )
    with console.connection() as conn:
        try:
            if kind == "posting":
                new, changed = postings.control_posting(conn, ident, action)
                outcome = f"now {new.value}, {changed} jobs changed"
            else:
                job_new, posting_new = singlejob.control_job(
                    conn, ident, action
                )
                outcome = f"now {job_new.value}, posting {posting_new.value}"
        except errors.NoDataFound:
            raise Refused(404, f"no {kind} {ident}") from None
        except errors.ObjectNotInPrerequisiteState as exc:
            raise Refused(409, exc.diag.message_primary or str(exc)) from None
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
        f"/{kind}s/{ident}?did={action}", status_code=303, headers=HEADERS
    )
