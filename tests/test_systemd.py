"""The service as systemd and a host see it, without booting systemd.

- the unit file: ``systemd-analyze verify`` says nothing, ``systemd-analyze
  security`` scores it 2.0 or better, and its directives agree with the
  daemon (config path, exit statuses, drain budget, account, credential);
- the sysusers.d and tmpfiles.d entries, applied to a scratch root;
- the database password as the unit passes it (a systemd credential), or
  from ``database.password_file``, against a PostgreSQL that demands it;
- ``pdoflowd run --daemonize`` with a locked pidfile, for hosts without
  systemd.

The unit under a real systemd (systemd-nspawn) is ``make systemd-test``.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools import devcluster
from harness import (
    REPO_ROOT,
    TESTS_DIR,
    Daemon,
    daemon_config,
    wait_until,
    write_config,
)
from pdoflowd.client import Client
from pdoflowd.config import CREDENTIAL_NAME, DEFAULT_CONFIG_PATH, Config
from pdoflowd.db.migrate import upgrade
from pdoflowd.status import PostingStatus

UNIT = REPO_ROOT / "systemd" / "pdoflowd.service"
WEB_UNIT = REPO_ROOT / "systemd" / "pdoflowd-web.service"
NOTIFY_RELOAD = REPO_ROOT / "systemd" / "notify-reload.conf"
SYSUSERS = REPO_ROOT / "packaging" / "sysusers.d" / "pdoflowd.conf"
TMPFILES = REPO_ROOT / "packaging" / "tmpfiles.d" / "pdoflowd.conf"
CONTROL = REPO_ROOT / "packaging" / "debian" / "control"
MAX_EXPOSURE = 2.0

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="SYSTEMD-ANALYZE IS MISSING: the unit file is NOT verified"
    " (apt-get install systemd)",
)


def directives(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> every value assigned, in order (empty resets)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        values = found.setdefault(f"{section}.{key.strip()}", [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return found


def one(unit: dict[str, list[str]], key: str) -> str:
    values = unit.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit or "s"]
    return total


def systemd_version() -> int:
    out = subprocess.run(
        ["systemctl", "--version"], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[1])


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return directives(UNIT)


@pytest.fixture(scope="module")
def verify_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch root holding systemd's own units and the unit's commands.

    ``systemd-analyze verify --root`` resolves everything inside it, so the
    unit is checked as installed, with stand-ins for /usr/bin/pdoflowd.
    """
    root = tmp_path_factory.mktemp("verify-root")
    system_units = Path("/usr/lib/systemd/system")
    if not system_units.is_dir():
        system_units = Path("/lib/systemd/system")
    shutil.copytree(
        system_units, root / "usr/lib/systemd/system", symlinks=True
    )
    for command in ("usr/bin/pdoflowd", "usr/bin/env", "bin/kill"):
        stand_in = root / command
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system/pdoflowd.service")
    shutil.copy(WEB_UNIT, root / "etc/systemd/system/pdoflowd-web.service")
    return root


def analyze(*argv: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tempfile.gettempdir(),
    )


# ------------------------------------------------------------ the unit file


@needs_systemd_analyze
def test_systemd_analyze_verify_prints_nothing(verify_root: Path) -> None:
    done = analyze(
        "verify", "--man=no", f"--root={verify_root}", "pdoflowd.service"
    )
    assert done.stderr == ""
    assert done.returncode == 0


@needs_systemd_analyze
def test_systemd_analyze_verify_notices_a_missing_command(
    verify_root: Path, tmp_path: Path
) -> None:
    # The check above is only worth something if verify looks at all.
    broken = tmp_path / "root"
    shutil.copytree(verify_root, broken, symlinks=True)
    (broken / "usr/bin/pdoflowd").unlink()
    done = analyze("verify", "--man=no", f"--root={broken}", "pdoflowd.service")
    assert "/usr/bin/pdoflowd" in done.stderr


@needs_systemd_analyze
def test_security_exposure_is_at_most_two() -> None:
    done = analyze("security", "--offline=true", "--no-pager", str(UNIT))
    match = re.search(
        r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout
    )
    assert match is not None, done.stdout + done.stderr
    assert float(match[1]) <= MAX_EXPOSURE, done.stdout


@needs_systemd_analyze
def test_notify_reload_drop_in_verifies_where_systemd_knows_it(
    verify_root: Path, tmp_path: Path
) -> None:
    if systemd_version() < 253:
        pytest.skip(
            f"systemd {systemd_version()} predates Type=notify-reload (253):"
            " the drop-in is checked by its content only"
        )
    root = tmp_path / "root"
    shutil.copytree(verify_root, root, symlinks=True)
    drop_ins = root / "etc/systemd/system/pdoflowd.service.d"
    drop_ins.mkdir()
    shutil.copy(NOTIFY_RELOAD, drop_ins / "notify-reload.conf")
    done = analyze("verify", "--man=no", f"--root={root}", "pdoflowd.service")
    assert done.stderr == ""


def test_notify_reload_drop_in_replaces_the_signal_but_keeps_the_check(
    unit: dict[str, list[str]],
) -> None:
    drop_in = directives(NOTIFY_RELOAD)
    assert one(drop_in, "Service.Type") == "notify-reload"
    assert one(drop_in, "Service.ReloadSignal") == "SIGHUP"
    assert drop_in["Service.ExecReload"] == unit["Service.ExecReload"][:1]


def test_unit_is_notify_with_only_the_main_process_speaking(
    unit: dict[str, list[str]],
) -> None:
    assert one(unit, "Service.Type") == "notify"
    assert one(unit, "Service.NotifyAccess") == "main"


def test_unit_runs_the_daemon_on_the_default_config(
    unit: dict[str, list[str]],
) -> None:
    assert one(unit, "Service.ExecStart") == (
        f"/usr/bin/pdoflowd run --config {DEFAULT_CONFIG_PATH}"
    )


def test_reload_validates_the_config_before_sending_sighup(
    unit: dict[str, list[str]],
) -> None:
    # Without the credential, which systemd does not show to ExecReload=
    # under ProtectProc= (and the daemon does not read again on reload).
    assert unit["Service.ExecReload"] == [
        "/usr/bin/env -u CREDENTIALS_DIRECTORY /usr/bin/pdoflowd check-config"
        f" --config {DEFAULT_CONFIG_PATH}",
        "/bin/kill -HUP $MAINPID",
    ]


def test_unit_does_not_restart_on_config_or_schema_errors(
    unit: dict[str, list[str]],
) -> None:
    assert one(unit, "Service.Restart") == "on-failure"
    prevented = set(one(unit, "Service.RestartPreventExitStatus").split())
    assert prevented == {"78", "4"}
    assert one(unit, "Unit.StartLimitBurst")
    assert one(unit, "Unit.StartLimitIntervalSec")


def test_stop_gives_more_time_than_the_default_drain_budget(
    unit: dict[str, list[str]],
) -> None:
    assert one(unit, "Service.KillMode") == "mixed"
    budget = Config().workers.drain_timeout_s
    assert seconds(one(unit, "Service.TimeoutStopSec")) >= budget + 30


def test_watchdog_is_set(unit: dict[str, list[str]]) -> None:
    assert seconds(one(unit, "Service.WatchdogSec")) >= 10


def test_unit_loads_the_password_as_the_credential_the_daemon_reads(
    unit: dict[str, list[str]],
) -> None:
    credential = one(unit, "Service.LoadCredential")
    name, _, source = credential.partition(":")
    assert name == CREDENTIAL_NAME
    # A name, not a path: systemd looks it up in /etc/credstore and starts
    # the service without it when the file is absent.
    assert source and not source.startswith("/")


def test_unit_sandbox_directives(unit: dict[str, list[str]]) -> None:
    expected = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
    }
    for key, value in expected.items():
        assert one(unit, f"Service.{key}") == value, key
    assert unit["Service.CapabilityBoundingSet"] == []
    assert "@system-service" in unit["Service.SystemCallFilter"]
    families = set(one(unit, "Service.RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_unit_account_and_directories_match_sysusers_and_tmpfiles(
    unit: dict[str, list[str]],
) -> None:
    user = one(unit, "Service.User")
    entry = next(
        line.split()
        for line in SYSUSERS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert entry[:2] == ["u", user]
    assert entry[-1] == f"/var/lib/{one(unit, 'Service.StateDirectory')}"
    tmpfile = next(
        line.split()
        for line in TMPFILES.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert tmpfile[:5] == [
        "d",
        entry[-1],
        one(unit, "Service.StateDirectoryMode"),
        user,
        user,
    ]


@pytest.mark.skipif(
    os.geteuid() != 0, reason="creating an account in a scratch root needs root"
)
def test_sysusers_and_tmpfiles_entries_apply_to_a_fresh_root(
    tmp_path: Path,
) -> None:
    for tool in ("systemd-sysusers", "systemd-tmpfiles"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool.upper()} IS MISSING: entries NOT applied")
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)],
        check=True,
        capture_output=True,
    )
    passwd = (tmp_path / "etc/passwd").read_text().splitlines()
    account = next(line for line in passwd if line.startswith("pdoflowd:"))
    _, _, uid, gid, _, home, _ = account.split(":")
    assert home == "/var/lib/pdoflowd"
    assert 0 < int(uid) < 1000
    subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(TMPFILES)],
        check=True,
        capture_output=True,
    )
    state = (tmp_path / "var/lib/pdoflowd").stat()
    assert (state.st_uid, state.st_gid) == (int(uid), int(gid))
    assert state.st_mode & 0o777 == 0o750


# The Debian package of each Python dependency in pyproject.toml.
DEBIAN_PACKAGES = {
    "psycopg": "python3-psycopg",
    "sdnotify": "python3-sdnotify",
    "python-daemon": "python3-daemon",
    "prometheus-client": "python3-prometheus-client",
    "croniter": "python3-croniter",
}


# ------------------------------------------------------------ the web unit


@needs_systemd_analyze
def test_web_unit_verifies_and_is_as_hardened_as_the_daemon(
    verify_root: Path, unit: dict[str, list[str]]
) -> None:
    done = analyze(
        "verify", "--man=no", f"--root={verify_root}", "pdoflowd-web.service"
    )
    assert done.stderr == ""
    security = analyze(
        "security", "--offline=true", "--no-pager", str(WEB_UNIT)
    )
    match = re.search(
        r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout
    )
    assert match is not None, security.stdout + security.stderr
    assert float(match[1]) <= MAX_EXPOSURE, security.stdout
    web = directives(WEB_UNIT)
    sandbox = [
        key
        for key in unit
        if key.startswith(
            ("Service.Protect", "Service.Private", "Service.Restrict")
        )
        or key
        in (
            "Service.NoNewPrivileges",
            "Service.CapabilityBoundingSet",
            "Service.SystemCallFilter",
            "Service.MemoryDenyWriteExecute",
            "Service.User",
        )
    ]
    for key in sandbox:
        assert web.get(key) == unit[key], key


def test_web_unit_runs_the_console_and_is_installed_but_not_enabled() -> None:
    web = directives(WEB_UNIT)
    assert one(web, "Service.ExecStart") == (
        "/usr/bin/pdoflowd web --config /etc/pdoflowd/pdoflowd.toml"
    )
    assert one(web, "Service.Type") == "exec"
    assert "78" in one(web, "Service.RestartPreventExitStatus").split()
    install = (CONTROL.parent / "pdoflowd.install").read_text()
    assert "systemd/pdoflowd-web.service lib/systemd/system/" in install
    rules = (CONTROL.parent / "rules").read_text()
    assert re.search(
        r"dh_installsystemd --no-enable --no-start[^\n]*\\\n"
        r"\s*pdoflowd-web.service",
        rules,
    )


def test_package_recommends_the_web_consoles_stack() -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    control = CONTROL.read_text()
    recommends = control.split("Recommends:")[1].split("Description:")[0]
    for requirement in project["project"]["optional-dependencies"]["web"]:
        name = re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower()
        assert f"python3-{name}" in recommends, name


def test_package_depends_on_the_debian_package_of_every_dependency() -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    control = CONTROL.read_text()
    for requirement in project["project"]["dependencies"]:
        if ";" in requirement:
            continue  # only for older Pythons than Debian 12's
        name = re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower()
        assert name in DEBIAN_PACKAGES, f"no Debian package known for {name}"
        assert f"{DEBIAN_PACKAGES[name]}," in control, name
    rules = (CONTROL.parent / "rules").read_text()
    assert "--with python3,installsysusers" in rules


# ------------------------------------------------------------ the password


@pytest.fixture(scope="module")
def password_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, str]]:
    """A PostgreSQL that demands a password (scram) from role pdoflowd_app.

    Yields (dsn without password, password) for a migrated database.
    """
    try:
        cluster = devcluster.LocalCluster(tmp_path_factory.mktemp("scram"))
    except RuntimeError as error:
        pytest.skip(f"NO LOCAL POSTGRESQL: password tests NOT run: {error}")
    cluster.init()
    (cluster.data_dir / "pg_hba.conf").write_text(
        "local all postgres trust\n"
        "host all postgres 127.0.0.1/32 trust\n"
        "host all all 127.0.0.1/32 scram-sha-256\n"
    )
    cluster.start()
    password = f"pw-{uuid.uuid4().hex}"
    try:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute(
                f"CREATE ROLE pdoflowd_app LOGIN PASSWORD '{password}'"
            )
            conn.execute("CREATE DATABASE app OWNER pdoflowd_app")
        dsn = f"host=127.0.0.1 port={cluster.port} user=pdoflowd_app dbname=app"
        upgrade(f"{dsn} password={password}")
        yield dsn, password
    finally:
        cluster.stop("immediate")


@pytest.fixture
def password_daemon(
    tmp_path: Path, password_server: tuple[str, str]
) -> Iterator[Any]:
    started: list[Daemon] = []

    def start(env: dict[str, str] | None = None, **overrides: Any) -> Daemon:
        dsn, _ = password_server
        daemon = Daemon(
            tmp_path,
            daemon_config(dsn, **overrides),
            name=f"daemon{len(started)}",
        )
        # Only what the test gives: no password from the caller's setup.
        daemon.env.pop("PGPASSWORD", None)
        daemon.env.pop("CREDENTIALS_DIRECTORY", None)
        daemon.env["PGPASSFILE"] = str(tmp_path / "no-pgpass")
        daemon.env.update(env or {})
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.close()


def credentials_directory(tmp_path: Path, password: str) -> Path:
    directory = tmp_path / "credentials"
    directory.mkdir(mode=0o700)
    credential = directory / CREDENTIAL_NAME
    credential.write_text(password + "\n")
    credential.chmod(0o400)
    return directory


def run_jobs(dsn: str, password: str, count: int = 10) -> None:
    client = Client(f"{dsn} password={password}")
    posting = client.post("jobfns.noop", [[]] * count)
    state = client.wait(posting.id, timeout=30, poll_interval=0.05)
    assert state.status is PostingStatus.FINISHED


def test_credential_logs_the_daemon_in_and_appears_nowhere(
    password_daemon: Any, password_server: tuple[str, str], tmp_path: Path
) -> None:
    dsn, password = password_server
    directory = credentials_directory(tmp_path, password)
    daemon = password_daemon(
        env={"CREDENTIALS_DIRECTORY": str(directory)}, workers={"count": 2}
    ).wait_ready()
    run_jobs(dsn, password)
    processes = [daemon.pid, *daemon.workers()]
    assert len(processes) == 3
    secret = password.encode()
    for pid in processes:
        for view in ("cmdline", "environ"):
            assert secret not in Path(f"/proc/{pid}/{view}").read_bytes(), (
                pid,
                view,
            )
    assert daemon.stop() == 0
    assert password not in daemon.log()


def test_without_the_password_the_daemon_cannot_log_in(
    password_daemon: Any,
) -> None:
    daemon = password_daemon()
    wait_until(lambda: "database unreachable" in daemon.log(), timeout=15)
    assert "password" in daemon.log()
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_password_file_logs_the_daemon_in(
    password_daemon: Any, password_server: tuple[str, str], tmp_path: Path
) -> None:
    dsn, password = password_server
    password_file = tmp_path / "db-password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    daemon = password_daemon(
        database={"dsn": dsn, "password_file": str(password_file)}
    ).wait_ready()
    run_jobs(dsn, password)
    assert daemon.stop() == 0
    assert password not in daemon.log()


def test_credential_wins_over_the_password_file(
    password_daemon: Any, password_server: tuple[str, str], tmp_path: Path
) -> None:
    dsn, password = password_server
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    directory = credentials_directory(tmp_path, password)
    daemon = password_daemon(
        env={"CREDENTIALS_DIRECTORY": str(directory)},
        database={"dsn": dsn, "password_file": str(wrong)},
    ).wait_ready()
    assert daemon.stop() == 0


# ------------------------------------------------------------ --daemonize


def process_gone(pid: int) -> bool:
    """Exited: no such process, or a zombie its (new) parent has not reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


class Detached:
    """``pdoflowd run --daemonize`` started the way an init script would."""

    def __init__(self, tmp_path: Path, dsn: str) -> None:
        self.tmp = tmp_path
        self.config_path = write_config(
            tmp_path / "detached.toml", daemon_config(dsn)
        )
        self.pidfile = tmp_path / "run" / "pdoflowd.pid"
        self.pidfile.parent.mkdir()
        self.log_path = tmp_path / "detached.log"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        }
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(TESTS_DIR), str(REPO_ROOT)]
        )
        self.env["PDOFLOWD_TEST_EFFECTS_DSN"] = dsn
        self.pids: list[int] = []

    def start(self) -> subprocess.CompletedProcess[str]:
        with self.log_path.open("a") as log:
            return subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pdoflowd",
                    "run",
                    "--daemonize",
                    "--pidfile",
                    str(self.pidfile),
                    "--config",
                    str(self.config_path),
                ],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                timeout=30,
                cwd=self.tmp,
            )

    def pid(self) -> int:
        def written() -> int | None:
            try:
                text = self.pidfile.read_text().strip()
            except FileNotFoundError:
                return None
            return int(text) if text.isdigit() else None

        pid = wait_until(written, timeout=15)
        if pid not in self.pids:
            self.pids.append(pid)
        return int(pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        for pid in self.pids:
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def detached(tmp_path: Path, dsn: str) -> Iterator[Detached]:
    runner = Detached(tmp_path, dsn)
    yield runner
    runner.close()


def pidfile_is_locked(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_daemonize_detaches_and_writes_its_pid_to_a_locked_pidfile(
    detached: Detached,
) -> None:
    assert detached.start().returncode == 0
    pid = detached.pid()
    assert pid != os.getpid()
    assert b"pdoflowd" in Path(f"/proc/{pid}/cmdline").read_bytes()
    # Detached: a session of its own, no longer ours.
    assert os.getsid(pid) != os.getsid(0)
    assert pidfile_is_locked(detached.pidfile)
    wait_until(lambda: "ready:" in detached.log(), timeout=30)
    assert f"[supervisor:{pid}]" in detached.log()


def test_second_start_with_the_same_pidfile_fails_clearly(
    detached: Detached,
) -> None:
    assert detached.start().returncode == 0
    pid = detached.pid()
    began = time.monotonic()
    second = detached.start()
    assert second.returncode == 1
    assert time.monotonic() - began < 10
    assert f"pdoflowd runs already as pid {pid}" in detached.log()
    assert detached.pid() == pid
    assert not process_gone(pid)


def test_sigterm_stops_the_detached_daemon_and_removes_its_pidfile(
    detached: Detached,
) -> None:
    assert detached.start().returncode == 0
    pid = detached.pid()
    wait_until(lambda: "ready:" in detached.log(), timeout=30)
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: process_gone(pid), timeout=30)
    assert not detached.pidfile.exists()
    assert "draining" in detached.log()


def test_a_pidfile_left_by_a_killed_daemon_does_not_block_a_start(
    detached: Detached,
) -> None:
    assert detached.start().returncode == 0
    old = detached.pid()
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: process_gone(old), timeout=30)
    assert detached.pidfile.exists()
    assert detached.start().returncode == 0
    wait_until(lambda: detached.pid() != old, timeout=15)
    assert pidfile_is_locked(detached.pidfile)


def test_pidfile_without_daemonize_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pdoflowd", "run", "--pidfile", "x.pid"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        cwd=tmp_path,
        timeout=30,
    )
    assert done.returncode == 2
    assert "--pidfile goes with --daemonize" in done.stderr
