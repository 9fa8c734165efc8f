"""The pdoflowd package under a real systemd 252, in systemd-nspawn.

Run it with ``make systemd-test`` (or ``tests/systemd/run.sh``); it is not
part of ``make test``. It needs root, systemd-nspawn (systemd-container)
and, unless PDOFLOWD_DEB names a built package, the Debian build tools.

What happens: the package is built (packaging/build-deb.sh) and a second,
higher version of it is made for the upgrade; a container root is made from
the host's /etc with a copy of the dpkg database, booted with the host's
/usr under a writable overlay so that ``apt-get install`` works inside; its
only unit runs checks.py, which drives pdoflowd.service through systemctl
against a PostgreSQL on the host's 127.0.0.1 (the container shares the
network). Each scenario of checks.py is one test here.

Where the container cannot run (not root, no systemd-nspawn, no boot), the
tests are skipped with a reason in capitals, never passed; with
PDOFLOWD_SYSTEMD_TEST_REQUIRED=1 (for CI) they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from devtools import devcluster

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
BOOT_TIMEOUT_S = 900
UPGRADE_VERSION_SUFFIX = "+systest1"

sys.path.insert(0, str(HERE))
import checks  # noqa: E402  (the scenario names, read on the host too)


def _not_runnable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to boot a container with systemd-nspawn"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is missing (apt-get install systemd-container)"
    if not os.environ.get("PDOFLOWD_DEB"):
        for tool in ("dpkg-buildpackage", "dh"):
            if shutil.which(tool, path="/usr/bin:/bin") is None:
                return (
                    f"{tool} is missing to build the package (apt-get install"
                    " debhelper dh-python pybuild-plugin-pyproject"
                    " python3-all python3-setuptools), or set PDOFLOWD_DEB"
                )
    return None


def _skip(reason: str) -> None:
    message = f"SYSTEMD TEST NOT RUN: {reason}"
    if os.environ.get("PDOFLOWD_SYSTEMD_TEST_REQUIRED") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _build_packages(work: Path) -> tuple[Path, Path, str]:
    """The package to install, a higher version of it, and that version."""
    given = os.environ.get("PDOFLOWD_DEB")
    if given:
        deb = Path(given).resolve()
    else:
        out = work / "dist"
        subprocess.run(
            [str(REPO_ROOT / "packaging" / "build-deb.sh"), str(out)],
            check=True,
            capture_output=True,
            timeout=600,
        )
        [deb] = out.glob("pdoflowd_*.deb")
    tree = work / "upgrade-tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    lines = control.read_text().splitlines()
    version = next(
        line.split(": ", 1)[1] for line in lines if line.startswith("Version:")
    )
    upgraded = version + UPGRADE_VERSION_SUFFIX
    control.write_text(
        "\n".join(
            f"Version: {upgraded}" if line.startswith("Version:") else line
            for line in lines
        )
        + "\n"
    )
    upgrade = work / f"pdoflowd_{upgraded}_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-b", str(tree), str(upgrade)],
        check=True,
        capture_output=True,
    )
    return deb, upgrade, upgraded


def _make_root(root: Path) -> None:
    """A container root: the host's /etc, its dpkg state, no /usr of its own."""
    for name in (
        "usr",
        "var/lib",
        "var/cache/apt/archives/partial",
        "var/log/apt",
        "tmp",
        "root",
        "home",
        "srv",
        "opt",
        "run",
    ):
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    subprocess.run(["cp", "-a", "/etc", str(root / "etc")], check=True)
    for name in ("os-release", "machine-id"):
        (root / "etc" / name).unlink(missing_ok=True)
    shutil.copy("/usr/lib/os-release", root / "etc" / "os-release")
    for name in ("bin", "lib", "lib64", "sbin"):
        if Path("/usr", name).is_dir():
            (root / name).symlink_to(f"usr/{name}")
    subprocess.run(
        ["cp", "-a", "/var/lib/dpkg", str(root / "var/lib/dpkg")], check=True
    )
    (root / "var/lib/apt").mkdir()
    if Path("/var/lib/apt/lists").is_dir():
        subprocess.run(
            ["cp", "-a", "/var/lib/apt/lists", str(root / "var/lib/apt")],
            check=True,
        )
    # The test's own units: the check, and the checks it runs.
    units = root / "etc/systemd/system"
    shutil.copy(HERE / "pdoflowd-systest.service", units)


def _mounted_under(*directories: Path) -> bool:
    mount_points = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    ]
    return any(
        point == str(d) or point.startswith(f"{d}/")
        for point in mount_points
        for d in directories
    )


@pytest.fixture(scope="module")
def postgres(pg_server: Any) -> Iterator[dict[str, str]]:
    """The session's PostgreSQL as the container reaches it (over TCP)."""
    params = conninfo_to_dict(pg_server.dsn())
    host = str(params.get("host", ""))
    if not host or host.startswith("/"):
        _skip(f"the test PostgreSQL is not reachable over TCP ({host!r})")
    database = f"systest_{uuid.uuid4().hex[:8]}"
    yield {
        "admin_dsn": pg_server.dsn(),
        "host": host,
        "port": str(params.get("port", "5432")),
        "user": str(params.get("user", "postgres")),
        "database": database,
    }
    for name in (database, f"{database}_new", f"{database}_empty"):
        devcluster.drop_database(pg_server.dsn(), name)


@pytest.fixture(scope="module")
def container_results(
    request: pytest.FixtureRequest,
) -> Iterator[dict[str, Any]]:
    reason = _not_runnable()
    if reason:
        _skip(reason)
    postgres: dict[str, str] = request.getfixturevalue("postgres")
    # Outside pytest's own temporary directories, which other test runs on
    # the same machine prune: kept after a failure, for its journal.
    work = Path(tempfile.mkdtemp(prefix="pdoflowd-systemd-test-"))
    deb, upgrade, upgraded = _build_packages(work)
    root = work / "root"
    upper = work / "usr-upper"
    out = work / "out"
    for directory in (root, upper, out):
        directory.mkdir()
    _make_root(root)
    systest = root / "opt/systest"
    systest.mkdir()
    for name in ("checks.py", "systest_jobs.py", "systest.conf"):
        shutil.copy(HERE / name, systest)
    debs = root / "opt/debs"
    debs.mkdir()
    shutil.copy(deb, debs / deb.name)
    shutil.copy(upgrade, debs / upgrade.name)
    params = {
        **postgres,
        "dsn": (
            f"host={postgres['host']} port={postgres['port']}"
            f" user={postgres['user']} dbname={postgres['database']}"
        ),
        "secret": f"systest-secret-{uuid.uuid4().hex}",
        "metrics_port": devcluster.free_port(),
        "deb": f"/opt/debs/{deb.name}",
        "deb_upgrade": f"/opt/debs/{upgrade.name}",
        "upgrade_version": upgraded,
    }
    (systest / "params.json").write_text(json.dumps(params, indent=2))
    console = work / "console.log"
    with console.open("wb") as log:
        booted = subprocess.run(
            [
                "timeout",
                "-k",
                "5",
                str(BOOT_TIMEOUT_S),
                "systemd-nspawn",
                "--register=no",
                "--keep-unit",
                "-q",
                "-D",
                str(root),
                f"--overlay=/usr:{upper}:/usr",
                f"--bind={out}:/out",
                "-b",
                "--",
                "systemd.unit=pdoflowd-systest.service",
            ],
            env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    tail = "\n".join(console.read_text(errors="replace").splitlines()[-40:])
    if not (out / "started").exists():
        _skip(
            f"systemd-nspawn could not boot a container (exit"
            f" {booted.returncode}); console:\n{tail}"
        )
    results: dict[str, Any] = {}
    results_file = out / "results.jsonl"
    if results_file.exists():
        for line in results_file.read_text().splitlines():
            entry = json.loads(line)
            results[entry["name"]] = entry
    # The container's root and /usr overlay are big; its output stays. Never
    # delete through a mount nspawn might have left behind (/out is one).
    if not _mounted_under(root, upper):
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(upper, ignore_errors=True)
    results["_console"] = tail
    results["_work"] = str(work)
    results["_timed_out"] = booted.returncode == 124
    yield results
    if all(
        entry.get("ok") for name, entry in results.items() if name[0] != "_"
    ) and len(results) - 3 == len(checks.SCENARIOS):
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("name", [name for name, _ in checks.SCENARIOS])
def test_scenario(container_results: dict[str, Any], name: str) -> None:
    entry = container_results.get(name)
    if entry is None:
        pytest.fail(
            f"{name} did not run (timed out: {container_results['_timed_out']};"
            f" files in {container_results['_work']}); console:\n"
            f"{container_results['_console']}"
        )
    assert entry["ok"], (
        f"{entry['detail']}\n(the whole journal: {container_results['_work']}"
        "/out/journal.txt)"
    )
    print(f"{name}: {entry['detail']} ({entry['seconds']:.1f} s)")
