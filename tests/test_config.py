"""The configuration: schema, validation, password lookup, connection args."""

import dataclasses
import datetime as dt
import ipaddress
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from pdoflowd.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    ConfigProblem,
    DaemonConfig,
    DatabaseConfig,
    JobsConfig,
    MetricsConfig,
    RetentionConfig,
    WebConfig,
    WorkersConfig,
    connection_kwargs,
    load,
    parse,
    resolve_password,
)
from pdoflowd.exitcodes import EXIT_CONFIG

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = ROOT / "etc" / "pdoflowd" / "pdoflowd.toml"
REFERENCE = ROOT / "docs" / "configuration.md"

SECTIONS = {
    "database": DatabaseConfig,
    "workers": WorkersConfig,
    "jobs": JobsConfig,
    "metrics": MetricsConfig,
    "daemon": DaemonConfig,
    "retention": RetentionConfig,
    "web": WebConfig,
}


def all_keys() -> set[str]:
    return {
        f"{section}.{f.name}"
        for section, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
    }


def problems_of(data: dict[str, Any]) -> tuple[ConfigProblem, ...]:
    with pytest.raises(ConfigError) as caught:
        parse(data)
    return caught.value.problems


def the_problem(data: dict[str, Any]) -> ConfigProblem:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    return problems[0]


def as_toml_value(default: object) -> object:
    """A default as it is written in TOML: arrays, and "" for no path."""
    if isinstance(default, tuple):
        return list(default)
    if default is None:
        return ""
    return default


# The constants.


def test_exit_status_for_config_errors_is_ex_config() -> None:
    assert EXIT_CONFIG == 78


def test_default_config_path_is_under_etc() -> None:
    assert Path("/etc/pdoflowd/pdoflowd.toml") == DEFAULT_CONFIG_PATH


# Defaults.


def test_empty_document_gives_the_defaults() -> None:
    assert parse({}) == Config()


def test_missing_section_takes_its_defaults() -> None:
    config = parse({"workers": {"count": 4}})

    assert config.workers == WorkersConfig(count=4)
    assert config.database == DatabaseConfig()
    assert config.daemon == DaemonConfig()


def test_empty_section_takes_its_defaults() -> None:
    assert parse({"jobs": {}}).jobs == JobsConfig()


def test_secure_default_allows_no_modules() -> None:
    assert parse({}).jobs.allowed_modules == ()


def test_source_is_recorded() -> None:
    source = Path("/somewhere/pdoflowd.toml")

    assert parse({}, source=source).source == source


# Conversions.


def test_integer_is_accepted_where_a_number_is_expected() -> None:
    config = parse({"workers": {"drain_timeout_s": 12}})

    assert config.workers.drain_timeout_s == 12.0
    assert isinstance(config.workers.drain_timeout_s, float)


def test_arrays_become_tuples() -> None:
    config = parse({"workers": {"provides": ["gpu", "ssd"]}})

    assert config.workers.provides == ("gpu", "ssd")


def test_password_file_becomes_a_path() -> None:
    config = parse({"database": {"password_file": "/etc/pdoflowd/db-pass"}})

    assert config.database.password_file == Path("/etc/pdoflowd/db-pass")


def test_empty_password_file_means_none() -> None:
    assert parse({"database": {"password_file": ""}}).database == (
        DatabaseConfig(password_file=None)
    )


def test_valid_dsn_forms_are_accepted() -> None:
    config = parse(
        {
            "database": {
                "dsn": "host=db1 dbname=jobs user=pdoflowd",
                "listen_dsn": "postgresql://pdoflowd@db1:5432/jobs",
            }
        }
    )

    assert config.database.dsn == "host=db1 dbname=jobs user=pdoflowd"


# Unknown names.


def test_unknown_section_is_reported() -> None:
    problem = the_problem({"wrokers": {"count": 2}})

    assert problem.key == "wrokers"
    assert problem.message.startswith("unknown section")
    assert "workers" in problem.message


def test_unknown_key_is_reported_with_a_suggestion() -> None:
    problem = the_problem({"workers": {"cuont": 2}})

    assert problem == ConfigProblem(
        "workers.cuont", "unknown key; did you mean 'count'?"
    )


def test_unknown_key_without_a_near_name_has_no_suggestion() -> None:
    assert the_problem({"workers": {"zzz": 1}}).message == "unknown key"


def test_key_outside_any_section_points_to_its_section() -> None:
    problem = the_problem({"count": 2})

    assert problem.key == "count"
    assert "workers.count" in problem.message


def test_section_that_is_not_a_table_is_reported() -> None:
    problem = the_problem({"workers": 4})

    assert problem == ConfigProblem("workers", "expected a table, got integer")


# Types.


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("workers.count", "2", "expected an integer, got string"),
        ("workers.count", 2.0, "expected an integer, got float"),
        ("workers.outcome_flush_ms", 2.5, "expected an integer, got float"),
        ("workers.poll_interval_s", "1s", "expected a number, got string"),
        ("database.dsn", 5, "expected a string, got integer"),
        (
            "database.prepared_statements",
            "no",
            "expected a boolean, got string",
        ),
        ("database.prepared_statements", 0, "expected a boolean, got integer"),
        (
            "jobs.allowed_modules",
            "myapp",
            "expected an array of strings, got string",
        ),
        ("metrics.listen", 9464, "expected a string, got integer"),
        ("daemon.log_level", ["info"], "expected a string, got array"),
        ("workers.count", {"n": 2}, "expected an integer, got table"),
    ],
)
def test_wrong_type_is_reported_with_the_expected_type(
    key: str, value: object, message: str
) -> None:
    section, name = key.split(".")

    assert the_problem({section: {name: value}}) == ConfigProblem(key, message)


def test_boolean_is_not_an_integer() -> None:
    assert the_problem({"workers": {"count": True}}) == ConfigProblem(
        "workers.count", "expected an integer, got boolean"
    )


def test_boolean_is_not_a_number() -> None:
    assert the_problem({"jobs": {"timeout_s": False}}) == ConfigProblem(
        "jobs.timeout_s", "expected a number, got boolean"
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_number_is_rejected(value: float) -> None:
    problem = the_problem({"jobs": {"timeout_s": value}})

    assert problem.key == "jobs.timeout_s"
    assert problem.message.startswith("must be a finite number")


def test_each_array_item_that_is_not_a_string_is_reported() -> None:
    problems = problems_of({"workers": {"provides": ["gpu", 1, True]}})

    assert problems == (
        ConfigProblem(
            "workers.provides", "expected a string at [1], got integer"
        ),
        ConfigProblem(
            "workers.provides", "expected a string at [2], got boolean"
        ),
    )


# Ranges.


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("workers.count", 0, "must be between 1 and 1024, got 0"),
        ("workers.count", 1025, "must be between 1 and 1024, got 1025"),
        ("workers.batch_size", 10001, "must be between 1 and 10000, got 10001"),
        (
            "workers.poll_interval_s",
            0,
            "must be greater than 0 and at most 3600, got 0",
        ),
        (
            "workers.poll_interval_s",
            3600.5,
            "must be greater than 0 and at most 3600, got 3600.5",
        ),
        ("workers.outcome_flush_ms", -1, "must be between 0 and 60000, got -1"),
        (
            "workers.drain_timeout_s",
            86401,
            "must be between 0 and 86400, got 86401",
        ),
        ("workers.max_jobs_per_worker", -1, "must be at least 0, got -1"),
        ("workers.max_memory_mb", -5, "must be at least 0, got -5"),
        (
            "database.connect_timeout_s",
            0.0,
            "must be greater than 0 and at most 300, got 0",
        ),
        (
            "database.connect_timeout_s",
            301,
            "must be greater than 0 and at most 300, got 301",
        ),
        ("jobs.posting_error_threshold", 0, "must be at least 1, got 0"),
        (
            "jobs.timeout_s",
            -0.5,
            "must be between 0 and 315360000, got -0.5",
        ),
        ("jobs.timeout_grace_s", -1, "must be between 0 and 86400, got -1"),
        ("jobs.retry_delay_s", -1, "must be between 0 and 2592000, got -1"),
        (
            "daemon.heartbeat_interval_s",
            0,
            "must be greater than 0 and at most 3600, got 0",
        ),
        (
            "daemon.maintenance_interval_s",
            -1,
            "must be greater than 0 and at most 3600, got -1",
        ),
        ("daemon.crash_loop_max", 0, "must be at least 1, got 0"),
        (
            "daemon.crash_loop_window_s",
            0,
            "must be greater than 0 and at most 86400, got 0",
        ),
        # Every duration has a ceiling that date arithmetic survives.
        (
            "jobs.timeout_s",
            315360001,
            "must be between 0 and 315360000, got 315360001",
        ),
        (
            "jobs.timeout_grace_s",
            86400.5,
            "must be between 0 and 86400, got 86400.5",
        ),
        (
            "jobs.retry_delay_s",
            1e12,
            "must be between 0 and 2592000, got 1000000000000",
        ),
        (
            "jobs.retry_delay_max_s",
            2592001,
            "must be between 0 and 2592000, got 2592001",
        ),
        (
            "daemon.heartbeat_interval_s",
            3601,
            "must be greater than 0 and at most 3600, got 3601",
        ),
        (
            "daemon.maintenance_interval_s",
            1e300,
            "must be greater than 0 and at most 3600, got 1e+300",
        ),
        (
            "daemon.crash_loop_window_s",
            86401,
            "must be greater than 0 and at most 86400, got 86401",
        ),
        (
            "daemon.respawn_delay_s",
            3601,
            "must be greater than 0 and at most 3600, got 3601",
        ),
        (
            "daemon.respawn_delay_max_s",
            86401,
            "must be greater than 0 and at most 86400, got 86401",
        ),
        (
            "daemon.healthy_uptime_s",
            86401,
            "must be greater than 0 and at most 86400, got 86401",
        ),
    ],
)
def test_out_of_range_value_is_reported_with_the_range(
    key: str, value: float, message: str
) -> None:
    section, name = key.split(".")

    assert the_problem({section: {name: value}}) == ConfigProblem(key, message)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("workers.count", 1),
        ("workers.count", 1024),
        ("workers.batch_size", 10000),
        ("workers.poll_interval_s", 3600),
        ("workers.outcome_flush_ms", 0),
        ("workers.outcome_flush_ms", 60000),
        ("workers.drain_timeout_s", 0),
        ("workers.drain_timeout_s", 86400),
        ("database.connect_timeout_s", 300),
        ("database.connect_timeout_s", 0.001),
        ("jobs.posting_error_threshold", 1),
        ("daemon.crash_loop_max", 1),
        ("jobs.timeout_s", 315360000),
        ("jobs.timeout_grace_s", 86400),
        ("jobs.retry_delay_max_s", 2592000),
        ("daemon.maintenance_interval_s", 3600),
        ("daemon.respawn_delay_max_s", 86400),
        ("daemon.healthy_uptime_s", 86400),
    ],
)
def test_range_bounds_are_inclusive(key: str, value: float) -> None:
    section, name = key.split(".")

    config = parse({section: {name: value}})

    assert getattr(getattr(config, section), name) == value


def duration_keys() -> list[str]:
    return sorted(key for key in all_keys() if key.endswith(("_s", "_ms")))


@pytest.mark.parametrize("key", duration_keys())
def test_every_duration_has_a_ceiling_that_date_arithmetic_survives(
    key: str,
) -> None:
    section, name = key.split(".")
    spec = {f.name: f for f in dataclasses.fields(SECTIONS[section])}[name]
    ceiling = spec.metadata["rule"].at_most
    seconds = ceiling / 1000 if key.endswith("_ms") else ceiling

    assert ceiling is not None, f"{key} has no upper bound"
    # What a worker does with a retry delay, and the scoreboard with a
    # deadline: the sum must exist, with centuries to spare.
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)
    assert later.year < 2200
    assert time.monotonic() + seconds < 2**53


def test_a_retry_delay_too_large_for_a_timedelta_sum_is_refused() -> None:
    # 1e12 s passed the check once; the worker then met an OverflowError
    # adding it to the time a job failed.
    problems = problems_of(
        {"jobs": {"retry_delay_s": 1e12, "retry_delay_max_s": 1e12}}
    )
    assert [p.key for p in problems] == [
        "jobs.retry_delay_max_s",
        "jobs.retry_delay_s",
    ]


@given(count=st.integers())
def test_worker_count_is_accepted_exactly_from_1_to_1024(count: int) -> None:
    try:
        config = parse({"workers": {"count": count}})
    except ConfigError as exc:
        assert not 1 <= count <= 1024
        assert [p.key for p in exc.problems] == ["workers.count"]
    else:
        assert 1 <= count <= 1024
        assert config.workers.count == count


# Rules between keys.


def test_host_lease_of_twice_the_heartbeat_is_rejected() -> None:
    problem = the_problem(
        {"daemon": {"heartbeat_interval_s": 5, "host_lease_s": 10}}
    )

    assert problem == ConfigProblem(
        "daemon.host_lease_s",
        "must be more than twice daemon.heartbeat_interval_s (5), got 10",
    )


def test_host_lease_is_checked_against_the_default_heartbeat() -> None:
    assert the_problem({"daemon": {"host_lease_s": 9.5}}).key == (
        "daemon.host_lease_s"
    )


def test_host_lease_just_over_twice_the_heartbeat_is_accepted() -> None:
    config = parse({"daemon": {"heartbeat_interval_s": 2, "host_lease_s": 4.5}})

    assert config.daemon.host_lease_s == 4.5


def test_host_lease_is_not_compared_with_a_rejected_heartbeat() -> None:
    problems = problems_of(
        {"daemon": {"heartbeat_interval_s": "5", "host_lease_s": 1}}
    )

    assert [p.key for p in problems] == ["daemon.heartbeat_interval_s"]


def test_retention_is_off_by_default() -> None:
    assert parse({}).retention.enabled is False


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("retention.batch", 0, "must be between 1 and 100000, got 0"),
        ("retention.batch", 100001, "must be between 1 and 100000, got 100001"),
        (
            "retention.finished_after_s",
            -1,
            "must be between 0 and 315360000, got -1",
        ),
        (
            "retention.errored_after_s",
            315360001,
            "must be between 0 and 315360000, got 315360001",
        ),
        (
            "retention.interval_s",
            0,
            "must be greater than 0 and at most 86400, got 0",
        ),
        ("retention.enabled", "yes", "expected a boolean, got string"),
    ],
)
def test_a_bad_retention_value_is_named_by_its_dotted_key(
    key: str, value: object, message: str
) -> None:
    section, name = key.split(".")

    assert the_problem({section: {name: value}}) == ConfigProblem(key, message)


def test_retention_enabled_with_both_ages_zero_is_rejected() -> None:
    problem = the_problem(
        {
            "retention": {
                "enabled": True,
                "finished_after_s": 0,
                "errored_after_s": 0,
            }
        }
    )

    assert problem.key == "retention.enabled"
    assert "nothing would be pruned" in problem.message


def test_retention_may_keep_one_kind_of_posting_for_ever() -> None:
    config = parse({"retention": {"enabled": True, "errored_after_s": 0}})

    assert config.retention.finished_after_s == 30 * 86400
    assert config.retention.errored_after_s == 0


def test_retry_delay_max_below_retry_delay_is_rejected() -> None:
    problem = the_problem(
        {"jobs": {"retry_delay_s": 60, "retry_delay_max_s": 30}}
    )

    assert problem == ConfigProblem(
        "jobs.retry_delay_max_s",
        "must be at least jobs.retry_delay_s (60), got 30",
    )


# Single-value rules.


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_known_log_level_is_accepted(level: str) -> None:
    assert parse({"daemon": {"log_level": level}}).daemon.log_level == level


@pytest.mark.parametrize("level", ["verbose", "INFO", "warn", ""])
def test_unknown_log_level_is_rejected(level: str) -> None:
    assert the_problem({"daemon": {"log_level": level}}) == ConfigProblem(
        "daemon.log_level",
        f"must be one of debug, info, warning, error, got {level!r}",
    )


@pytest.mark.parametrize(
    "name", ["myapp", "myapp.tasks", "_private.x2", "café.tâches"]
)
def test_dotted_module_name_is_allowed(name: str) -> None:
    config = parse({"jobs": {"allowed_modules": [name]}})

    assert config.jobs.allowed_modules == (name,)


@pytest.mark.parametrize(
    "name", ["", "my-app", "myapp.", ".myapp", "my..app", "1app", "my app"]
)
def test_bad_module_name_in_allowed_modules_is_rejected(name: str) -> None:
    problem = the_problem({"jobs": {"allowed_modules": ["ok", name]}})

    assert problem == ConfigProblem(
        "jobs.allowed_modules", f"{name!r} at [1] is not a dotted module name"
    )


def test_bad_module_name_in_preload_modules_is_rejected() -> None:
    problem = the_problem({"workers": {"preload_modules": ["app/tasks.py"]}})

    assert problem.key == "workers.preload_modules"
    assert "not a dotted module name" in problem.message


@pytest.mark.parametrize("capability", ["", "  "])
def test_empty_capability_is_rejected(capability: str) -> None:
    assert the_problem({"workers": {"provides": [capability]}}) == (
        ConfigProblem("workers.provides", "empty capability at [0]")
    )


def test_relative_password_file_is_rejected() -> None:
    assert the_problem({"database": {"password_file": "db-pass"}}) == (
        ConfigProblem(
            "database.password_file", "must be an absolute path, got 'db-pass'"
        )
    )


def test_unknown_dsn_parameter_is_named() -> None:
    problem = the_problem({"database": {"dsn": "host=db1 dbnme=jobs"}})

    assert problem.key == "database.dsn"
    assert '"dbnme"' in problem.message


def test_malformed_dsn_is_reported_without_echoing_it() -> None:
    problem = the_problem({"database": {"listen_dsn": "password 's3cret"}})

    assert problem.key == "database.listen_dsn"
    assert "s3cret" not in problem.message


SECRET = "Correct-Horse"


@pytest.mark.parametrize(
    ("dsn", "named"),
    [
        # An unencoded "@" or "/" in a URI's password: libpq reads the
        # rest of the password as the host (or the port and database).
        (f"postgresql://u:p@{SECRET}@127.0.0.1/db", "percent-encoded"),
        (f"postgresql://u:{SECRET}@x@db1:5432/jobs", "percent-encoded"),
        (f"postgresql://u:pa/{SECRET}@db1/jobs", "percent-encoded"),
        (f"postgresql://{SECRET}@corp@db1/jobs", "percent-encoded"),
        (f"host={SECRET}@127.0.0.1 dbname=jobs", "host:"),
        (f"host=db1,{SECRET}@db2 dbname=jobs", "host:"),
        (f"host=db1 sslmode={SECRET}", "sslmode:"),
        (f"host=db1 port={SECRET}", "port:"),
        (f"host=db1 port=0 password={SECRET}", "port:"),
        (f"host=db1 port=65536 password={SECRET}", "port:"),
        (f"host=db1,db2 port=5432,x{SECRET}", "port:"),
        (f"host=db1,db2 port=1,2,3 password={SECRET}", "port:"),
        (f"host=db1 target_session_attrs={SECRET}", "target_session_attrs:"),
        (f"host=db1 load_balance_hosts={SECRET}", "load_balance_hosts:"),
        (f"host=db1 gssencmode={SECRET}", "gssencmode:"),
        (f"host=db1 channel_binding={SECRET}", "channel_binding:"),
        (f"host=db1 sslnegotiation={SECRET}", "sslnegotiation:"),
        (f"host=db1 sslcertmode={SECRET}", "sslcertmode:"),
        (
            f"host=db1 ssl_min_protocol_version={SECRET}",
            "ssl_min_protocol_version:",
        ),
        (f"host=db1 connect_timeout={SECRET}", "connect_timeout:"),
        (f"host=db1 keepalives_idle=-1 password={SECRET}", "keepalives_idle:"),
        (f"host=db1 tcp_user_timeout={SECRET}", "tcp_user_timeout:"),
        (f"host=db1 require_auth={SECRET}", "require_auth:"),
        (
            f"host=db1 require_auth=!md5,scram-sha-256 password={SECRET}",
            "require_auth:",
        ),
        (f"hostaddr={SECRET} dbname=jobs", "hostaddr:"),
        (
            f"host=db1,db2 hostaddr=10.0.0.1 password={SECRET}",
            "hostaddr:",
        ),
        (f"host=db1 replication=database password={SECRET}", "replication:"),
        (
            f"postgresql://u:{SECRET}@db1/jobs?sslmode=bogus",
            "sslmode:",
        ),
        (f"postgresql://u:{SECRET}@db1:notaport/jobs", "port:"),
    ],
)
@pytest.mark.parametrize("key", ["dsn", "listen_dsn"])
def test_a_dsn_that_cannot_connect_is_named_without_echoing_it(
    dsn: str, named: str, key: str
) -> None:
    problems = problems_of({"database": {key: dsn}})

    assert {p.key for p in problems} == {f"database.{key}"}
    assert any(named in p.message for p in problems), problems
    for problem in problems:
        assert SECRET not in problem.message
        assert SECRET.lower() not in problem.message.lower()


@pytest.mark.parametrize(
    "dsn",
    [
        "",
        "host=db1 port=5432 dbname=jobs user=pdoflowd",
        "postgresql://pdoflowd:p%40ss%2Fw%3Ard@db1:5432/jobs",
        "postgresql://u:p:w@db1/jobs",
        "postgresql://u@db1:5432,db2:5433/jobs?target_session_attrs=read-write",
        "postgresql://u@[::1]:5432,db2/jobs?load_balance_hosts=random",
        "host=db1,db2,db3 port=5432",
        "host=db1,db2 port=5432,",
        "host=db1,db2 hostaddr=10.0.0.1,::1 port=5432,5433",
        "host=@pdoflowd-abstract dbname=jobs",
        "postgresql:///jobs?host=@pdoflowd-abstract",
        "host=/var/run/postgresql dbname=jobs",
        "host=db1 password='it\\'s @ secret' sslmode=verify-full",
        "host=db1 sslmode=disable gssencmode=prefer channel_binding=require",
        "host=db1 ssl_min_protocol_version=tlsv1.2 sslsni=1",
        "host=db1 connect_timeout=10 keepalives=1 keepalives_idle=30",
        "host=db1 keepalives_interval=5 keepalives_count=3 "
        "tcp_user_timeout=15000",
        "host=db1 require_auth=scram-sha-256,md5",
        "host=db1 require_auth=!password,!md5",
        "host=db1 replication=false",
        "host=db1 target_session_attrs=prefer-standby",
    ],
)
def test_a_dsn_libpq_can_use_is_accepted(dsn: str) -> None:
    assert parse({"database": {"dsn": dsn}}).database.dsn == dsn


# The metrics listen address.


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:9464", "127.0.0.1", 9464),
        ("0.0.0.0:80", "0.0.0.0", 80),
        ("localhost:0", "localhost", 0),
        ("metrics.example.com:65535", "metrics.example.com", 65535),
        ("[::1]:9464", "::1", 9464),
        ("[::]:9464", "::", 9464),
        ("[fe80::1%eth0]:9464", "fe80::1%eth0", 9464),
    ],
)
def test_listen_address_gives_host_and_port(
    listen: str, host: str, port: int
) -> None:
    metrics = parse({"metrics": {"listen": listen}}).metrics

    assert (metrics.enabled, metrics.host, metrics.port) == (True, host, port)


@pytest.mark.parametrize(
    "listen",
    [
        "9464",
        ":9464",
        "localhost",
        "localhost:",
        "localhost:65536",
        "localhost:-1",
        "localhost:+80",
        "localhost:http",
        "::1:9464",
        "[::1]9464",
        "[::1:9464",
        "[127.0.0.1]:9464",
        "10.1:9464",
        "256.0.0.1:9464",
        "bad_host:9464",
        "-host:9464",
        "host name:9464",
        " localhost:9464",
    ],
)
def test_bad_listen_address_is_rejected(listen: str) -> None:
    assert the_problem({"metrics": {"listen": listen}}).key == "metrics.listen"


def test_empty_listen_address_disables_the_endpoint() -> None:
    metrics = parse({"metrics": {"listen": ""}}).metrics

    assert not metrics.enabled
    with pytest.raises(ValueError, match="disabled"):
        _ = metrics.host
    with pytest.raises(ValueError, match="disabled"):
        _ = metrics.port


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
HOSTNAMES = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
PORTS = st.integers(min_value=0, max_value=65535)


@given(
    address=st.ip_addresses(v=4).map(str)
    | HOSTNAMES.filter(lambda h: not re.fullmatch(r"[0-9.]+", h)),
    port=PORTS,
)
def test_host_and_port_round_trip(address: str, port: int) -> None:
    metrics = parse({"metrics": {"listen": f"{address}:{port}"}}).metrics

    assert (metrics.host, metrics.port) == (address, port)


@given(address=st.ip_addresses(v=6), port=PORTS)
def test_bracketed_ipv6_address_round_trips(
    address: ipaddress.IPv6Address, port: int
) -> None:
    metrics = parse({"metrics": {"listen": f"[{address}]:{port}"}}).metrics

    assert (metrics.host, metrics.port) == (str(address), port)


@given(port=st.integers(min_value=65536) | st.integers(max_value=-1))
def test_port_outside_0_to_65535_is_rejected(port: int) -> None:
    problem = the_problem({"metrics": {"listen": f"localhost:{port}"}})

    assert problem.key == "metrics.listen"


@given(
    listen=st.text()
    | st.from_regex(r"\[?[0-9a-fA-F:.%]*\]?:[0-9+-]{0,7}", fullmatch=True)
)
def test_any_listen_text_is_either_usable_or_reported(listen: str) -> None:
    try:
        metrics = parse({"metrics": {"listen": listen}}).metrics
    except ConfigError as exc:
        assert {p.key for p in exc.problems} == {"metrics.listen"}
    else:
        if metrics.enabled:
            assert 0 <= metrics.port <= 65535
            assert metrics.host


# Reporting.


def test_all_problems_are_reported_together_sorted_by_key() -> None:
    problems = problems_of(
        {
            "workers": {"count": 0, "cuont": 1},
            "daemon": {"log_level": "loud"},
            "database": {"connect_timeout_s": "5"},
            "extra": {},
        }
    )

    assert [p.key for p in problems] == [
        "daemon.log_level",
        "database.connect_timeout_s",
        "extra",
        "workers.count",
        "workers.cuont",
    ]


def test_error_text_is_one_key_and_message_line_per_problem() -> None:
    error = ConfigError(
        [
            ConfigProblem("workers.count", "expected an integer, got string"),
            ConfigProblem("daemon.log_level", "must be one of debug"),
        ]
    )

    assert str(error) == (
        "daemon.log_level: must be one of debug\n"
        "workers.count: expected an integer, got string"
    )


def test_messages_do_not_repeat_the_key() -> None:
    problems = problems_of(
        {"workers": {"count": "x", "batch_size": 0}, "jobs": {"timeout_s": []}}
    )

    for problem in problems:
        assert problem.key not in problem.message
        assert problem.message[0].islower()


# Immutability.


def test_config_is_frozen() -> None:
    config = parse({})

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workers = WorkersConfig(count=8)  # type: ignore[misc]


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_section_is_frozen(section: str) -> None:
    settings = getattr(parse({}), section)
    name = dataclasses.fields(settings)[0].name

    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(settings, name, None)


# Loading files.


def test_load_reads_and_validates_a_file(tmp_path: Path) -> None:
    path = tmp_path / "pdoflowd.toml"
    path.write_text('[workers]\ncount = 3\n\n[daemon]\nlog_level = "debug"\n')

    config = load(path)

    assert config.workers.count == 3
    assert config.daemon.log_level == "debug"
    assert config.source == path


def test_load_of_a_missing_file_is_a_file_problem(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError) as caught:
        load(path)

    (problem,) = caught.value.problems
    assert problem.key == "(file)"
    assert str(path) in problem.message
    assert "no such file" in problem.message


def test_load_of_a_directory_is_a_file_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path)

    assert [p.key for p in caught.value.problems] == ["(file)"]


def test_load_of_invalid_toml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "pdoflowd.toml"
    path.write_text("[workers]\ncount = \n")

    with pytest.raises(ConfigError) as caught:
        load(path)

    (problem,) = caught.value.problems
    assert problem.key == "(toml)"
    assert "line 2" in problem.message


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ('[database]\ndsn = "a"\ndsn = "b"\n', "database.dsn", 3),
        ('[database]\ndsn = "a"\n  "dsn"  = "b"\n', "database.dsn", 3),
        ('database.dsn = "a"\ndatabase.dsn = "b"\n', "database.dsn", 2),
        (
            '[database]\ndsn = "a"\n[workers]\ncount = 1\n[database]\n',
            "database",
            5,
        ),
        (
            '[workers]\ncount = 1\n# a comment\n\ncount = """\n2\n"""\n',
            "workers.count",
            5,
        ),
        (
            '[database]\ndsn = """\n[workers]\ncount = 1\n"""\ndsn = "x"\n',
            "database.dsn",
            6,
        ),
        (
            "[workers]\nprovides = [\n  'a',\n]\nprovides = []\n",
            "workers.provides",
            5,
        ),
        ("[metrics]\nlisten = { a = 1, a = 2 }\n", "metrics.listen.a", 2),
        ("[workers]\ncount = 1\n[workers.count]\n", "workers.count", 3),
    ],
)
def test_load_names_a_key_defined_twice(
    tmp_path: Path, text: str, key: str, line: int
) -> None:
    path = tmp_path / "pdoflowd.toml"
    path.write_text(text)

    with pytest.raises(ConfigError) as caught:
        load(path)

    (problem,) = caught.value.problems
    assert problem.key == key
    assert f"line {line}" in problem.message


def test_a_key_defined_twice_is_named_without_either_value(
    tmp_path: Path,
) -> None:
    path = tmp_path / "pdoflowd.toml"
    path.write_text(
        '[database]\ndsn = "postgresql://u:first-secret@db1/jobs"\n'
        "[workers]\ncount = 2\n"
        '[database]\ndsn = "postgresql://u:second-secret@db1/jobs"\n'
    )

    with pytest.raises(ConfigError) as caught:
        load(path)

    assert "secret" not in str(caught.value)
    assert [p.key for p in caught.value.problems] == ["database"]


def test_load_of_a_file_that_is_not_utf8_is_a_toml_problem(
    tmp_path: Path,
) -> None:
    path = tmp_path / "pdoflowd.toml"
    path.write_bytes(b'[daemon]\nlog_level = "\xff"\n')

    with pytest.raises(ConfigError) as caught:
        load(path)

    assert [p.key for p in caught.value.problems] == ["(toml)"]


def test_load_reports_every_problem_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "pdoflowd.toml"
    path.write_text("[workers]\ncount = 0\nbatch_size = 0\n")

    with pytest.raises(ConfigError) as caught:
        load(path)

    assert [p.key for p in caught.value.problems] == [
        "workers.batch_size",
        "workers.count",
    ]


# The shipped file and the reference cannot drift from the schema.


def test_shipped_config_loads_and_equals_the_defaults() -> None:
    # The shipped file documents the defaults; it differs in nothing.
    assert load(SHIPPED_CONFIG) == Config(source=SHIPPED_CONFIG)


def test_shipped_config_sets_every_key_and_no_other() -> None:
    document = tomllib.loads(SHIPPED_CONFIG.read_text(encoding="utf-8"))

    keys = {
        f"{section}.{key}"
        for section, table in document.items()
        for key in table
    }
    assert keys == all_keys()


def test_shipped_config_comments_every_key() -> None:
    lines = SHIPPED_CONFIG.read_text(encoding="utf-8").splitlines()

    for number, line in enumerate(lines):
        if re.match(r"[a-z_]+ =", line):
            previous = lines[number - 1]
            assert previous.startswith("#") or re.match(r"[a-z_]+ =", previous)


def reference_entries() -> dict[str, object]:
    """Each documented key with its documented default, decoded as TOML."""
    entries: dict[str, object] = {}
    key = None
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        heading = re.fullmatch(r"### `([a-z_]+\.[a-z_]+)`", line)
        if heading:
            key = heading.group(1)
            entries[key] = None
        elif line.startswith("#"):
            key = None  # another heading ([[schedules]]' keys, say)
        default = re.match(r"- \*\*Default:\*\* `([^`]*)`", line)
        if default and key is not None:
            entries[key] = tomllib.loads(f"v = {default.group(1)}")["v"]
    return entries


def test_reference_documents_every_key_and_no_other() -> None:
    assert set(reference_entries()) == all_keys()


def test_reference_states_every_default_correctly() -> None:
    entries = reference_entries()

    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            documented = entries[f"{section}.{f.name}"]
            default = (
                f.default_factory()
                if f.default is dataclasses.MISSING
                and f.default_factory is not dataclasses.MISSING
                else f.default
            )
            expected = as_toml_value(default)
            assert documented == expected, f"{section}.{f.name}"
            assert type(documented) is type(expected), f"{section}.{f.name}"


def test_reference_states_the_exit_status() -> None:
    assert "**78**" in REFERENCE.read_text(encoding="utf-8")


# The password.


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "db-pass"
    path.write_text("from-file\n")
    return path


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    directory = tmp_path / "credentials"
    directory.mkdir()
    (directory / "db-password").write_text("from-credential\n")
    return directory


def test_no_password_source_gives_none() -> None:
    assert resolve_password(DatabaseConfig(), {}) is None


def test_password_file_is_read(password_file: Path) -> None:
    database = DatabaseConfig(password_file=password_file)

    assert resolve_password(database, {}) == "from-file"


def test_systemd_credential_beats_password_file(
    password_file: Path, credentials: Path
) -> None:
    database = DatabaseConfig(password_file=password_file)
    environ = {"CREDENTIALS_DIRECTORY": str(credentials)}

    assert resolve_password(database, environ) == "from-credential"


def test_systemd_credential_is_used_without_password_file(
    credentials: Path,
) -> None:
    environ = {"CREDENTIALS_DIRECTORY": str(credentials)}

    assert resolve_password(DatabaseConfig(), environ) == "from-credential"


def test_credentials_directory_without_the_credential_falls_back(
    password_file: Path, tmp_path: Path
) -> None:
    database = DatabaseConfig(password_file=password_file)
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path / "empty")}

    assert resolve_password(database, environ) == "from-file"


@pytest.mark.parametrize(
    ("content", "password"),
    [
        (b"s3cret\n", "s3cret"),
        (b"s3cret\r\n", "s3cret"),
        (b"s3cret", "s3cret"),
        (b" s3 cret \n", " s3 cret "),
        (b"s3cret\nsecond line\n", "s3cret"),
    ],
)
def test_only_the_first_line_without_its_ending_is_the_password(
    tmp_path: Path, content: bytes, password: str
) -> None:
    path = tmp_path / "db-pass"
    path.write_bytes(content)

    assert resolve_password(DatabaseConfig(password_file=path), {}) == password


def test_missing_password_file_names_the_key(tmp_path: Path) -> None:
    database = DatabaseConfig(password_file=tmp_path / "absent")

    with pytest.raises(ConfigError) as caught:
        resolve_password(database, {})

    assert [p.key for p in caught.value.problems] == ["database.password_file"]


def test_unreadable_password_file_names_the_key_not_the_password(
    password_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Refused as if by permissions, which root would bypass.
    def refuse(path: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    database = DatabaseConfig(password_file=password_file)

    with pytest.raises(ConfigError) as caught:
        resolve_password(database, {})

    assert caught.value.problems == (
        ConfigProblem(
            "database.password_file",
            f"cannot read {password_file}: permission denied",
        ),
    )
    assert "from-file" not in str(caught.value)


def test_password_file_that_is_a_directory_names_the_key(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_password(DatabaseConfig(password_file=tmp_path), {})

    assert [p.key for p in caught.value.problems] == ["database.password_file"]


def test_undecodable_password_file_does_not_echo_the_password(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db-pass"
    path.write_bytes(b"s3cret\xff\n")

    with pytest.raises(ConfigError) as caught:
        resolve_password(DatabaseConfig(password_file=path), {})

    assert [p.key for p in caught.value.problems] == ["database.password_file"]
    assert "s3cret" not in str(caught.value)
    assert "xff" not in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_empty_password_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "db-pass"
    path.write_text("\nsecond\n")

    with pytest.raises(ConfigError) as caught:
        resolve_password(DatabaseConfig(password_file=path), {})

    assert [p.key for p in caught.value.problems] == ["database.password_file"]


def test_unreadable_credential_is_reported(tmp_path: Path) -> None:
    (tmp_path / "db-password").mkdir()
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}

    with pytest.raises(ConfigError) as caught:
        resolve_password(DatabaseConfig(), environ)

    assert [p.key for p in caught.value.problems] == ["(credentials)"]


# Connection arguments.


def test_connection_kwargs_without_password() -> None:
    kwargs = connection_kwargs(
        DatabaseConfig(dsn="host=db1", tcp_user_timeout_s=0), None
    )

    assert kwargs == {
        "conninfo": "host=db1",
        "connect_timeout": 5,
        "fallback_application_name": "pdoflowd",
    }


def test_every_connection_gives_up_on_a_path_that_drops_packets() -> None:
    kwargs = connection_kwargs(DatabaseConfig(tcp_user_timeout_s=15), None)

    assert kwargs["tcp_user_timeout"] == 15000
    assert kwargs["keepalives"] == 1
    idle, interval, count = (
        kwargs["keepalives_idle"],
        kwargs["keepalives_interval"],
        kwargs["keepalives_count"],
    )
    # A silent peer is noticed in about the TCP user timeout.
    assert isinstance(idle, int) and isinstance(interval, int)
    assert isinstance(count, int)
    assert idle + interval * count <= 15


def test_network_deadlines_in_the_dsn_are_kept() -> None:
    database = DatabaseConfig(dsn="host=db1 keepalives_idle=60")

    kwargs = connection_kwargs(database, None)

    assert "keepalives_idle" not in kwargs
    assert kwargs["tcp_user_timeout"] == 15000


def test_connection_kwargs_with_password() -> None:
    kwargs = connection_kwargs(DatabaseConfig(), "s3cret")

    assert kwargs["password"] == "s3cret"


def test_prepared_statements_off_sets_no_prepare_threshold() -> None:
    database = DatabaseConfig(prepared_statements=False)

    kwargs = connection_kwargs(database, None)

    assert "prepare_threshold" in kwargs
    assert kwargs["prepare_threshold"] is None


def test_prepared_statements_on_leaves_psycopg_default() -> None:
    assert "prepare_threshold" not in connection_kwargs(DatabaseConfig(), None)


def test_listen_connection_uses_listen_dsn() -> None:
    database = DatabaseConfig(dsn="host=pgbouncer", listen_dsn="host=db1")

    assert connection_kwargs(database, None, listen=True)["conninfo"] == (
        "host=db1"
    )
    assert connection_kwargs(database, None)["conninfo"] == "host=pgbouncer"


def test_listen_connection_falls_back_to_dsn() -> None:
    database = DatabaseConfig(dsn="host=db1")

    kwargs = connection_kwargs(database, None, listen=True)

    assert kwargs["conninfo"] == "host=db1"


def test_listen_connection_keeps_prepared_statements() -> None:
    database = DatabaseConfig(prepared_statements=False)

    kwargs = connection_kwargs(database, None, listen=True)

    assert "prepare_threshold" not in kwargs


@pytest.mark.parametrize(
    ("timeout_s", "seconds"), [(0.2, 1), (1.0, 1), (2.1, 3), (300.0, 300)]
)
def test_connect_timeout_is_rounded_up_to_whole_seconds(
    timeout_s: float, seconds: int
) -> None:
    database = DatabaseConfig(connect_timeout_s=timeout_s)

    assert connection_kwargs(database, None)["connect_timeout"] == seconds


def test_connection_kwargs_make_a_valid_conninfo() -> None:
    database = DatabaseConfig(dsn="postgresql://pdoflowd@db1/jobs")
    kwargs = connection_kwargs(database, "s3cret")
    parameters = {
        k: v
        for k, v in kwargs.items()
        if k not in ("conninfo", "prepare_threshold")
    }

    conninfo = conninfo_to_dict(
        make_conninfo(str(kwargs["conninfo"]), **parameters)
    )

    assert conninfo["fallback_application_name"] == "pdoflowd"
    assert conninfo["password"] == "s3cret"
    assert conninfo["host"] == "db1"


# Resource limits (jobs.limits).


def test_resource_limits_are_read_as_a_table_of_counts() -> None:
    config = parse({"jobs": {"limits": {"tape": 2, "licence_server": 8}}})

    assert config.jobs.limits == {"tape": 2, "licence_server": 8}


def test_no_resource_limits_by_default() -> None:
    assert parse({}).jobs.limits == {}


def test_each_wrong_resource_limit_is_named_by_its_resource() -> None:
    problems = problems_of(
        {"jobs": {"limits": {"tape": 0, "disk": "two", "gpu": True, " ": 1}}}
    )

    assert {p.key: p.message for p in problems} == {
        "jobs.limits.tape": "must be between 1 and 2147483647, got 0",
        "jobs.limits.disk": "expected an integer, got string",
        "jobs.limits.gpu": "expected an integer, got boolean",
        "jobs.limits. ": "a resource name must not be empty",
    }


def test_resource_limits_must_be_a_table() -> None:
    [problem] = problems_of({"jobs": {"limits": ["tape"]}})

    assert problem.key == "jobs.limits"
    assert problem.message == "expected a table, got array"
