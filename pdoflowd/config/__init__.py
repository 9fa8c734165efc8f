"""pdoflowd's configuration: one TOML file, validated into frozen dataclasses.

This package owns the schema (every section, key, type, default and range),
the single parse of the file, the database password lookup and the arguments
for psycopg.connect. It reports every problem at once, each under its dotted
key, by raising ConfigError; callers exit with EXIT_CONFIG (78). It must not
connect, log or exit, and no other module may read TOML or the environment.
It imports nothing of pdoflowd's client, command line, daemon or database
code.

This module only gathers the public names of its parts; it must hold no
code of its own:

- :mod:`~pdoflowd.config.schema`: the sections, their keys and rules;
- :mod:`~pdoflowd.config.loading`: reading and validating the file;
- :mod:`~pdoflowd.config.dsn`: what libpq would refuse in a connection
  string, told without its values;
- :mod:`~pdoflowd.config.connecting`: the password and psycopg.connect's
  arguments;
- :mod:`~pdoflowd.config.problems`: ConfigProblem and ConfigError.
"""

from pdoflowd.config.connecting import (
    APPLICATION_NAME,
    CREDENTIAL_NAME,
    connection_kwargs,
    resolve_password,
)
from pdoflowd.config.dsn import dsn_problems
from pdoflowd.config.loading import DEFAULT_CONFIG_PATH, load, parse
from pdoflowd.config.problems import ConfigError, ConfigProblem
from pdoflowd.config.schema import (
    LOG_LEVELS,
    Config,
    DaemonConfig,
    DatabaseConfig,
    JobsConfig,
    MetricsConfig,
    RetentionConfig,
    ScheduleConfig,
    WebConfig,
    WorkersConfig,
)

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
    "RetentionConfig",
    "ScheduleConfig",
    "WebConfig",
    "WorkersConfig",
    "connection_kwargs",
    "dsn_problems",
    "load",
    "parse",
    "resolve_password",
]
