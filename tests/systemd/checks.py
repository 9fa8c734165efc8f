"""The pdoflowd package under a real systemd: the checks inside the container.

nspawn.py boots a systemd-nspawn container whose only job is the oneshot
unit pdoflowd-systest.service, which runs this file with Debian's python3.
Each scenario drives the service through systemctl, journalctl, apt-get and
signals, the way an operator would, and one JSON line per scenario goes to
/out/results.jsonl. The scenarios build on each other, in order: install,
start, run jobs, the web console, reload, kill, stop, restart, upgrade,
purge. A failed one
is reported with the unit's journal, and the next still run.

Only the standard library is imported at the top, so the host can read the
scenario names without psycopg or an installed pdoflowd.
"""

from __future__ import annotations

import itertools
import json
import os
import pwd
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

OUT = Path("/out")
HERE = Path(__file__).resolve().parent
UNIT = "pdoflowd.service"
CONFIG = Path("/etc/pdoflowd/pdoflowd.toml")
CREDENTIAL = Path("/etc/credstore/pdoflowd.db-password")
DROP_IN_DIR = Path("/etc/systemd/system/pdoflowd.service.d")
MAX_EXPOSURE = 2.0
WEB_UNIT = "pdoflowd-web.service"
WEB_USERS = Path("/etc/pdoflowd/web-users")
WEB_CREDENTIAL = Path("/etc/credstore/pdoflowd-web.db-password")

Scenario = Callable[[dict[str, Any]], str]
SCENARIOS: list[tuple[str, Scenario]] = []


def scenario(function: Scenario) -> Scenario:
    SCENARIOS.append((function.__name__, function))
    return function


class CheckFailed(AssertionError):
    """What a scenario expected and what it saw instead."""


def check(condition: object, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# ------------------------------------------------------------ helpers


def run(
    *argv: str, check_rc: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    if check_rc and done.returncode != 0:
        raise CheckFailed(
            f"{' '.join(argv)} exited {done.returncode}:\n"
            f"{done.stdout}\n{done.stderr}"
        )
    return done


def show(*properties: str, unit: str = UNIT) -> dict[str, str]:
    out = run(
        "systemctl", "show", unit, *(f"--property={p}" for p in properties)
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def state() -> dict[str, str]:
    return show(
        "ActiveState",
        "SubState",
        "MainPID",
        "NRestarts",
        "StatusText",
        "ExecMainStatus",
        "Result",
    )


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise CheckFailed(f"{what}: not within {timeout} s ({state()})")
        time.sleep(0.1)


def main_pid() -> int:
    return int(show("MainPID")["MainPID"])


def children(pid: int, *, session: bool = False) -> list[int]:
    """The workers of the main process ``pid`` (with ``session``, its
    database session, pdoflowd-db, too)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        alive_child = int(fields[1]) == pid and fields[0] != "Z"
        if alive_child and (session or name != "pdoflowd-db"):
            found.append(int(entry.name))
    return sorted(found)


def running(count: int) -> Callable[[], list[int] | None]:
    """A probe: the active service's workers once there are ``count``."""

    def probe() -> list[int] | None:
        if state()["ActiveState"] != "active":
            return None
        workers = children(main_pid())
        return workers if len(workers) == count else None

    return probe


def settled(count: int) -> list[int]:
    """The workers, once ``count`` of them have stayed the same for 1 s.

    After a reload the supervisor replaces its workers one by one; this
    waits until that is over.
    """
    previous: list[int] = []
    stable_since = time.monotonic()

    def probe() -> list[int] | None:
        nonlocal previous, stable_since
        workers = running(count)() or []
        if workers != previous:
            previous, stable_since = workers, time.monotonic()
            return None
        return (
            workers
            if workers and time.monotonic() - stable_since >= 1
            else None
        )

    return list(wait_for(f"{count} settled workers", probe))


def replaced(old: list[int], count: int) -> list[int]:
    """The workers, once a reload has replaced every one of ``old``."""
    return list(
        wait_for(
            f"{count} workers, none of {old}",
            lambda: not set(old) & set(w := running(count)() or old) and w,
        )
    )


def journal(*args: str) -> str:
    return run("journalctl", "--no-pager", "-u", UNIT, *args).stdout


def journal_entries() -> list[dict[str, Any]]:
    out = journal("-o", "json")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def config_text(params: dict[str, Any], **overrides: dict[str, Any]) -> str:
    sections: dict[str, dict[str, Any]] = {
        "database": {"dsn": params["dsn"]},
        "workers": {"count": 2, "poll_interval_s": 0.2, "drain_timeout_s": 15},
        "jobs": {"allowed_modules": ["systest_jobs"]},
        # The container shares the host's network: a port found free there.
        "metrics": {"listen": f"127.0.0.1:{params['metrics_port']}"},
        "daemon": {
            "heartbeat_interval_s": 1.0,
            "host_lease_s": 5.0,
            "maintenance_interval_s": 0.5,
        },
    }
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    return "\n".join(
        f"[{name}]\n"
        + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
        for name, values in sections.items()
    )


def dsn_for(params: dict[str, Any], database: str) -> str:
    return (
        f"host={params['host']} port={params['port']} user={params['user']}"
        f" dbname={database}"
    )


def write_config(params: dict[str, Any], **overrides: dict[str, Any]) -> None:
    CONFIG.write_text(config_text(params, **overrides))


def admin(params: dict[str, Any], *statements: str) -> None:
    import psycopg

    with psycopg.connect(params["admin_dsn"], autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def client(params: dict[str, Any]) -> Any:
    from pdoflowd.client import Client

    return Client(params["dsn"])


def rows(
    params: dict[str, Any], query: str, *args: Any
) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(params["dsn"]) as conn:
        return conn.execute(query, args or None).fetchall()


def processes_of(uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# ------------------------------------------------------------ scenarios


@scenario
def package_installs_enabled_but_not_started(params: dict[str, Any]) -> str:
    # A policy-rc.d on the host (CI has one) would forbid every restart;
    # the container's /usr is an overlay, so hiding it here is harmless.
    Path("/usr/sbin/policy-rc.d").unlink(missing_ok=True)
    run("apt-get", "install", "-y", "--no-install-recommends", params["deb"])
    account = pwd.getpwnam("pdoflowd")
    check(account.pw_dir == "/var/lib/pdoflowd", f"home: {account.pw_dir}")
    check(account.pw_uid < 1000, f"not a system account: {account.pw_uid}")
    home = Path("/var/lib/pdoflowd").stat()
    check(home.st_uid == account.pw_uid, "state directory owner")
    check(home.st_mode & 0o777 == 0o750, f"mode {home.st_mode:o}")
    enabled = run("systemctl", "is-enabled", UNIT, check_rc=False).stdout
    check(enabled.strip() == "enabled", f"is-enabled: {enabled}")
    active = run("systemctl", "is-active", UNIT, check_rc=False).stdout
    check(active.strip() == "inactive", f"started at install: {active}")
    conffiles = run("dpkg-query", "-W", "-f=${Conffiles}", "pdoflowd").stdout
    check(str(CONFIG) in conffiles, f"conffiles: {conffiles}")
    run("pdoflowd", "check-config")
    run("pdoflow", "--help")
    version = run("dpkg-query", "-W", "-f=${Version}", "pdoflowd").stdout
    return f"pdoflowd {version} installed; account uid {account.pw_uid}"


@scenario
def installed_unit_verifies_and_scores(params: dict[str, Any]) -> str:
    verify = run("systemd-analyze", "verify", "--man=no", UNIT, check_rc=False)
    check(verify.stderr == "", f"verify said: {verify.stderr}")
    security = run("systemd-analyze", "security", "--no-pager", UNIT)
    match = re.search(r"exposure level for \S+: (\d+\.\d+)", security.stdout)
    check(match, f"no score in: {security.stdout[-500:]}")
    assert match is not None
    score = float(match[1])
    check(score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}")
    return f"systemd-analyze security: {score}"


@scenario
def start_waits_for_the_database_then_reports_ready(
    params: dict[str, Any],
) -> str:
    CREDENTIAL.parent.mkdir(mode=0o700, exist_ok=True)
    CREDENTIAL.write_text(params["secret"] + "\n")
    CREDENTIAL.chmod(0o600)
    DROP_IN_DIR.mkdir(parents=True, exist_ok=True)
    (DROP_IN_DIR / "systest.conf").write_text(
        (HERE / "systest.conf").read_text().format(**params)
    )
    write_config(params)
    run("systemctl", "daemon-reload")
    run("systemctl", "start", "--no-block", UNIT)
    wait_for(
        "STATUS while the database is missing",
        lambda: state()["StatusText"] == "waiting for the database",
    )
    seen = set()
    for _ in range(20):
        seen.add(state()["ActiveState"])
        time.sleep(0.1)
    check(seen == {"activating"}, f"states without a database: {seen}")
    # The database appears at once with its schema: migrated under another
    # name, then renamed, so the daemon never meets it half made.
    building = params["database"] + "_new"
    admin(params, f"CREATE DATABASE {building}")
    migrate_config = Path("/tmp/migrate.toml")
    migrate_config.write_text(
        config_text(params, database={"dsn": dsn_for(params, building)})
    )
    run("pdoflowd", "migrate", "--config", str(migrate_config))
    import psycopg

    sys.path.insert(0, str(HERE))
    from systest_jobs import CREATE_EFFECTS

    with psycopg.connect(dsn_for(params, building)) as conn:
        conn.execute(CREATE_EFFECTS)
    admin(params, f"ALTER DATABASE {building} RENAME TO {params['database']}")
    wait_for(
        "active (running)",
        lambda: state()["SubState"] == "running",
        timeout=60,
    )
    status = state()["StatusText"]
    check(re.match(r"2 workers\b", status), f"status when ready: {status}")
    check("database unreachable" in journal(), "no wait in the journal")
    return f"StatusText={status!r}"


@scenario
def jobs_run_as_the_service_user(params: dict[str, Any]) -> str:
    queue = client(params)
    posting = queue.post("systest_jobs.record", [[f"r{i}"] for i in range(20)])
    done = queue.wait(posting.id, timeout=60, poll_interval=0.1)
    check(done.jobs.get("done") == 20, f"jobs: {done.jobs}")
    uids = {u for (u,) in rows(params, "SELECT DISTINCT uid FROM effects")}
    expected = pwd.getpwnam("pdoflowd").pw_uid
    check(uids == {expected}, f"jobs ran as {uids}, not {expected}")
    return f"20 jobs done as uid {expected}"


@scenario
def metrics_are_served_from_the_sandbox(params: dict[str, Any]) -> str:
    import urllib.request

    base = f"http://127.0.0.1:{params['metrics_port']}"
    pages = {}
    for page in ("/livez", "/readyz", "/metrics"):
        with urllib.request.urlopen(base + page, timeout=10) as answer:
            check(answer.status == 200, f"{page}: HTTP {answer.status}")
            pages[page] = answer.read().decode()
    check("pdoflowd_" in pages["/metrics"], "no pdoflowd metrics")
    return f"/metrics: {len(pages['/metrics'].splitlines())} lines"


@scenario
def web_console_installed_disabled_then_serves_from_its_sandbox(
    params: dict[str, Any],
) -> str:
    import base64
    import socket
    import urllib.error
    import urllib.parse
    import urllib.request

    enabled = run("systemctl", "is-enabled", WEB_UNIT, check_rc=False).stdout
    check(enabled.strip() == "disabled", f"is-enabled: {enabled}")
    verify = run(
        "systemd-analyze", "verify", "--man=no", WEB_UNIT, check_rc=False
    )
    check(verify.stderr == "", f"verify said: {verify.stderr}")
    security = run("systemd-analyze", "security", "--no-pager", WEB_UNIT)
    match = re.search(r"exposure level for \S+: (\d+\.\d+)", security.stdout)
    check(match, f"no score in: {security.stdout[-500:]}")
    assert match is not None
    check(float(match[1]) <= MAX_EXPOSURE, f"exposure {match[1]}")
    # Recommended, not required: installed here as an operator would.
    run(
        "apt-get", "install", "-y", "--no-install-recommends",
        "python3-starlette", "python3-uvicorn", "python3-jinja2",
    )  # fmt: skip
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = CONFIG.read_text()
    CONFIG.write_text(
        config
        + f'\n[web]\nlisten = "127.0.0.1:{port}"\n'
        + f'users_file = "{WEB_USERS}"\nallow_actions = true\n'
    )
    added = subprocess.run(
        [
            *("pdoflowd", "web", "--config", str(CONFIG)),
            *("--add-user", "ops", "--admin"),
        ],
        input="ops-secret\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    check(added.returncode == 0, f"--add-user: {added.stderr}")
    os.chown(WEB_USERS, 0, pwd.getpwnam("pdoflowd").pw_gid)
    WEB_CREDENTIAL.write_text(params["secret"] + "\n")
    WEB_CREDENTIAL.chmod(0o600)
    token = base64.b64encode(b"ops:ops-secret").decode()

    def ask(path: str, data: bytes | None = None) -> tuple[int, str]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}",
            data=data,
            headers={"Authorization": f"Basic {token}"},
        )
        if data is not None:
            request.add_header(
                "Content-Type", "application/x-www-form-urlencoded"
            )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    try:
        run("systemctl", "start", WEB_UNIT)
        status, page = wait_for(
            "the console answering",
            lambda: _answer_or_none(lambda: ask("/")),
        )
        check(status == 200, f"GET /: {status} {page[:300]}")
        check(f">{main_pid()}<" in page, "the daemon is not on the overview")
        posting = client(params).post(
            "systest_jobs.record", [["web"]], paused=True
        )
        status, page = ask(f"/postings/{posting.id}/confirm?action=resume")
        check(status == 200, f"confirm: {status} {page[:300]}")
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
        check(csrf, "no CSRF token on the confirmation page")
        assert csrf is not None
        form = urllib.parse.urlencode({"action": "resume", "csrf": csrf[1]})
        status, _ = ask(f"/postings/{posting.id}/action", form.encode())
        check(status == 200, f"resume: {status}")
        done = client(params).wait(posting.id, timeout=60, poll_interval=0.1)
        check(done.status.value == "finished", f"posting: {done.status}")
        logged = run("journalctl", "-u", WEB_UNIT, "--no-pager").stdout
        check(
            f"user ops from 127.0.0.1: resume posting {posting.id}" in logged,
            f"no audit line in: {logged[-1000:]}",
        )
        run("systemctl", "stop", WEB_UNIT)
        after = show("ActiveState", "Result", unit=WEB_UNIT)
        check(after["ActiveState"] == "inactive", f"after stop: {after}")
    finally:
        run("systemctl", "stop", WEB_UNIT, check_rc=False)
        CONFIG.write_text(config)
    return f"exposure {match[1]}; overview, a resume, the audit line, a stop"


def _answer_or_none(ask: Callable[[], tuple[int, str]]) -> Any:
    try:
        return ask()
    except OSError:
        return None


@scenario
def password_comes_as_a_credential_and_shows_nowhere(
    params: dict[str, Any],
) -> str:
    secret = params["secret"]
    credential = Path(f"/run/credentials/{UNIT}/db-password")
    check(credential.read_text().strip() == secret, "credential content")
    pid = main_pid()
    processes = [pid, *children(pid, session=True)]
    # The supervisor, its database session and two workers.
    check(len(processes) == 4, f"processes: {processes}")
    for process in processes:
        for view in ("cmdline", "environ"):
            data = Path(f"/proc/{process}/{view}").read_bytes()
            check(secret.encode() not in data, f"{view} of {process}")
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    check(
        f"CREDENTIALS_DIRECTORY=/run/credentials/{UNIT}".encode() in environ,
        "no CREDENTIALS_DIRECTORY",
    )
    check(secret not in journal(), "the password is in the journal")
    ps = run("ps", "-eo", "args").stdout
    check(secret not in ps, "the password is in ps")
    return f"checked {len(processes)} processes, ps and the journal"


@scenario
def journal_lines_carry_priority_and_process(params: dict[str, Any]) -> str:
    queue = client(params)
    posting = queue.post("systest_jobs.log_failure", [["journal check"]])
    queue.wait(posting.id, timeout=30, poll_interval=0.1)
    time.sleep(0.5)
    # The daemon's lines, from the supervisor and every worker; not those of
    # ExecReload's check-config, which run under the same unit.
    entries = [
        e
        for e in journal_entries()
        if e.get("SYSLOG_IDENTIFIER") == "pdoflowd"
        and " run " in e.get("_CMDLINE", "")
    ]
    check(entries, "no journal entries of the daemon")
    prefix = re.compile(r"\[(supervisor|database session|worker \d+):\d+\] ")
    for entry in entries:
        message = entry.get("MESSAGE")
        check(
            isinstance(message, str) and prefix.match(message),
            f"unprefixed: {entry}",
        )

    def priorities(text: str) -> set[str]:
        return {e["PRIORITY"] for e in entries if text in e["MESSAGE"]}

    check(priorities("ready:") == {"6"}, f"ready: {priorities('ready:')}")
    check(priorities("job caught: journal check") == {"3"}, "job error")
    check(priorities("Traceback (most recent") == {"3"}, "traceback lines")
    check(priorities("RuntimeError: journal check") == {"3"}, "last line")
    return f"{len(entries)} entries, all prefixed"


@scenario
def reload_applies_a_changed_worker_count(params: dict[str, Any]) -> str:
    before = state()
    pid = int(before["MainPID"])
    old = wait_for("two workers", running(2))
    write_config(params, workers={"count": 3})
    run("systemctl", "reload", UNIT)
    # A reload replaces every worker, one at a time, and adds the third.
    workers = replaced(old, 3)
    after = state()
    check(int(after["MainPID"]) == pid, "the main process changed")
    check(after["NRestarts"] == before["NRestarts"], "restarted")
    return f"workers {old} -> {workers}, status {after['StatusText']!r}"


@scenario
def reload_refuses_an_invalid_config(params: dict[str, Any]) -> str:
    pid = main_pid()
    workers = settled(3)
    try:
        write_config(params, workers={"count": 0})
        refused = run("systemctl", "reload", UNIT, check_rc=False)
        check(refused.returncode != 0, "systemctl reload accepted count = 0")
        check(main_pid() == pid, "the main process changed")
        check(children(pid) == workers, "the workers changed")
        # The daemon refuses it on its own too, when HUP comes from elsewhere.
        os.kill(pid, signal.SIGHUP)
        status = wait_for(
            "reload refused in STATUS",
            lambda: "refused" in (text := state()["StatusText"]) and text,
        )
        check("workers.count" in status, f"status: {status}")
        check(state()["ActiveState"] == "active", "not active")
        check(children(pid) == workers, "the workers changed")
    finally:
        write_config(params, workers={"count": 3})
    run("systemctl", "reload", UNIT)
    wait_for(
        "status after a good reload",
        lambda: "refused" not in state()["StatusText"],
    )
    replaced(workers, 3)
    return f"refused with STATUS {status!r}"


SCHEDULES = """
[[schedules]]
name = "systest-tick"
entry_point = "systest_jobs.record"
every_s = 1
args = ["schedule-tick"]
kwargs = { note = "schedule" }

[[schedules]]
name = "systest-nightly"
entry_point = "systest_jobs.record"
cron = "30 2 * * *"
timezone = "Europe/Paris"
args = ["schedule-nightly"]
"""


@scenario
def reload_adds_schedules_that_debian_croniter_fires(
    params: dict[str, Any],
) -> str:
    # Debian's python3-croniter (1.3.5) and tzdata, as the package has them.
    CONFIG.write_text(config_text(params, workers={"count": 3}) + SCHEDULES)
    shown = run("pdoflowd", "check-config", "--show-schedules").stdout
    check("schedule systest-nightly:" in shown, f"check-config: {shown}")
    check(
        re.search(r"next: \S+T02:30:00\+0[12]:00", shown),
        f"no 02:30 Paris time in: {shown}",
    )
    try:
        run("systemctl", "reload", UNIT)

        def ticks() -> list[Any] | None:
            found = [
                row[0]
                for row in rows(
                    params,
                    "SELECT run_at FROM pdoflowd.schedule_runs"
                    " WHERE schedule = 'systest-tick' ORDER BY run_at",
                )
            ]
            return found if len(found) >= 3 else None

        found = wait_for("three runs of systest-tick", ticks)
        steps = {(b - a).total_seconds() for a, b in itertools.pairwise(found)}
        check(steps == {1.0}, f"runs not a second apart: {found}")
        listing = run("pdoflow", "--dsn", params["dsn"], "schedules").stdout
        check("systest-nightly" in listing, f"pdoflow schedules: {listing}")
    finally:
        write_config(params, workers={"count": 3})
        run("systemctl", "reload", UNIT)
    settled(3)
    return f"{len(found)} runs; check-config said {shown.splitlines()[2]!r}"


@scenario
def killed_worker_is_replaced(params: dict[str, Any]) -> str:
    before = state()
    pid = int(before["MainPID"])
    workers = settled(3)
    victim, survivors = workers[0], set(workers[1:])
    os.kill(victim, signal.SIGKILL)
    after_kill = wait_for(
        "a replacement worker",
        lambda: victim not in (found := running(3)() or [victim]) and found,
    )
    check(survivors <= set(after_kill), f"others replaced too: {after_kill}")
    after = state()
    check(int(after["MainPID"]) == pid, "the main process changed")
    check(after["NRestarts"] == before["NRestarts"], "the service restarted")
    check("worker died: signal 9" in journal(), "no death in the journal")
    return f"worker {victim} replaced: {workers} -> {after_kill}"


@scenario
def stop_drains_running_jobs_and_loses_none(params: dict[str, Any]) -> str:
    wait_for("three workers", running(3))
    queue = client(params)
    keys = [f"d{i}" for i in range(6)]
    posting = queue.post("systest_jobs.sleep", [[3, key] for key in keys])

    def keys_noted(note: str) -> set[str]:
        query = "SELECT key FROM effects WHERE note = %s AND key LIKE 'd%%'"
        return {key for (key,) in rows(params, query, note)}

    wait_for("three running jobs", lambda: len(keys_noted("start")) >= 3)
    began = time.monotonic()
    run("systemctl", "stop", UNIT)
    took = time.monotonic() - began
    check(state()["ActiveState"] == "inactive", f"after stop: {state()}")
    ended = keys_noted("end")
    running_keys = keys_noted("start")
    check(running_keys <= ended, f"cut short: {running_keys - ended}")
    executing = rows(
        params, "SELECT count(*) FROM pdoflowd.jobs WHERE status = 'executing'"
    )
    check(executing == [(0,)], f"left executing: {executing}")
    run("systemctl", "start", UNIT)
    done = queue.wait(posting.id, timeout=60, poll_interval=0.1)
    check(done.jobs.get("done") == 6, f"jobs: {done.jobs}")
    runs = rows(
        params,
        "SELECT key, count(*) FROM effects WHERE note = 'end' AND key LIKE 'd%'"
        " GROUP BY key",
    )
    check(dict(runs) == dict.fromkeys(keys, 1), f"runs: {runs}")
    return f"stop took {took:.1f} s, drained {sorted(running_keys)}"


@scenario
def killed_main_process_is_restarted(params: dict[str, Any]) -> str:
    before = state()
    pid = int(before["MainPID"])
    restarts = int(before["NRestarts"])
    os.kill(pid, signal.SIGKILL)
    wait_for(
        "a restarted daemon",
        lambda: (
            (s := state())["SubState"] == "running"
            and int(s["MainPID"]) not in (0, pid)
            and int(s["NRestarts"]) == restarts + 1
        ),
    )
    queue = client(params)
    posting = queue.post("systest_jobs.record", [["after-kill"]] * 3)
    done = queue.wait(posting.id, timeout=60, poll_interval=0.1)
    check(done.jobs.get("done") == 3, f"jobs: {done.jobs}")
    return f"NRestarts {restarts} -> {state()['NRestarts']}"


@scenario
def hung_main_loop_is_caught_by_the_watchdog(params: dict[str, Any]) -> str:
    before = state()
    pid = int(before["MainPID"])
    restarts = int(before["NRestarts"])
    began = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    wait_for(
        "a restart by the watchdog",
        lambda: (
            (s := state())["SubState"] == "running"
            and int(s["MainPID"]) not in (0, pid)
            and int(s["NRestarts"]) == restarts + 1
        ),
    )
    took = time.monotonic() - began
    check("Watchdog timeout" in journal(), "no watchdog timeout logged")
    return f"restarted {took:.1f} s after SIGSTOP"


@scenario
def config_error_fails_without_a_restart_loop(params: dict[str, Any]) -> str:
    try:
        write_config(params, workers={"count": 0})
        failed = run("systemctl", "restart", UNIT, check_rc=False)
        check(failed.returncode != 0, "restart with count = 0 succeeded")
        time.sleep(4)
        after = state()
        check(after["ActiveState"] == "failed", f"state: {after}")
        check(after["ExecMainStatus"] == "78", f"status: {after}")
        check(after["NRestarts"] == "0", f"restarted: {after}")
        check("workers.count" in after["StatusText"], f"status text: {after}")
    finally:
        write_config(params, workers={"count": 3})
    run("systemctl", "reset-failed", UNIT)
    run("systemctl", "start", UNIT)
    return f"exit 78, StatusText={after['StatusText']!r}"


@scenario
def schema_behind_fails_without_a_restart_loop(params: dict[str, Any]) -> str:
    empty = params["database"] + "_empty"
    admin(params, f"CREATE DATABASE {empty}")
    try:
        write_config(params, database={"dsn": dsn_for(params, empty)})
        failed = run("systemctl", "restart", UNIT, check_rc=False)
        check(failed.returncode != 0, "started without a schema")
        time.sleep(4)
        after = state()
        check(after["ActiveState"] == "failed", f"state: {after}")
        check(after["ExecMainStatus"] == "4", f"status: {after}")
        check(after["NRestarts"] == "0", f"restarted: {after}")
    finally:
        write_config(params, workers={"count": 3})
    run("systemctl", "reset-failed", UNIT)
    run("systemctl", "start", UNIT)
    return "exit 4, not restarted"


@scenario
def upgrade_restarts_the_running_daemon(params: dict[str, Any]) -> str:
    pid = main_pid()
    config = CONFIG.read_text()
    run(
        "apt-get",
        "install",
        "-y",
        "--no-install-recommends",
        params["deb_upgrade"],
    )
    version = run("dpkg-query", "-W", "-f=${Version}", "pdoflowd").stdout
    check(version == params["upgrade_version"], f"version {version}")
    wait_for(
        "the upgraded daemon running",
        lambda: (
            (s := state())["SubState"] == "running"
            and int(s["MainPID"]) not in (0, pid)
        ),
    )
    check(CONFIG.read_text() == config, "the local configuration changed")
    leftovers = sorted(p.name for p in CONFIG.parent.glob("*.dpkg-*"))
    check(not leftovers, f"conffile leftovers: {leftovers}")
    queue = client(params)
    posting = queue.post("systest_jobs.record", [["after-upgrade"]])
    done = queue.wait(posting.id, timeout=60, poll_interval=0.1)
    check(done.jobs.get("done") == 1, f"jobs: {done.jobs}")
    return f"upgraded to {version}, daemon restarted"


@scenario
def purge_leaves_a_clean_system(params: dict[str, Any]) -> str:
    uid = pwd.getpwnam("pdoflowd").pw_uid
    for drop_in in DROP_IN_DIR.glob("*"):
        drop_in.unlink()
    DROP_IN_DIR.rmdir()
    run("systemctl", "daemon-reload")
    run("apt-get", "purge", "-y", "pdoflowd")
    active = run("systemctl", "is-active", UNIT, check_rc=False).stdout.strip()
    check(active in ("inactive", "unknown"), f"after purge: {active}")
    check(not processes_of(uid), f"left running: {processes_of(uid)}")
    gone = [
        "/etc/pdoflowd",
        "/var/lib/pdoflowd",
        "/run/pdoflowd",
        str(CREDENTIAL),
        "/lib/systemd/system/pdoflowd.service",
        "/etc/systemd/system/multi-user.target.wants/pdoflowd.service",
        "/usr/lib/python3/dist-packages/pdoflowd",
        "/usr/bin/pdoflowd",
        "/usr/bin/pdoflow",
        "/usr/lib/sysusers.d/pdoflowd.conf",
        "/usr/lib/tmpfiles.d/pdoflowd.conf",
        "/usr/share/doc/pdoflowd",
    ]
    left = [path for path in gone if os.path.lexists(path)]
    check(not left, f"left behind: {left}")
    listed = run("systemctl", "list-unit-files", UNIT, check_rc=False).stdout
    check(UNIT not in listed, f"unit still known: {listed}")
    status = run(
        "dpkg-query", "-W", "-f=${db:Status-Abbrev}", "pdoflowd", check_rc=False
    )
    check(
        status.returncode != 0 or not status.stdout.startswith("i"),
        f"dpkg: {status.stdout}",
    )
    return "nothing left but the pdoflowd account (kept, as Debian does)"


# ------------------------------------------------------------ runner


def main() -> int:
    OUT.mkdir(exist_ok=True)
    (OUT / "started").write_text(f"{time.time()}\n")
    params = json.loads((HERE / "params.json").read_text())
    failures = 0
    with (OUT / "results.jsonl").open("a") as results:
        for name, body in SCENARIOS:
            began = time.monotonic()
            try:
                detail = body(params)
                ok = True
            except Exception:
                ok = False
                failures += 1
                detail = traceback.format_exc()
                try:
                    detail += "\n--- journal ---\n" + journal("-n", "60")
                except Exception:
                    detail += "\n(no journal)"
            took = time.monotonic() - began
            results.write(
                json.dumps(
                    {"name": name, "ok": ok, "seconds": took, "detail": detail}
                )
                + "\n"
            )
            results.flush()
            print(
                f"{'PASS' if ok else 'FAIL'} {name} ({took:.1f} s)", flush=True
            )
    try:
        (OUT / "journal.txt").write_text(
            run("journalctl", "--no-pager", "-b", check_rc=False).stdout
        )
    finally:
        (OUT / "done").write_text(f"{failures}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
