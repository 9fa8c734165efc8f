"""Who may use the web console: the users file, passwords, CSRF tokens.

Owns the users file (``name:role:hash`` a line, role ``admin`` or
``viewer``) and :class:`Users`, which reads it again when it changes;
salted scrypt password hashes (:func:`hashlib.scrypt`, no extra
dependency), reading HTTP basic credentials, and the tokens that
tie an action's form to the user it was shown to. It must not know of
HTTP frameworks, pages or the database.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ROLES",
    "User",
    "Users",
    "UsersFileError",
    "add_user",
    "basic_credentials",
    "csrf_token",
    "csrf_valid",
    "hash_password",
    "read_users",
    "verify_password",
]

ROLES = ("admin", "viewer")
_NAME_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.@-"
)
# scrypt's cost: 2**14 with r=8 takes about 16 MiB and tens of ms, as
# Python's documentation and RFC 7914 suggest for interactive logins.
_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1
_SALT_BYTES = 16
# How long a checked password is trusted again without scrypt.
_CREDENTIALS_KEPT_S = 300.0
_HASH_BYTES = 32


class UsersFileError(Exception):
    """The users file cannot be read or holds a line that is not a user."""


@dataclass(frozen=True)
class User:
    """One user of the console; ``admin`` users may act."""

    name: str
    admin: bool
    password_hash: str


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash``, with a fresh random salt."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.scrypt(
        password.encode(),
        salt=salt,
        n=_SCRYPT_N,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
        maxmem=64 * 1024 * 1024,
        dklen=_HASH_BYTES,
    )
    cost = f"{_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}"
    return f"scrypt${cost}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (a :func:`hash_password`)."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return False
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        expected = base64.b64decode(parts[5], validate=True)
        digest = hashlib.scrypt(
            password.encode(),
            salt=salt,
            n=n,
            r=r,
            p=p,
            maxmem=64 * 1024 * 1024,
            dklen=len(expected),
        )
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(digest, expected)


def _name_problem(name: str) -> str | None:
    if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
        return (
            f"{name!r} is not a user name: 1 to 64 letters, digits and _ . @ -"
        )
    return None


def read_users(path: Path) -> dict[str, User]:
    """Every user of the file by name; UsersFileError names a bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsersFileError(f"cannot read {path}: {exc.strerror}") from None
    users = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        role, _, password_hash = rest.partition(":")
        problem = _name_problem(name)
        if problem is None and role not in ROLES:
            problem = f"role must be admin or viewer, got {role!r}"
        if problem is None and not password_hash.startswith("scrypt$"):
            problem = "the password hash is not an scrypt hash"
        if problem is not None:
            raise UsersFileError(f"{path}:{number}: {problem}")
        users[name] = User(name, role == "admin", password_hash)
    return users


def add_user(path: Path, name: str, password: str, *, admin: bool) -> None:
    """Add ``name`` to the users file (or replace its line), creating the
    file readable by its owner and group only; ValueError for a bad name
    or an empty password."""
    problem = _name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    if not password:
        raise ValueError("the password is empty")
    users = read_users(path) if path.exists() else {}
    users[name] = User(name, admin, hash_password(password))
    lines = [
        f"{u.name}:{'admin' if u.admin else 'viewer'}:{u.password_hash}\n"
        for u in users.values()
    ]
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.writelines(lines)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """The (name, password) of an ``Authorization: Basic`` header, or None
    when there is none or it is malformed."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    name, colon, password = decoded.partition(":")
    return (name, password) if colon else None


def csrf_token(secret: bytes, user: str) -> str:
    """The token an action's form carries for ``user``: a MAC of the name
    under this process's secret, so another site cannot forge it."""
    return hmac.new(secret, user.encode(), hashlib.sha256).hexdigest()


def csrf_valid(secret: bytes, user: str, token: str) -> bool:
    return hmac.compare_digest(csrf_token(secret, user), token)


class Users:
    """The users file, read again when it changes; passwords checked once
    per few minutes per user, not at every request (scrypt is slow on
    purpose)."""

    def __init__(self, path: Path, secret: bytes) -> None:
        self.path = path
        self.secret = secret
        self.stamp: tuple[float, int] | None = None
        self.users: dict[str, User] = {}
        self.verified: dict[tuple[str, str], float] = {}

    def _current(self) -> dict[str, User]:
        try:
            info = os.stat(self.path)
        except OSError as exc:
            raise UsersFileError(
                f"cannot read {self.path}: {exc.strerror}"
            ) from None
        stamp = (info.st_mtime, info.st_size)
        if stamp != self.stamp:
            self.users = read_users(self.path)
            self.stamp = stamp
            self.verified.clear()
        return self.users

    def check(self, name: str, password: str) -> User | None:
        user = self._current().get(name)
        if user is None:
            return None
        # Kept as a MAC under the process's secret, never in the clear.
        key = (name, csrf_token(self.secret, password))
        now = time.monotonic()
        if self.verified.get(key, 0.0) > now:
            return user
        if not verify_password(password, user.password_hash):
            return None
        self.verified[key] = now + _CREDENTIALS_KEPT_S
        return user
