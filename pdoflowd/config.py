"""pdoflowd's configuration: one TOML file, validated into frozen dataclasses.

This module owns the schema (every section, key, type, default and range),
the single parse of the file, the database password lookup and the arguments
for psycopg.connect. It reports every problem at once, each under its dotted
key, by raising ConfigError; callers exit with EXIT_CONFIG (78). It must not
connect, log or exit, and no other module may read TOML or the environment.
"""

import difflib
import ipaddress
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
from psycopg.conninfo import conninfo_to_dict

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = [
    "APPLICATION_NAME",
    "CREDENTIAL_NAME",
    "DEFAULT_CONFIG_PATH",
    "LOG_LEVELS",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "DaemonConfig",
    "DatabaseConfig",
    "JobsConfig",
    "MetricsConfig",
    "WorkersConfig",
    "connection_kwargs",
    "dsn_problems",
    "load",
    "parse",
    "resolve_password",
]

DEFAULT_CONFIG_PATH = Path("/etc/pdoflowd/pdoflowd.toml")
APPLICATION_NAME = "pdoflowd"
CREDENTIAL_NAME = "db-password"
LOG_LEVELS = ("debug", "info", "warning", "error")


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


class _Invalid(Exception):
    """A value cannot be converted; carries the messages for its key."""

    def __init__(self, *messages: str) -> None:
        super().__init__(*messages)
        self.messages = messages


def _number_text(value: float) -> str:
    """300 rather than 300.0, as an operator would write it."""
    if isinstance(value, int):
        return str(value)
    return repr(value).removesuffix(".0")


@dataclass(frozen=True)
class _Rule:
    """What a key's value must satisfy beyond its type."""

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    check: Callable[[Any], Iterator[str]] | None = None

    def problems(self, value: object) -> Iterator[str]:
        if isinstance(value, (int, float)) and not self._in_range(value):
            yield f"must be {self._range_text()}, got {_number_text(value)}"
        elif self.check is not None:
            yield from self.check(value)

    def _in_range(self, value: float) -> bool:
        return (
            (self.at_least is None or value >= self.at_least)
            and (self.above is None or value > self.above)
            and (self.at_most is None or value <= self.at_most)
        )

    def _range_text(self) -> str:
        if self.at_least is not None and self.at_most is not None:
            low = _number_text(self.at_least)
            return f"between {low} and {_number_text(self.at_most)}"
        parts = []
        if self.at_least is not None:
            parts.append(f"at least {_number_text(self.at_least)}")
        if self.above is not None:
            parts.append(f"greater than {_number_text(self.above)}")
        if self.at_most is not None:
            parts.append(f"at most {_number_text(self.at_most)}")
        return " and ".join(parts)


def _rule(
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    check: Callable[[Any], Iterator[str]] | None = None,
) -> dict[str, _Rule]:
    return {"rule": _Rule(at_least, above, at_most, check)}


# Checks of single values. Each yields short messages, never the key.

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PORT = re.compile(r"[0-9]{1,5}")


def _split_listen(listen: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port"; ValueError says what is wrong."""
    if not listen:
        raise ValueError("the metrics endpoint is disabled")
    host, colon, port_text = listen.rpartition(":")
    if not colon or not host:
        raise ValueError(
            f"expected host:port, e.g. 127.0.0.1:9464, got {listen!r}"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(
            "write an IPv6 address in brackets, e.g. [::1]:9464,"
            f" got {listen!r}"
        )
    elif re.fullmatch(r"[0-9.]+", host):
        # getaddrinfo would read "10.1" as 10.0.0.1; accept only dotted quads.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv4 address") from None
    elif len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{host!r} is not a valid host name")
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"port must be between 0 and 65535, got {port_text!r}")
    return host, int(port_text)


def _listen_address(listen: str) -> Iterator[str]:
    if listen:
        try:
            _split_listen(listen)
        except ValueError as exc:
            yield str(exc)


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


def _conninfo(dsn: str) -> Iterator[str]:
    yield from dsn_problems(dsn)


def _module_names(names: tuple[str, ...]) -> Iterator[str]:
    for index, name in enumerate(names):
        if not all(part.isidentifier() for part in name.split(".")):
            yield f"{name!r} at [{index}] is not a dotted module name"


def _function_labels(names: tuple[str, ...]) -> Iterator[str]:
    yield from _module_names(names)
    if len(set(names)) != len(names):
        yield "names must not repeat"
    if len(names) > _MAX_FUNCTION_LABELS:
        yield f"at most {_MAX_FUNCTION_LABELS} names (each is a label value)"


_MAX_FUNCTION_LABELS = 100


def _capabilities(names: tuple[str, ...]) -> Iterator[str]:
    for index, name in enumerate(names):
        if not name.strip():
            yield f"empty capability at [{index}]"


def _role_names(names: tuple[str, ...]) -> Iterator[str]:
    for index, name in enumerate(names):
        if not name or "\x00" in name:
            yield f"{name!r} at [{index}] is not a database role name"


def _log_level(level: str) -> Iterator[str]:
    if level not in LOG_LEVELS:
        yield f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}"


# The sections. Each key's type is its annotation; its rule is its metadata.
# Every duration has an upper bound: a value the loop, a timedelta added to
# now, or PostgreSQL's interval arithmetic cannot carry is refused here,
# not met later as an OverflowError in a worker.

_HOUR_S = 3600
_DAY_S = 86400
_MONTH_S = 30 * _DAY_S
_TEN_YEARS_S = 3650 * _DAY_S


@dataclass(frozen=True)
class DatabaseConfig:
    """How to reach PostgreSQL."""

    dsn: str = field(default="", metadata=_rule(check=_conninfo))
    password_file: Path | None = None
    listen_dsn: str = field(default="", metadata=_rule(check=_conninfo))
    connect_timeout_s: float = field(
        default=5.0, metadata=_rule(above=0, at_most=300)
    )
    prepared_statements: bool = True
    # Deadlines of the supervisor's own statements, and of every connection
    # on a network path that drops packets instead of refusing them.
    statement_timeout_s: float = field(
        default=10.0, metadata=_rule(above=0, at_most=3600)
    )
    lock_timeout_s: float = field(
        default=1.0, metadata=_rule(above=0, at_most=3600)
    )
    tcp_user_timeout_s: float = field(
        default=15.0, metadata=_rule(at_least=0, at_most=3600)
    )


@dataclass(frozen=True)
class WorkersConfig:
    """The worker processes of this host."""

    count: int = field(default=2, metadata=_rule(at_least=1, at_most=1024))
    batch_size: int = field(
        default=10, metadata=_rule(at_least=1, at_most=10000)
    )
    poll_interval_s: float = field(
        default=1.0, metadata=_rule(above=0, at_most=3600)
    )
    outcome_flush_ms: int = field(
        default=20, metadata=_rule(at_least=0, at_most=60000)
    )
    drain_timeout_s: float = field(
        default=30.0, metadata=_rule(at_least=0, at_most=86400)
    )
    max_jobs_per_worker: int = field(default=0, metadata=_rule(at_least=0))
    max_memory_mb: int = field(default=0, metadata=_rule(at_least=0))
    provides: tuple[str, ...] = field(
        default=(), metadata=_rule(check=_capabilities)
    )
    preload_modules: tuple[str, ...] = field(
        default=(), metadata=_rule(check=_module_names)
    )
    posters: tuple[str, ...] = field(
        default=(), metadata=_rule(check=_role_names)
    )


@dataclass(frozen=True)
class JobsConfig:
    """What jobs may run, and how failures and timeouts are handled."""

    allowed_modules: tuple[str, ...] = field(
        default=(), metadata=_rule(check=_module_names)
    )
    # Run plain functions (not marked with @job) under allowed_modules too.
    allow_unmarked: bool = False
    posting_error_threshold: int = field(default=10, metadata=_rule(at_least=1))
    timeout_s: float = field(
        default=0.0, metadata=_rule(at_least=0, at_most=_TEN_YEARS_S)
    )
    timeout_grace_s: float = field(
        default=5.0, metadata=_rule(at_least=0, at_most=_DAY_S)
    )
    # A retry's time is now + the delay, as a datetime: bounded so that the
    # sum stays far inside what datetime and timestamptz can hold.
    retry_delay_s: float = field(
        default=0.0, metadata=_rule(at_least=0, at_most=_MONTH_S)
    )
    retry_delay_max_s: float = field(
        default=300.0, metadata=_rule(at_least=0, at_most=_MONTH_S)
    )
    result_max_bytes: int = field(
        default=1048576, metadata=_rule(at_least=1, at_most=268435455)
    )
    profile_sample_rate: float = field(
        default=0.0, metadata=_rule(at_least=0, at_most=1)
    )


@dataclass(frozen=True)
class MetricsConfig:
    """The HTTP endpoint for /metrics, /livez and /readyz."""

    listen: str = field(
        default="127.0.0.1:9464", metadata=_rule(check=_listen_address)
    )
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    function_labels: tuple[str, ...] = field(
        default=(), metadata=_rule(check=_function_labels)
    )
    queue_stats_interval_s: float = field(
        default=5.0, metadata=_rule(at_least=1, at_most=3600)
    )

    @property
    def enabled(self) -> bool:
        return bool(self.listen)

    @property
    def host(self) -> str:
        """The host to bind, IPv6 without brackets; ValueError if disabled."""
        return _split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        """The port to bind (0: any free port); ValueError if disabled."""
        return _split_listen(self.listen)[1]


@dataclass(frozen=True)
class DaemonConfig:
    """The supervisor: liveness, maintenance, logging, crash loops."""

    heartbeat_interval_s: float = field(
        default=5.0, metadata=_rule(above=0, at_most=_HOUR_S)
    )
    host_lease_s: float = field(
        default=30.0, metadata=_rule(above=0, at_most=_DAY_S)
    )
    maintenance_interval_s: float = field(
        default=1.0, metadata=_rule(above=0, at_most=_HOUR_S)
    )
    log_level: str = field(default="info", metadata=_rule(check=_log_level))
    crash_loop_max: int = field(default=10, metadata=_rule(at_least=1))
    crash_loop_window_s: float = field(
        default=60.0, metadata=_rule(above=0, at_most=_DAY_S)
    )
    respawn_delay_s: float = field(
        default=0.5, metadata=_rule(above=0, at_most=_HOUR_S)
    )
    respawn_delay_max_s: float = field(
        default=30.0, metadata=_rule(above=0, at_most=_DAY_S)
    )
    healthy_uptime_s: float = field(
        default=30.0, metadata=_rule(above=0, at_most=_DAY_S)
    )


@dataclass(frozen=True)
class Config:
    """The whole configuration; source is the file it was loaded from."""

    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    source: Path | None = None


_SECTIONS: Mapping[str, type[Any]] = {
    f.name: f.type
    for f in fields(Config)
    if isinstance(f.type, type) and is_dataclass(f.type)
}


# Conversion from decoded TOML. Converters raise _Invalid with messages.


def _toml_type(value: object) -> str:
    names: tuple[tuple[type, str], ...] = (
        (bool, "boolean"),
        (int, "integer"),
        (float, "float"),
        (str, "string"),
        (list, "array"),
        (tuple, "array"),
        (Mapping, "table"),
        (datetime, "datetime"),
        (date, "date"),
        (time, "time"),
    )
    for kind, name in names:
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _to_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _Invalid(f"expected an integer, got {_toml_type(value)}")


def _to_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"expected a number, got {_toml_type(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _Invalid(f"must be a finite number, got {value}")
    return number


def _to_str(value: object) -> str:
    if isinstance(value, str):
        return value
    raise _Invalid(f"expected a string, got {_toml_type(value)}")


def _to_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid(f"expected a boolean, got {_toml_type(value)}")


def _to_strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise _Invalid(f"expected an array of strings, got {_toml_type(value)}")
    wrong = [
        f"expected a string at [{index}], got {_toml_type(item)}"
        for index, item in enumerate(value)
        if not isinstance(item, str)
    ]
    if wrong:
        raise _Invalid(*wrong)
    return tuple(value)


def _to_optional_path(value: object) -> Path | None:
    # TOML has no null: the empty string stands for "no file".
    text = _to_str(value)
    if not text:
        return None
    path = Path(text)
    if not path.is_absolute():
        raise _Invalid(f"must be an absolute path, got {text!r}")
    return path


_CONVERTERS: Mapping[object, Callable[[object], object]] = {
    int: _to_int,
    float: _to_float,
    str: _to_str,
    bool: _to_bool,
    tuple[str, ...]: _to_strings,
    Path | None: _to_optional_path,
}


def _suggestion(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _section_hint(key: str) -> str:
    for name, cls in _SECTIONS.items():
        if key in {f.name for f in fields(cls)}:
            return f"did you mean {name}.{key}?"
    return "settings belong in a section, e.g. [workers]"


def _parse_section(
    name: str, cls: type[Any], raw: Mapping[str, object]
) -> tuple[Any, list[ConfigProblem]]:
    problems: list[ConfigProblem] = []
    known = {f.name: f for f in fields(cls)}
    values: dict[str, object] = {}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        if key not in known:
            message = "unknown key" + _suggestion(key, known)
            problems.append(ConfigProblem(dotted, message))
            continue
        spec = known[key]
        try:
            converted = _CONVERTERS[spec.type](value)
        except _Invalid as exc:
            problems.extend(ConfigProblem(dotted, m) for m in exc.messages)
            continue
        rule: _Rule = spec.metadata.get("rule", _Rule())
        wrong = [ConfigProblem(dotted, m) for m in rule.problems(converted)]
        if wrong:
            problems.extend(wrong)
        else:
            values[key] = converted
    return cls(**values), problems


def _cross_problems(
    config: Config, rejected: set[str]
) -> Iterator[ConfigProblem]:
    # Rejected values were replaced by defaults, so a rule between keys is
    # checked only when every key it reads was accepted as written.
    def accepted(*keys: str) -> bool:
        return not any(
            key in rejected or key.partition(".")[0] in rejected for key in keys
        )

    daemon, jobs = config.daemon, config.jobs
    if (
        accepted("daemon.host_lease_s", "daemon.heartbeat_interval_s")
        and daemon.host_lease_s <= 2 * daemon.heartbeat_interval_s
    ):
        beat = _number_text(daemon.heartbeat_interval_s)
        yield ConfigProblem(
            "daemon.host_lease_s",
            f"must be more than twice daemon.heartbeat_interval_s ({beat}),"
            f" got {_number_text(daemon.host_lease_s)}",
        )
    metrics = config.metrics
    tls_keys = ("tls_cert_file", "tls_key_file", "tls_client_ca_file")
    if accepted("metrics.listen") and not metrics.enabled:
        for name in tls_keys:
            if getattr(metrics, name) is not None:
                yield ConfigProblem(
                    f"metrics.{name}", "set, but metrics.listen is empty"
                )
    if metrics.tls_cert_file is None:
        for name in tls_keys[1:]:
            if getattr(metrics, name) is not None:
                yield ConfigProblem(
                    f"metrics.{name}", "needs metrics.tls_cert_file"
                )
    if (
        accepted("jobs.retry_delay_max_s", "jobs.retry_delay_s")
        and jobs.retry_delay_max_s < jobs.retry_delay_s
    ):
        base = _number_text(jobs.retry_delay_s)
        yield ConfigProblem(
            "jobs.retry_delay_max_s",
            f"must be at least jobs.retry_delay_s ({base}),"
            f" got {_number_text(jobs.retry_delay_max_s)}",
        )


def parse(data: Mapping[str, object], source: Path | None = None) -> Config:
    """Validate a decoded TOML document; ConfigError lists every problem."""
    problems: list[ConfigProblem] = []
    sections: dict[str, Any] = {}
    for name, raw in data.items():
        if name in _SECTIONS:
            continue
        if isinstance(raw, Mapping):
            message = "unknown section" + _suggestion(name, _SECTIONS)
        else:
            message = "unknown key; " + _section_hint(name)
        problems.append(ConfigProblem(name, message))
    for name, cls in _SECTIONS.items():
        raw = data.get(name, {})
        if not isinstance(raw, Mapping):
            got = _toml_type(raw)
            problems.append(ConfigProblem(name, f"expected a table, got {got}"))
            sections[name] = cls()
            continue
        sections[name], wrong = _parse_section(name, cls, raw)
        problems.extend(wrong)
    config = Config(**sections, source=source)
    problems.extend(_cross_problems(config, {p.key for p in problems}))
    if problems:
        raise ConfigError(problems)
    return config


def _reason(exc: OSError) -> str:
    return exc.strerror.lower() if exc.strerror else str(exc)


def load(path: Path) -> Config:
    """Read and validate the configuration file at path."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        problem = ConfigProblem("(file)", f"cannot read {path}: {_reason(exc)}")
        raise ConfigError([problem]) from exc
    except UnicodeDecodeError as exc:
        # The position, not the bytes: the file may hold a password in a dsn.
        message = f"{path} is not valid UTF-8 (at byte {exc.start})"
        problem = ConfigProblem("(toml)", message)
        raise ConfigError([problem]) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problem = _duplicate_problem(text, str(exc)) or ConfigProblem(
            "(toml)", f"invalid TOML in {path}: {exc}"
        )
        raise ConfigError([problem]) from None
    return parse(data, source=path)


# A key set twice: tomllib says where it noticed (after the value), not
# which key, so the key is found again by parsing ever longer prefixes.
_DUPLICATE_ERRORS = re.compile(
    r"Cannot (?:overwrite a value|declare|mutate|redefine)"
    r"|Duplicate inline table key (?P<inline>'[^']*'|\"[^\"]*\")"
)
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
_KEY = re.compile(rf"\[*[ \t]*({_KEY_PART}(?:[ \t]*\.[ \t]*{_KEY_PART})*)")
_PROBE = "__pdoflowd_probe__"


def _fails_with_duplicate(text: str) -> bool:
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return _DUPLICATE_ERRORS.match(str(exc)) is not None
    return False


def _parses(text: str) -> bool:
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return False
    return True


def _key_parts(key_text: str) -> list[str]:
    """The decoded parts of a TOML key such as ``a."b.c"``."""
    parts: list[str] = []
    node: object = tomllib.loads(f"{key_text} = 0")
    while isinstance(node, dict):
        (name, node), *_ = node.items()
        parts.append(name)
    return parts


def _table_path(prefix: str) -> list[str]:
    """The table a key/value line after ``prefix`` would land in."""

    def find(node: object, path: list[str]) -> list[str] | None:
        if isinstance(node, list) and node:
            return find(node[-1], path)
        if not isinstance(node, dict):
            return None
        if _PROBE in node:
            return path
        for name, value in node.items():
            found = find(value, [*path, name])
            if found is not None:
                return found
        return None

    return find(tomllib.loads(f"{prefix}\n{_PROBE} = 0\n"), []) or []


def _duplicate_problem(text: str, error: str) -> ConfigProblem | None:
    """The key a duplicate definition sets, or None if not a duplicate."""
    duplicate = _DUPLICATE_ERRORS.match(error)
    if duplicate is None:
        return None
    lines = text.splitlines(keepends=True)
    # Once a prefix holds the second definition, every longer one fails
    # with it too: bisect for the line that ends it.
    low, high = 1, len(lines)
    while low < high:
        middle = (low + high) // 2
        if _fails_with_duplicate("".join(lines[:middle])):
            high = middle
        else:
            low = middle + 1
    start = low - 1
    while start > 0 and not _parses("".join(lines[:start])):
        start -= 1
    for number in range(start, low):
        statement = lines[number].strip()
        if statement and not statement.startswith("#"):
            break
    else:
        return None
    key = _KEY.match(statement)
    if key is None:
        return None
    try:
        parts = _key_parts(key.group(1))
        if not statement.startswith("["):
            parts = _table_path("".join(lines[:start])) + parts
    except (tomllib.TOMLDecodeError, ValueError):
        return None
    if duplicate.group("inline"):
        parts.append(duplicate.group("inline")[1:-1])
    return ConfigProblem(
        ".".join(parts),
        f"defined twice: again at line {number + 1}; keep one definition",
    )


def _read_password(path: Path, key: str, *, missing_ok: bool) -> str | None:
    # "from None" throughout: a chained decode error would show the bytes.
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        if missing_ok:
            return None
        message = f"cannot read {path}: no such file"
        raise ConfigError([ConfigProblem(key, message)]) from None
    except OSError as exc:
        message = f"cannot read {path}: {_reason(exc)}"
        raise ConfigError([ConfigProblem(key, message)]) from None
    except UnicodeDecodeError:
        message = f"{path} is not valid UTF-8"
        raise ConfigError([ConfigProblem(key, message)]) from None
    password = text.split("\n", 1)[0].removesuffix("\r")
    if not password:
        # PostgreSQL never accepts an empty password, so this is a mistake.
        message = f"{path} holds no password: its first line is empty"
        raise ConfigError([ConfigProblem(key, message)])
    return password


def resolve_password(
    database: DatabaseConfig, environ: Mapping[str, str]
) -> str | None:
    """The database password, or None to leave it to libpq (dsn, passfile).

    A systemd credential ($CREDENTIALS_DIRECTORY/db-password) wins over
    database.password_file. Only the first line counts.
    """
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        credential = Path(directory) / CREDENTIAL_NAME
        password = _read_password(credential, "(credentials)", missing_ok=True)
        if password is not None:
            return password
    if database.password_file is None:
        return None
    return _read_password(
        database.password_file, "database.password_file", missing_ok=False
    )


def _network_deadlines(
    dsn: str, tcp_user_timeout_s: float
) -> dict[str, object]:
    """libpq settings that end a connection on a path that drops packets:
    unacknowledged data after ``tcp_user_timeout_s``, and keepalives that
    notice a silent peer in about that time. The DSN's own values win."""
    if not tcp_user_timeout_s:
        return {}
    given = conninfo_to_dict(dsn) if dsn else {}
    probe_s = max(1, math.ceil(tcp_user_timeout_s / 3))
    settings: dict[str, object] = {
        "tcp_user_timeout": max(1, round(tcp_user_timeout_s * 1000)),
        "keepalives": 1,
        "keepalives_idle": probe_s,
        "keepalives_interval": max(1, math.ceil(probe_s / 3)),
        "keepalives_count": 3,
    }
    return {k: v for k, v in settings.items() if k not in given}


def connection_kwargs(
    database: DatabaseConfig, password: str | None, *, listen: bool = False
) -> dict[str, object]:
    """Keyword arguments for psycopg.connect.

    listen=True gives the supervisor's own connection (listen_dsn if set),
    which never goes through a transaction-mode pooler and so keeps
    prepared statements.
    """
    dsn = (database.listen_dsn or database.dsn) if listen else database.dsn
    kwargs: dict[str, object] = {
        "conninfo": dsn,
        # libpq takes whole seconds; 0 would mean "wait forever".
        "connect_timeout": max(1, math.ceil(database.connect_timeout_s)),
        # A fallback, so an application_name in the dsn or $PGAPPNAME wins.
        "fallback_application_name": APPLICATION_NAME,
    }
    if password is not None:
        kwargs["password"] = password
    kwargs.update(_network_deadlines(dsn, database.tcp_user_timeout_s))
    if not listen and not database.prepared_statements:
        kwargs["prepare_threshold"] = None
    return kwargs
