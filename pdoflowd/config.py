"""pdoflowd's configuration: one TOML file, validated into frozen dataclasses.

This module owns the schema (every section, key, type, default and range),
the single parse of the file, the database password lookup and the arguments
for psycopg.connect. It reports every problem at once, each under its dotted
key, by raising ConfigError; callers exit with EX_CONFIG (78). It must not
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
    "EX_CONFIG",
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
    "load",
    "parse",
    "resolve_password",
]

EX_CONFIG = 78
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


def _conninfo(dsn: str) -> Iterator[str]:
    try:
        conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        detail = str(exc).strip()
        if detail.startswith(_SAFE_CONNINFO_ERRORS):
            yield f"not a valid libpq connection string or URI: {detail}"
        else:
            yield (
                "not a valid libpq connection string or URI"
                " (details withheld: the value may hold a password)"
            )


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
    posting_error_threshold: int = field(default=10, metadata=_rule(at_least=1))
    timeout_s: float = field(default=0.0, metadata=_rule(at_least=0))
    timeout_grace_s: float = field(default=5.0, metadata=_rule(at_least=0))
    retry_delay_s: float = field(default=0.0, metadata=_rule(at_least=0))
    retry_delay_max_s: float = field(default=300.0, metadata=_rule(at_least=0))
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

    heartbeat_interval_s: float = field(default=5.0, metadata=_rule(above=0))
    host_lease_s: float = field(default=30.0, metadata=_rule(above=0))
    maintenance_interval_s: float = field(default=1.0, metadata=_rule(above=0))
    log_level: str = field(default="info", metadata=_rule(check=_log_level))
    crash_loop_max: int = field(default=10, metadata=_rule(at_least=1))
    crash_loop_window_s: float = field(default=60.0, metadata=_rule(above=0))
    respawn_delay_s: float = field(default=0.5, metadata=_rule(above=0))
    respawn_delay_max_s: float = field(default=30.0, metadata=_rule(above=0))
    healthy_uptime_s: float = field(default=30.0, metadata=_rule(above=0))


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
        problem = ConfigProblem("(toml)", f"invalid TOML in {path}: {exc}")
        raise ConfigError([problem]) from exc
    return parse(data, source=path)


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
    if not listen and not database.prepared_statements:
        kwargs["prepare_threshold"] = None
    return kwargs
