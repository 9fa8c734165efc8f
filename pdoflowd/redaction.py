"""Connection secrets kept out of every text pdoflowd shows.

Owns :func:`redact`, the one function that text which may carry connection
details passes through before it leaves a process: every log line (the log
formatter applies it), a worker's boot failure recorded on its jobs, the
daemon's status texts built from errors, and every error ``pdoflow``
prints. It also owns which strings count as secret: the passwords a process
was given (:func:`remember`), and what :func:`dsn_secrets` finds in a
connection string, including the pieces of a password that libpq mistook
for a host name. It must not read files or the environment, nor log.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from urllib.parse import quote, unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict

__all__ = ["MASK", "dsn_secrets", "redact", "remember", "remembered"]

MASK = "***"

# password=... and sslpassword=... of a key=value string, quoted or not.
_PASSWORD_SETTING = re.compile(
    r"(password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s']+)", re.IGNORECASE
)
# A URI's user information, up to the last "@" before white space: a
# password with an unencoded "@" or "/" is masked whole, not cut short.
_URI_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(\S*)@")
# A host name libpq or psycopg quotes in a message, up to its last "@":
# what libpq takes for the host when a URI's password holds an "@".
_QUOTED_HOST = re.compile(
    r"((?:host(?: name)?|address|server at)\s+[\"'])[^\"'\s]*@",
    re.IGNORECASE,
)
# libpq quotes a value it cannot use ("invalid port number: "x"", "invalid
# integer value "x" for connection option ..."): in a URI whose password
# was split, that value is part of the password.
_INVALID_VALUE = re.compile(
    r"(invalid (?:port number|\"?[a-z_]+\"? value):?\s*)\"[^\"\n]*\""
)
# Characters a URI's user information may hold unencoded (RFC 3986).
_USERINFO_SAFE = "!$&'()*+,;=:"

_remembered: set[str] = set()


def remember(secrets: Iterable[str | None]) -> None:
    """Add secrets this process must never show, for the rest of its life.

    A forked worker inherits them. None and empty strings are ignored.
    """
    _remembered.update(s for s in secrets if s)


def remembered() -> frozenset[str]:
    """The secrets :func:`remember` was given so far."""
    return frozenset(_remembered)


def _spellings(secret: str) -> Iterator[str]:
    """A secret as written and as it may appear inside a URI."""
    yield secret
    for safe in ("", _USERINFO_SAFE):
        encoded = quote(secret, safe=safe)
        yield encoded
        yield re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), encoded)


def _mask_userinfo(match: re.Match[str]) -> str:
    scheme, userinfo = match.group(1), match.group(2)
    user, colon, _ = userinfo.partition(":")
    if colon and "@" not in user and "/" not in user:
        return f"{scheme}{user}:{MASK}@"
    if not colon and "@" not in userinfo and "/" not in userinfo:
        return match.group(0)  # a user name alone holds no secret
    return f"{scheme}{MASK}@"


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every secret in it replaced by ``***``.

    Secrets are the remembered ones and ``secrets``, each also in its
    percent-encoded spellings; then whatever has the shape of one: the
    value of ``password=``, a URI's user information after the user name,
    the part of a quoted host name before its last ``@``, and a connection
    value libpq quotes as invalid. Longer secrets go first, so that one
    which contains another is masked whole.
    """
    known = {s for s in (*_remembered, *secrets) if s}
    spellings = {spelling for s in known for spelling in _spellings(s)}
    for spelling in sorted(spellings, key=len, reverse=True):
        text = text.replace(spelling, MASK)
    text = _PASSWORD_SETTING.sub(rf"\g<1>{MASK}", text)
    text = _URI_USERINFO.sub(_mask_userinfo, text)
    text = _QUOTED_HOST.sub(rf"\g<1>{MASK}@", text)
    return _INVALID_VALUE.sub(rf'\g<1>"{MASK}"', text)


def dsn_secrets(dsn: str) -> set[str]:
    """What in a libpq string or URI is secret.

    Its ``password`` and ``sslpassword``; in a URI, the password as the user
    wrote it even if an unencoded ``@`` or ``/`` made libpq read it
    otherwise; and the part of a host name before an ``@`` (libpq's host
    after such a split: ``u:p@Correct-Horse@db`` gives host
    ``Correct-Horse@db``). A string libpq cannot parse gives only the URI
    part.
    """
    found: set[str] = set()
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        params = {}
    for key in ("password", "sslpassword"):
        found.add(str(params.get(key) or ""))
    for key in ("host", "hostaddr"):
        for element in str(params.get(key) or "").split(","):
            # A leading "@" names an abstract Unix socket: no secret.
            at = element.rfind("@")
            if at > 0:
                found.add(element[:at])
    uri = re.match(r"\s*postgres(?:ql)?://([^?]*)", dsn)
    if uri:
        front = uri.group(1)
        userinfo = front[: max(front.rfind("@"), 0)]
        _, colon, password = userinfo.partition(":")
        if colon:
            found.update((password, unquote(password)))
    return {s for s in found if s}
