"""Reading the configuration: the TOML file, validated into a
:class:`~pdoflowd.config.schema.Config`.

Owns the single parse of the file (:func:`load`), the conversion and
checking of a decoded document against the schema (:func:`parse`: types,
ranges, unknown sections and keys with a suggestion, rules between keys),
and finding which key a file defines twice, which tomllib does not say.
Every problem is reported at once, each under its dotted key, by raising
:class:`~pdoflowd.config.problems.ConfigError`. It must not connect, log
or exit, nor quote a value that may hold a password.
"""

import difflib
import ipaddress
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import fields
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

from pdoflowd.arguments import ValueNotStorable, encode_value
from pdoflowd.config.problems import (
    ConfigError,
    ConfigProblem,
    number_text,
    reason,
)
from pdoflowd.config.schema import SECTIONS, Config, Rule, ScheduleConfig

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = ["DEFAULT_CONFIG_PATH", "load", "parse"]

DEFAULT_CONFIG_PATH = Path("/etc/pdoflowd/pdoflowd.toml")


class _Invalid(Exception):
    """A value cannot be converted; carries the messages for its key, and
    for keys inside it (a table's), as (key inside, message)."""

    def __init__(
        self, *messages: str, inside: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(*messages)
        self.messages = messages
        self.inside = inside


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


def _json_problems(value: object, path: str) -> list[str]:
    """Why a TOML value is not JSON-compatible (its dates are not)."""

    def walk(item: object, where: str) -> Iterator[str]:
        if isinstance(item, (datetime, date, time)):
            yield f"{where}: a TOML {_toml_type(item)} is not a JSON value"
        elif isinstance(item, Mapping):
            for key, inner in item.items():
                yield from walk(inner, f"{where}[{key!r}]")
        elif isinstance(item, (list, tuple)):
            for index, inner in enumerate(item):
                yield from walk(inner, f"{where}[{index}]")

    wrong = list(walk(value, path))
    if wrong:
        return wrong
    try:
        encode_value(value, path)
    except ValueNotStorable as exc:
        return [f"{exc.path}: {exc.problem}"]
    return []


def _to_json_array(value: object) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise _Invalid(f"expected an array, got {_toml_type(value)}")
    wrong = _json_problems(list(value), "args")
    if wrong:
        raise _Invalid(*wrong)
    return tuple(value)


def _to_json_table(value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _Invalid(f"expected a table, got {_toml_type(value)}")
    wrong = [
        f"{key!r} is not a keyword name"
        for key in value
        if not (isinstance(key, str) and key.isidentifier())
    ]
    wrong += _json_problems(dict(value), "kwargs")
    if wrong:
        raise _Invalid(*wrong)
    return dict(value)


# The most a limit can be: what a PostgreSQL integer holds.
_MAX_LIMIT = 2147483647


def _to_limits(value: object) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise _Invalid(f"expected a table, got {_toml_type(value)}")
    inside: list[tuple[str, str]] = []
    for name, limit in value.items():
        if not name.strip():
            inside.append((name, "a resource name must not be empty"))
        if isinstance(limit, bool) or not isinstance(limit, int):
            got = _toml_type(limit)
            inside.append((name, f"expected an integer, got {got}"))
        elif not 1 <= limit <= _MAX_LIMIT:
            inside.append(
                (name, f"must be between 1 and {_MAX_LIMIT}, got {limit}")
            )
    if inside:
        raise _Invalid(inside=inside)
    return dict(value)


_CONVERTERS: Mapping[object, Callable[[object], object]] = {
    int: _to_int,
    float: _to_float,
    str: _to_str,
    bool: _to_bool,
    tuple[str, ...]: _to_strings,
    Path | None: _to_optional_path,
    tuple[Any, ...]: _to_json_array,
    Mapping[str, Any]: _to_json_table,
    Mapping[str, int]: _to_limits,
}

# The sections that are arrays of tables ([[name]]), each table an instance
# of the class; their keys are written name[index].key, index from 0.
ARRAY_SECTIONS: Mapping[str, type[Any]] = {"schedules": ScheduleConfig}


def _suggestion(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _section_hint(key: str) -> str:
    for name, cls in SECTIONS.items():
        if key in {f.name for f in fields(cls)}:
            return f"did you mean {name}.{key}?"
    if key in {f.name for f in fields(ScheduleConfig)}:
        return "did you mean it in a [[schedules]] table?"
    return "settings belong in a section, e.g. [workers]"


def _parse_schedules(
    raw: object,
) -> tuple[tuple[ScheduleConfig, ...], list[ConfigProblem]]:
    """The [[schedules]] tables; problems under schedules[index].key."""
    if not isinstance(raw, list):
        got = _toml_type(raw)
        message = f"expected an array of tables ([[schedules]]), got {got}"
        return (), [ConfigProblem("schedules", message)]
    found: list[ScheduleConfig] = []
    problems: list[ConfigProblem] = []
    names: dict[str, int] = {}
    for index, table in enumerate(raw):
        where = f"schedules[{index}]"
        if not isinstance(table, Mapping):
            message = f"expected a table, got {_toml_type(table)}"
            problems.append(ConfigProblem(where, message))
            continue
        schedule, wrong = _parse_section(where, ScheduleConfig, table)
        problems.extend(wrong)
        rejected = {p.key for p in wrong}
        for key in ("name", "entry_point"):
            if key not in table:
                problems.append(
                    ConfigProblem(f"{where}.{key}", "missing; it is required")
                )
        has_cron = "cron" in table and bool(table["cron"])
        has_every = "every_s" in table
        if has_cron == has_every:
            message = (
                "give cron or every_s, not both"
                if has_cron
                else "give when it fires: cron or every_s"
            )
            problems.append(ConfigProblem(where, message))
        if f"{where}.name" not in rejected and schedule.name:
            first = names.setdefault(schedule.name, index)
            if first != index:
                problems.append(
                    ConfigProblem(
                        f"{where}.name",
                        f"{schedule.name!r} is the name of"
                        f" schedules[{first}] too; names must be unique",
                    )
                )
        found.append(schedule)
    return tuple(found), problems


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
            problems.extend(
                ConfigProblem(f"{dotted}.{inner}", m) for inner, m in exc.inside
            )
            continue
        rule: Rule = spec.metadata.get("rule", Rule())
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
        beat = number_text(daemon.heartbeat_interval_s)
        yield ConfigProblem(
            "daemon.host_lease_s",
            f"must be more than twice daemon.heartbeat_interval_s ({beat}),"
            f" got {number_text(daemon.host_lease_s)}",
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
    yield from _web_problems(config, accepted)
    retention = config.retention
    if (
        accepted(
            "retention.enabled",
            "retention.finished_after_s",
            "retention.errored_after_s",
        )
        and retention.enabled
        and not retention.finished_after_s
        and not retention.errored_after_s
    ):
        yield ConfigProblem(
            "retention.enabled",
            "true, but retention.finished_after_s and"
            " retention.errored_after_s are both 0: nothing would be pruned",
        )
    if (
        accepted("jobs.retry_delay_max_s", "jobs.retry_delay_s")
        and jobs.retry_delay_max_s < jobs.retry_delay_s
    ):
        base = number_text(jobs.retry_delay_s)
        yield ConfigProblem(
            "jobs.retry_delay_max_s",
            f"must be at least jobs.retry_delay_s ({base}),"
            f" got {number_text(jobs.retry_delay_max_s)}",
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _web_problems(
    config: Config, accepted: Callable[..., bool]
) -> Iterator[ConfigProblem]:
    web = config.web
    if web.tls_cert_file is None:
        for name in ("tls_key_file", "tls_client_ca_file"):
            if getattr(web, name) is not None:
                yield ConfigProblem(f"web.{name}", "needs web.tls_cert_file")
    if (
        accepted("web.listen", "web.tls_cert_file", "web.insecure_listen")
        and web.tls_cert_file is None
        and not web.insecure_listen
        and not _is_loopback(web.host)
    ):
        yield ConfigProblem(
            "web.listen",
            f"{web.listen!r} is beyond loopback: set web.tls_cert_file"
            " (and web.tls_key_file), or web.insecure_listen = true",
        )
    if (
        accepted("web.listen")
        and web.users_file is None
        and web.tls_client_ca_file is None
        and not _is_loopback(web.host)
    ):
        yield ConfigProblem(
            "web.users_file",
            "needed beyond loopback (or web.tls_client_ca_file): only on"
            " loopback may the console be read without logging in",
        )


def parse(data: Mapping[str, object], source: Path | None = None) -> Config:
    """Validate a decoded TOML document; ConfigError lists every problem."""
    problems: list[ConfigProblem] = []
    sections: dict[str, Any] = {}
    for name, raw in data.items():
        if name in SECTIONS or name in ARRAY_SECTIONS:
            continue
        if isinstance(raw, Mapping) or (
            isinstance(raw, list) and raw and isinstance(raw[0], Mapping)
        ):
            known = [*SECTIONS, *ARRAY_SECTIONS]
            message = "unknown section" + _suggestion(name, known)
        else:
            message = "unknown key; " + _section_hint(name)
        problems.append(ConfigProblem(name, message))
    for name, cls in SECTIONS.items():
        raw = data.get(name, {})
        if not isinstance(raw, Mapping):
            got = _toml_type(raw)
            problems.append(ConfigProblem(name, f"expected a table, got {got}"))
            sections[name] = cls()
            continue
        sections[name], wrong = _parse_section(name, cls, raw)
        problems.extend(wrong)
    schedules: tuple[ScheduleConfig, ...] = ()
    if "schedules" in data:
        schedules, wrong = _parse_schedules(data["schedules"])
        problems.extend(wrong)
    config = Config(**sections, schedules=schedules, source=source)
    problems.extend(_cross_problems(config, {p.key for p in problems}))
    if problems:
        raise ConfigError(problems)
    return config


def load(path: Path) -> Config:
    """Read and validate the configuration file at path."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        problem = ConfigProblem("(file)", f"cannot read {path}: {reason(exc)}")
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
