"""The configuration's schema: every section, key, type, default and range.

Owns the frozen dataclasses a configuration is (one per section, and
:class:`Config` holding them), each key's rule (a range, or a check of its
value that yields short messages, never the key), and :data:`SECTIONS`.
A key's type is its annotation and its rule its field's metadata, which
:mod:`pdoflowd.config.loading` reads: so this module must not use
``from __future__ import annotations``, which would turn the types into
strings. It must not read files or the environment.
"""

import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from pdoflowd import schedules
from pdoflowd.config.dsn import dsn_problems
from pdoflowd.config.problems import number_text
from pdoflowd.entrypoints import EntryPointRefused, split_entry_point

__all__ = [
    "LOG_LEVELS",
    "SECTIONS",
    "Config",
    "DaemonConfig",
    "DatabaseConfig",
    "JobsConfig",
    "MetricsConfig",
    "RetentionConfig",
    "Rule",
    "ScheduleConfig",
    "WebConfig",
    "WorkersConfig",
]

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Rule:
    """What a key's value must satisfy beyond its type."""

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    check: Callable[[Any], Iterator[str]] | None = None

    def problems(self, value: object) -> Iterator[str]:
        if isinstance(value, (int, float)) and not self._in_range(value):
            yield f"must be {self._range_text()}, got {number_text(value)}"
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
            low = number_text(self.at_least)
            return f"between {low} and {number_text(self.at_most)}"
        parts = []
        if self.at_least is not None:
            parts.append(f"at least {number_text(self.at_least)}")
        if self.above is not None:
            parts.append(f"greater than {number_text(self.above)}")
        if self.at_most is not None:
            parts.append(f"at most {number_text(self.at_most)}")
        return " and ".join(parts)


def _rule(
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    check: Callable[[Any], Iterator[str]] | None = None,
) -> dict[str, Rule]:
    return {"rule": Rule(at_least, above, at_most, check)}


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
    # How much of each attempt's stdout and stderr is kept (its end); 0:
    # the output is not captured (it goes to the journal as it is).
    output_tail_bytes: int = field(
        default=65536, metadata=_rule(at_least=0, at_most=16777216)
    )
    # Named resources: at most this many jobs using each (a posting's
    # uses) executing at once, cluster-wide. The same on every host; a
    # daemon claims no job using a resource it has no limit for.
    limits: Mapping[str, int] = field(default_factory=dict)


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


_SCHEDULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")
# A job's priority, as the client bounds it (an SQL integer).
_PRIORITY_MIN = -(2**31)
_PRIORITY_MAX = 2**31 - 1


def _schedule_name(name: str) -> Iterator[str]:
    if not name:
        yield "every schedule needs a name"
    elif not _SCHEDULE_NAME.fullmatch(name):
        yield (
            f"{name!r} is not a schedule name: 1 to 100 letters, digits and"
            " _ . : -, starting with a letter or digit"
        )


def _entry_point(entry_point: str) -> Iterator[str]:
    if not entry_point:
        yield "every schedule needs the entry point it posts to"
        return
    try:
        split_entry_point(entry_point)
    except EntryPointRefused as exc:
        yield str(exc)


def _cron(text: str) -> Iterator[str]:
    if text:
        try:
            schedules.cron_expression(text)
        except ValueError as exc:
            yield str(exc)


def _time_zone(name: str) -> Iterator[str]:
    try:
        schedules.time_zone(name)
    except ValueError as exc:
        yield str(exc)


def _key_template(template: str) -> Iterator[str]:
    if template:
        yield from schedules.key_problems(template)


@dataclass(frozen=True)
class ScheduleConfig:
    """One ``[[schedules]]`` table: a posting made at each fire time.

    Exactly one of ``cron`` and ``every_s`` is set (0 for every_s: not
    set); ``key`` "" means :data:`pdoflowd.schedules.DEFAULT_KEY`.
    """

    name: str = field(default="", metadata=_rule(check=_schedule_name))
    entry_point: str = field(default="", metadata=_rule(check=_entry_point))
    cron: str = field(default="", metadata=_rule(check=_cron))
    every_s: int = field(
        default=0, metadata=_rule(at_least=1, at_most=_TEN_YEARS_S)
    )
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    priority: int = field(
        default=0, metadata=_rule(at_least=_PRIORITY_MIN, at_most=_PRIORITY_MAX)
    )
    timezone: str = field(default="UTC", metadata=_rule(check=_time_zone))
    backfill: int = field(default=0, metadata=_rule(at_least=0, at_most=1000))
    key: str = field(default="", metadata=_rule(check=_key_template))

    def fire_times(self) -> schedules.FireTimes:
        """When the schedule fires (the config must have been checked)."""
        if self.cron:
            return schedules.FireTimes(
                cron=schedules.cron_expression(self.cron),
                zone=schedules.time_zone(self.timezone),
            )
        return schedules.FireTimes(every_s=self.every_s)

    @property
    def key_template(self) -> str:
        return self.key or schedules.DEFAULT_KEY

    @property
    def when(self) -> str:
        """The timing as an operator wrote it, e.g. "0 3 * * * Europe/Paris"
        or "every 60 s"."""
        if self.cron:
            return f"{self.cron} ({self.timezone})"
        return f"every {self.every_s} s"


@dataclass(frozen=True)
class RetentionConfig:
    """How long ended postings are kept before the daemons prune them."""

    # Off unless enabled: pruning deletes jobs, results and profiles.
    enabled: bool = False
    # Finished postings older than this (seconds since they ended) go, with
    # their jobs, results, profiles and shared variables; 0 keeps them.
    finished_after_s: float = field(
        default=30.0 * _DAY_S, metadata=_rule(at_least=0, at_most=_TEN_YEARS_S)
    )
    # The same for errored-out and cancelled postings: kept longer, for
    # their errors to be read.
    errored_after_s: float = field(
        default=90.0 * _DAY_S, metadata=_rule(at_least=0, at_most=_TEN_YEARS_S)
    )
    # Jobs deleted per transaction, so no lock is held for long.
    batch: int = field(default=1000, metadata=_rule(at_least=1, at_most=100000))
    interval_s: float = field(
        default=60.0, metadata=_rule(above=0, at_most=_DAY_S)
    )


def _web_listen(listen: str) -> Iterator[str]:
    if not listen:
        yield "the web console needs an address, e.g. 127.0.0.1:9465"
    else:
        yield from _listen_address(listen)


def _web_dsn(dsn: str) -> Iterator[str]:
    if dsn:
        yield from dsn_problems(dsn)


@dataclass(frozen=True)
class WebConfig:
    """The web console, ``pdoflowd web``: a process of its own."""

    listen: str = field(
        default="127.0.0.1:9465", metadata=_rule(check=_web_listen)
    )
    # Its own database role ("" and None: database.dsn and its password).
    dsn: str = field(default="", metadata=_rule(check=_web_dsn))
    password_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    users_file: Path | None = None
    allow_actions: bool = False
    # Listen beyond loopback without TLS (basic auth then crosses the
    # network in the clear).
    insecure_listen: bool = False
    # How often an open page's live progress is read again.
    refresh_s: float = field(
        default=2.0, metadata=_rule(at_least=0.5, at_most=60)
    )

    @property
    def host(self) -> str:
        return _split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return _split_listen(self.listen)[1]


@dataclass(frozen=True)
class Config:
    """The whole configuration; source is the file it was loaded from."""

    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    schedules: tuple[ScheduleConfig, ...] = ()
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    web: WebConfig = field(default_factory=WebConfig)
    source: Path | None = None


SECTIONS: Mapping[str, type[Any]] = {
    f.name: f.type
    for f in fields(Config)
    if isinstance(f.type, type) and is_dataclass(f.type)
}
