"""The peer queues' own virtual environment, made on demand.

Owns ``.bench-peers/venv`` at the top of the checkout (not tracked): made
with ``python -m venv`` from the interpreter running the benchmark, holding
the pinned PgQueuer and procrastinate and the drivers they run on, and
reused as long as it holds exactly those pins. The peers are never a
dependency of pdoflowd: nothing of them goes into pdoflowd's ``.venv``, and
nothing of pdoflowd or of ``bench`` goes into this one; the driver scripts
next to this module run under its Python as subprocesses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
VENV_DIR = REPO_ROOT / ".bench-peers" / "venv"
PYTHON = VENV_DIR / "bin" / "python"

# What is installed, pinned. PgQueuer runs on asyncpg (its ``asyncpg``
# extra; uvloop comes with it); procrastinate on psycopg 3, here with the
# same prebuilt C implementation and version as pdoflowd's ``.venv``.
PINS = {
    "pgqueuer": "1.6.0",
    "procrastinate": "3.10.0",
    "asyncpg": "0.32.0",
    "psycopg": "3.3.9",
}
_REQUIREMENTS = [
    f"pgqueuer[asyncpg]=={PINS['pgqueuer']}",
    f"procrastinate=={PINS['procrastinate']}",
    f"asyncpg=={PINS['asyncpg']}",
    f"psycopg[binary]=={PINS['psycopg']}",
]
# Reported next to the figures, pinned or not.
_REPORTED = [*PINS, "psycopg-pool", "uvloop"]

_VERSIONS = """
import importlib.metadata, json, platform, sys
found = {}
for name in sys.argv[1:]:
    try:
        found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        found[name] = None
try:
    import psycopg
    found["psycopg_impl"] = psycopg.pq.__impl__
except ImportError:
    found["psycopg_impl"] = None
found["python"] = platform.python_version()
print(json.dumps(found))
"""


def installed_versions() -> dict[str, str | None] | None:
    """The versions in the peers' environment, or None if it has none."""
    if not PYTHON.exists():
        return None
    done = subprocess.run(
        [str(PYTHON), "-c", _VERSIONS, *_REPORTED],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if done.returncode != 0:
        return None
    versions: dict[str, str | None] = json.loads(done.stdout)
    return versions


def _pinned(versions: dict[str, str | None] | None) -> bool:
    return versions is not None and all(
        versions.get(name) == version for name, version in PINS.items()
    )


def ensure(say: Callable[[str], None] = print) -> dict[str, str | None]:
    """Make or refresh the environment if needed; return its versions.

    ``say`` receives one line of progress when something is installed.
    """
    versions = installed_versions()
    if _pinned(versions):
        assert versions is not None
        return versions
    say(f"installing {' '.join(_REQUIREMENTS)} into {VENV_DIR}")
    subprocess.run(
        [sys.executable, "-m", "venv", "--clear", str(VENV_DIR)],
        check=True,
        timeout=300,
    )
    subprocess.run(
        [
            str(PYTHON),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *_REQUIREMENTS,
        ],
        check=True,
        timeout=1200,
    )
    versions = installed_versions()
    if not _pinned(versions):
        raise RuntimeError(f"{VENV_DIR} does not hold {PINS}: {versions}")
    assert versions is not None
    return versions
