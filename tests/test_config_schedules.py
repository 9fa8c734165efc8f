"""The [[schedules]] tables of the configuration: checked at load, every
problem under its dotted key (schedules[N].key), check-config's exit 78
and --show-schedules."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pdoflowd.config import (
    ConfigError,
    ConfigProblem,
    ScheduleConfig,
    load,
    parse,
)
from pdoflowd.daemon.command import schedule_lines

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "configuration.md"
SHIPPED_CONFIG = ROOT / "etc" / "pdoflowd" / "pdoflowd.toml"


def schedule(**keys: Any) -> dict[str, Any]:
    table = {"name": "nightly", "entry_point": "app.jobs.nightly"}
    table.update(keys)
    return table


def problems_of(*tables: Any) -> tuple[ConfigProblem, ...]:
    with pytest.raises(ConfigError) as caught:
        parse({"schedules": list(tables)})
    return caught.value.problems


def the_problem(*tables: Any) -> ConfigProblem:
    problems = problems_of(*tables)
    assert len(problems) == 1, problems
    return problems[0]


def test_a_schedule_with_every_key() -> None:
    config = parse(
        {
            "schedules": [
                schedule(
                    cron="30 2 * * 1-5",
                    timezone="Europe/Paris",
                    args=[1, "two", [3.5, None], {"four": True}],
                    kwargs={"depth": {"a": [1]}},
                    priority=-5,
                    backfill=3,
                    key="{schedule}:{run_at:%Y-%m-%d}",
                ),
                schedule(name="often", every_s=60),
            ]
        }
    )
    nightly, often = config.schedules
    assert nightly.args == (1, "two", [3.5, None], {"four": True})
    assert nightly.kwargs == {"depth": {"a": [1]}}
    assert (nightly.priority, nightly.backfill) == (-5, 3)
    assert nightly.key_template == "{schedule}:{run_at:%Y-%m-%d}"
    assert often == ScheduleConfig(
        name="often", entry_point="app.jobs.nightly", every_s=60
    )
    assert often.key_template == "schedule:{schedule}:{run_at}"
    assert often.timezone == "UTC" and often.backfill == 0


def test_no_schedules_is_the_default() -> None:
    assert parse({}).schedules == ()
    assert parse({"schedules": []}).schedules == ()


@pytest.mark.parametrize(
    ("keys", "key", "says"),
    [
        ({"cron": "61 * * * *"}, "schedules[0].cron", "not a valid cron"),
        ({"cron": "* * * *"}, "schedules[0].cron", "expected five fields"),
        ({"cron": "@reboot"}, "schedules[0].cron", "unknown alias"),
        ({"cron": "0 0 30 2 *"}, "schedules[0].cron", "not a valid cron"),
        ({"cron": 5}, "schedules[0].cron", "expected a string"),
        (
            {"cron": "@daily", "timezone": "Mars/Olympus"},
            "schedules[0].timezone",
            "not an IANA time zone",
        ),
        (
            {"cron": "@daily", "key": "{when}"},
            "schedules[0].key",
            "unknown field {when}",
        ),
        (
            {"cron": "@daily", "key": "{run_at:%Y"},
            "schedules[0].key",
            "not a valid template",
        ),
        ({"every_s": 0}, "schedules[0].every_s", "must be between 1 and"),
        ({"every_s": 1.5}, "schedules[0].every_s", "expected an integer"),
        (
            {"every_s": 5, "backfill": -1},
            "schedules[0].backfill",
            "between 0 and 1000",
        ),
        (
            {"every_s": 5, "priority": 2**31},
            "schedules[0].priority",
            "between -2147483648 and 2147483647",
        ),
        ({"every_s": 5, "args": "x"}, "schedules[0].args", "expected an array"),
        (
            {
                "every_s": 5,
                "args": [{"when": __import__("datetime").date(2024, 1, 1)}],
            },
            "schedules[0].args",
            "a TOML date is not a JSON value",
        ),
        (
            {"every_s": 5, "kwargs": [1]},
            "schedules[0].kwargs",
            "expected a table",
        ),
        (
            {"every_s": 5, "kwargs": {"not a name": 1}},
            "schedules[0].kwargs",
            "'not a name' is not a keyword name",
        ),
        (
            {"every_s": 5, "entry_point": "no dots"},
            "schedules[0].entry_point",
            "is not a module and function",
        ),
        ({"every_s": 5, "name": "bad name"}, "schedules[0].name", "is not a"),
        ({"every_s": 5, "colour": "red"}, "schedules[0].colour", "unknown key"),
        ({"every_s": 5, "cron": "@daily"}, "schedules[0]", "not both"),
        ({}, "schedules[0]", "cron or every_s"),
    ],
)
def test_a_bad_schedule_is_named_by_its_dotted_key(
    keys: dict[str, Any], key: str, says: str
) -> None:
    problem = the_problem(schedule(**keys))
    assert problem.key == key
    assert says in problem.message


def test_name_and_entry_point_are_required() -> None:
    problems = problems_of({"every_s": 5})
    assert [p.key for p in problems] == [
        "schedules[0].entry_point",
        "schedules[0].name",
    ]


def test_names_are_unique() -> None:
    problem = the_problem(
        schedule(every_s=5),
        schedule(cron="@daily"),
        schedule(name="x", every_s=1),
    )
    assert problem.key == "schedules[1].name"
    assert "schedules[0] too" in problem.message


def test_a_later_schedule_is_named_by_its_index() -> None:
    problems = problems_of(
        schedule(name="a", every_s=5),
        schedule(name="b", every_s=5),
        schedule(name="c", cron="0 25 * * *"),
    )
    assert [p.key for p in problems] == ["schedules[2].cron"]


def test_schedules_must_be_an_array_of_tables() -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"schedules": {"name": "x"}})
    (problem,) = caught.value.problems
    assert problem == ConfigProblem(
        "schedules", "expected an array of tables ([[schedules]]), got table"
    )


def test_a_misspelt_array_section_is_suggested() -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"schedule": [{"name": "x"}]})
    (problem,) = caught.value.problems
    assert problem.key == "schedule"
    assert "did you mean 'schedules'" in problem.message


def write(path: Path, text: str) -> Path:
    path.write_text('[metrics]\nlisten = ""\n' + text)
    return path


def check_config(path: Path, *more: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pdoflowd",
            "check-config",
            "--config",
            str(path),
            *more,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def test_check_config_names_bad_schedules_and_exits_78(tmp_path: Path) -> None:
    path = write(
        tmp_path / "bad.toml",
        """
[[schedules]]
name = "nightly"
entry_point = "app.jobs.nightly"
cron = "0 3 * * *"

[[schedules]]
name = "broken"
entry_point = "app.jobs.broken"
cron = "0 3 * * * *"
timezone = "Europe/Atlantis"
key = "{schedule}-{hour}"
""",
    )
    result = check_config(path)
    assert result.returncode == 78
    lines = result.stderr.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "schedules[1].cron",
        "schedules[1].key",
        "schedules[1].timezone",
    ]


def test_check_config_shows_the_next_three_fire_times(tmp_path: Path) -> None:
    path = write(
        tmp_path / "ok.toml",
        """
[[schedules]]
name = "nightly"
entry_point = "app.jobs.nightly"
cron = "@daily"
timezone = "Asia/Tokyo"

[[schedules]]
name = "often"
entry_point = "app.jobs:often"
every_s = 3600
""",
    )
    result = check_config(path, "--show-schedules")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}: valid"
    assert lines[1] == (
        "schedule nightly: app.jobs.nightly, @daily (Asia/Tokyo), backfill 0"
    )
    assert all(
        re.fullmatch(r"  next: \S+T00:00:00\+09:00", x) for x in lines[2:5]
    )
    assert (
        lines[5] == "schedule often: app.jobs:often, every 3600 s, backfill 0"
    )
    assert all(re.fullmatch(r"  next: \S+:00:00\+00:00", x) for x in lines[6:9])
    assert len(lines) == 9


def test_schedule_lines_start_after_now() -> None:
    import datetime as dt

    config = parse({"schedules": [schedule(cron="0 3 * * *")]})
    now = dt.datetime(2024, 1, 1, 3, 0, tzinfo=dt.timezone.utc)
    assert schedule_lines(config, now) == [
        "schedule nightly: app.jobs.nightly, 0 3 * * * (UTC), backfill 0",
        "  next: 2024-01-02T03:00:00+00:00",
        "  next: 2024-01-03T03:00:00+00:00",
        "  next: 2024-01-04T03:00:00+00:00",
    ]
    assert schedule_lines(parse({}), now) == ["no schedules"]


# ---------------------------------------------------------------- the docs


def test_reference_documents_every_schedule_key_and_its_default() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    documented: dict[str, str | None] = {}
    key = None
    for line in text.splitlines():
        heading = re.fullmatch(r"### `schedules\[N\]\.([a-z_]+)`", line)
        if heading:
            key = heading.group(1)
            documented[key] = None
        default = re.match(r"- \*\*Default:\*\* `([^`]*)`", line)
        if default and key is not None and key in documented:
            documented[key] = default.group(1)
            key = None
    fields = {f.name: f for f in dataclasses.fields(ScheduleConfig)}
    assert set(documented) == set(fields)
    assert documented["name"] is None and documented["entry_point"] is None
    assert documented["timezone"] == '"UTC"'
    assert documented["backfill"] == "0"
    assert documented["priority"] == "0"


def test_shipped_config_has_a_commented_schedule_that_loads(
    tmp_path: Path,
) -> None:
    lines = SHIPPED_CONFIG.read_text(encoding="utf-8").splitlines()
    start = lines.index("#[[schedules]]")
    example = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        if re.match(r"#(\[\[schedules\]\]|[a-z_]+ = )", line):
            example.append(line[1:])
    path = tmp_path / "example.toml"
    path.write_text("\n".join(example) + "\n")
    (loaded,) = load(path).schedules
    assert loaded.cron and loaded.name
