"""What is wrong with a libpq connection string or URI, told without ever
quoting its values.

Owns :func:`dsn_problems`: libpq's own parser decides what is a setting,
then the settings libpq would refuse only when connecting (a value outside
its fixed set, a number that is not one, hosts, addresses and ports that do
not pair up, a URI password with an unencoded ``@`` or ``/``) are named, so
that a string which can never connect is refused before it is used. It must
not connect, and no message of it may repeat a value: any may hold a piece
of a password.
"""

import ipaddress
import re
from collections.abc import Iterator, Mapping

import psycopg
from psycopg.conninfo import conninfo_to_dict

__all__ = ["dsn_problems"]

# libpq quotes only a parameter name in these messages, never a value, so
# they are safe to repeat; any other detail might echo part of a password.
_SAFE_CONNINFO_ERRORS = ("invalid connection option", "invalid URI query")

# The values libpq accepts for its settings with a fixed set of them; any
# other is refused only when a connection is attempted, again and again.
_CONNINFO_CHOICES: Mapping[str, tuple[str, ...]] = {
    "sslmode": (
        "disable",
        "allow",
        "prefer",
        "require",
        "verify-ca",
        "verify-full",
    ),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": (
        "any",
        "read-write",
        "read-only",
        "primary",
        "standby",
        "prefer-standby",
    ),
    "load_balance_hosts": ("disable", "random"),
    "sslnegotiation": ("postgres", "direct"),
    "sslcertmode": ("disable", "allow", "require"),
    "sslsni": ("0", "1"),
    "sslcompression": ("0", "1"),
}
_TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
_CONNINFO_INTEGERS = (
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
)
_AUTH_METHODS = (
    "password",
    "md5",
    "gss",
    "sspi",
    "scram-sha-256",
    "oauth",
    "none",
)
_UNENCODED_USERINFO = (
    "an '@' or '/' in the URI's user name or password must be"
    " percent-encoded (%40, %2F): as written, libpq would read part of"
    " the password as a host name"
)


def _list_count(value: str) -> int:
    return len(value.split(",")) if value else 0


def _uri_userinfo_problems(dsn: str) -> Iterator[str]:
    uri = re.match(r"\s*postgres(?:ql)?://([^?]*)", dsn)
    if uri is None:
        return
    front = uri.group(1)
    ats = [i for i, char in enumerate(front) if char == "@"]
    slash = front.find("/")
    if len(ats) > 1 or (ats and 0 <= slash < ats[0]):
        yield _UNENCODED_USERINFO


def _address_problems(params: Mapping[str, str]) -> Iterator[str]:
    host, hostaddr = params.get("host", ""), params.get("hostaddr", "")
    # A leading "@" names an abstract Unix socket; anywhere else it is
    # what remains of a URI password with an unencoded "@".
    if any("@" in name[1:] for name in host.split(",")):
        yield "host: a host name cannot contain '@'"
    for address in hostaddr.split(",") if hostaddr else ():
        try:
            if address.strip():
                ipaddress.ip_address(address.strip())
        except ValueError:
            yield "hostaddr: each entry must be a numeric IP address"
            break
    hosts, addresses = _list_count(host), _list_count(hostaddr)
    if hosts and addresses and hosts != addresses:
        yield (
            f"hostaddr: {addresses} addresses for {hosts} host names;"
            " give one address per host name"
        )
    ports = params.get("port", "").split(",")
    if not all(
        not port.strip()
        or (port.strip().isdigit() and 1 <= int(port.strip()) <= 65535)
        for port in ports
    ):
        yield "port: each port must be a number from 1 to 65535"
    targets = addresses or hosts or 1
    if len(ports) > 1 and len(ports) != targets:
        yield (
            f"port: {len(ports)} ports for {targets} hosts;"
            " give one port for all, or one per host"
        )


def _setting_problems(params: Mapping[str, str]) -> Iterator[str]:
    # Never the value itself: in a URI whose password was split by an
    # unencoded character, any value may hold a piece of the password.
    for name, choices in _CONNINFO_CHOICES.items():
        if name in params and params[name] not in choices:
            yield f"{name}: must be one of {', '.join(choices)}"
    for name in ("ssl_min_protocol_version", "ssl_max_protocol_version"):
        value = params.get(name, "").lower()
        if value and value not in {v.lower() for v in _TLS_VERSIONS}:
            yield f"{name}: must be one of {', '.join(_TLS_VERSIONS)}"
    for name in _CONNINFO_INTEGERS:
        if name in params and not params[name].strip().isdigit():
            yield f"{name}: must be a whole number of at least 0"
    if "require_auth" in params:
        methods = params["require_auth"].split(",")
        negated = {method.startswith("!") for method in methods}
        names = {method.removeprefix("!") for method in methods}
        if len(negated) > 1 or not names <= set(_AUTH_METHODS):
            yield (
                "require_auth: must be a list of "
                f"{', '.join(_AUTH_METHODS)}, all or none prefixed with '!'"
            )
    replication = params.get("replication", "").lower()
    if replication not in ("", "0", "false", "off", "no"):
        yield "replication: pdoflowd needs an ordinary session, not a walsender"


def dsn_problems(dsn: str) -> list[str]:
    """What is wrong with a libpq string or URI, never quoting its values.

    libpq's own parser decides what is a setting; then each setting with
    a fixed set of values, a number or a list of hosts and ports is
    checked as libpq would check it when connecting, so that a string which
    can never connect is refused before the daemon starts.
    """
    problems = list(_uri_userinfo_problems(dsn))
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        detail = str(exc).strip()
        if detail.startswith(_SAFE_CONNINFO_ERRORS):
            problems.append(
                f"not a valid libpq connection string or URI: {detail}"
            )
        else:
            problems.append(
                "not a valid libpq connection string or URI"
                " (details withheld: the value may hold a password)"
            )
        return problems
    text = {name: str(value) for name, value in params.items()}
    if not problems:
        problems += _address_problems(text)
    problems += _setting_problems(text)
    return problems
