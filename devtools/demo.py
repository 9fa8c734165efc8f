"""The demo behind ``make demo``: one posting, start to finish, in seconds.

Owns the walk through a daemon's life that ``python -m devtools.demo``
prints (its job is :func:`devtools.demojob.render_frame`): a throwaway
PostgreSQL, a config, ``pdoflowd migrate``, ``pdoflowd run`` as a
subprocess (ready when it says READY=1 on a notify socket, as it would to
systemd), a posting of a few hundred jobs followed until it is finished,
and a stop with SIGTERM; ``pdoflowd web`` runs beside it, its URL printed
(``--web``, behind ``make demo-web``: kept up with the daemon and a
paused posting to resume from the console, until Ctrl-C). It
removes everything it made, on success, error or Ctrl-C alike. Nothing in
the daemon imports it; it must not reach past the client into the queue.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devtools.daemonproc import (
    DaemonExited,
    DaemonProcess,
    NotifySocket,
    NotifyTimeout,
    checkout_environ,
    pdoflowd_command,
    write_config,
)
from devtools.devcluster import LocalCluster, free_port
from devtools.webproc import WebProcess
from pdoflowd.client import Client, PostingState, WaitTimeout
from pdoflowd.status import JobStatus

__all__ = ["ENTRY_POINT", "main"]

# Posted by name, as a program that never imports the job's module would;
# the workers import it by this name. It lives in a module of its own: a
# job must be importable, and this one runs as "__main__".
ENTRY_POINT = "devtools.demojob.render_frame"
FRAMES = 300
WORKERS = 2
SIGMA = 1.5
TRIES = 3
_READY_TIMEOUT_S = 30.0
_READY_POLL_S = 0.1
_POSTING_TIMEOUT_S = 40.0
_STOP_TIMEOUT_S = 15.0
_PROGRESS_INTERVAL_S = 0.5
_DATABASE = "pdoflowd_demo"
# The console's one user, an admin, for the demo only.
WEB_USER = ("demo", "demo")

_print_lock = threading.Lock()


def _say(line: str = "") -> None:
    # The daemon's log is copied from another thread; keep lines whole.
    with _print_lock:
        print(line, flush=True)


def _step(text: str) -> None:
    _say(f"==> {text}")


# ---------------------------------------------------------------- the walk


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


def demo_config(dsn: str, metrics_port: int) -> dict[str, dict[str, Any]]:
    """A config for a short demo: quick polls, short leases."""
    return {
        "database": {"dsn": dsn},
        "workers": {
            "count": WORKERS,
            "batch_size": 10,
            "poll_interval_s": 0.2,
            "drain_timeout_s": 5.0,
        },
        "jobs": {
            "allowed_modules": ["devtools.demojob"],
            "retry_delay_s": 0.2,
            "retry_delay_max_s": 1.0,
        },
        "metrics": {
            "listen": f"127.0.0.1:{metrics_port}",
            "queue_stats_interval_s": 1.0,
            "function_labels": [ENTRY_POINT],
        },
        "daemon": {
            "heartbeat_interval_s": 1.0,
            "host_lease_s": 5.0,
            "maintenance_interval_s": 0.5,
            "log_level": "info",
        },
    }


# The lines of a /metrics scrape worth showing a newcomer.
_SHOWN_METRICS = (
    "pdoflowd_jobs_claimed_total",
    "pdoflowd_jobs_processed_total",
    "pdoflowd_job_duration_seconds_count",
    "pdoflowd_job_duration_seconds_sum",
    "pdoflowd_workers",
    "pdoflowd_queue_jobs",
)


def _show_metrics(port: int) -> None:
    """Print the headline lines of the daemon's /metrics, and /readyz."""
    base = f"http://127.0.0.1:{port}"
    # The queue gauges are refreshed every queue_stats_interval_s (1 s).
    time.sleep(1.2)
    _step(f"GET {base}/metrics (the lines that matter here)")
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as page:  # noqa: S310
        text = page.read().decode()
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        value = line.rsplit(" ", 1)[-1]
        if name in _SHOWN_METRICS and value not in ("0.0", "0"):
            _say(f"    {line}")
    with urllib.request.urlopen(f"{base}/readyz", timeout=10) as page:  # noqa: S310
        _step(f"GET {base}/readyz: {page.status} {page.read().decode()}")


class _Daemon(DaemonProcess):
    """``pdoflowd run`` as a subprocess, its log shown indented.

    It runs in a session of its own, so a Ctrl-C reaches only the demo,
    which then stops it with SIGTERM as systemd would.
    """

    def __init__(self, config_path: Path, notify_path: Path) -> None:
        self.ready_logged = threading.Event()
        super().__init__(
            pdoflowd_command("run", "--config", str(config_path)),
            NotifySocket(notify_path, errors="replace"),
            output=self._show,
            new_session=True,
        )

    def _show(self, line: str) -> None:
        if "] ready: " in line:
            self.ready_logged.set()
        _say(f"    | {line}")

    def ready_status(self, timeout: float) -> str:
        """Wait for READY=1 (or, failing that, the log's "ready:" line).

        Returns the STATUS= text the daemon sent with READY=1.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                ready = self.wait_for("READY=1", _READY_POLL_S)
            except DaemonExited as exited:
                raise DemoError(
                    f"pdoflowd run exited with {exited.code} before ready"
                ) from None
            except NotifyTimeout:
                if self.ready_logged.is_set():
                    return "(no READY=1 seen; the log says ready)"
                if time.monotonic() >= deadline:
                    raise DemoError(
                        f"pdoflowd run was not ready in {timeout:g} s"
                    ) from None
            else:
                return ready.fields.get("STATUS", "")

    def stop(
        self, signum: int = signal.SIGTERM, timeout: float = _STOP_TIMEOUT_S
    ) -> int:
        """SIGTERM, wait for the drain, return the exit status."""
        code = super().stop(signum, timeout)
        if self.killed:
            _step(f"no exit {timeout:g} s after SIGTERM: SIGKILL")
        return code

    def close(self) -> None:
        """Stop the daemon if it still runs; release the socket."""
        if self.running:
            _step("stopping pdoflowd with SIGTERM")
            _step(f"pdoflowd exited with status {self.stop()}")
        super().close()


class _Progress:
    """Prints one line per poll: counts per status and the recent rate."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.last_time = started
        self.last_ended = 0

    def __call__(self, state: PostingState) -> None:
        now = time.monotonic()
        ended = _ended(state)
        rate = (ended - self.last_ended) / max(now - self.last_time, 1e-6)
        self.last_time, self.last_ended = now, ended
        counts = "  ".join(
            f"{s.value} {state.jobs.get(s, 0):>3}" for s in JobStatus
        )
        _say(f"  {now - self.started:5.1f} s  {counts}  {rate:6.0f} jobs/s")


def _ended(state: PostingState) -> int:
    return sum(n for status, n in state.jobs.items() if status.is_final)


def _run_migrate(config_path: Path) -> None:
    migrated = subprocess.run(
        pdoflowd_command("migrate", "--config", str(config_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=checkout_environ(),
        check=False,
        timeout=60,
    )
    for line in migrated.stdout.decode(errors="replace").splitlines():
        _say(f"    | {line}")
    if migrated.returncode != 0:
        raise DemoError(f"pdoflowd migrate exited with {migrated.returncode}")


def _post_and_follow(dsn: str, marks_dir: Path) -> PostingState:
    client = Client(dsn)
    _step(f"posting {FRAMES} jobs: {ENTRY_POINT}(frame, {SIGMA})")
    started = time.monotonic()
    posting = client.post(
        ENTRY_POINT,
        [[frame, SIGMA] for frame in range(FRAMES)],
        [{"marks_dir": str(marks_dir)}] * FRAMES,
        tries=TRIES,
    )
    written = time.monotonic() - started
    _say(f"    posting {posting.id}, written in {written:.2f} s")
    try:
        state = client.wait(
            posting.id,
            timeout=_POSTING_TIMEOUT_S,
            poll_interval=_PROGRESS_INTERVAL_S,
            on_progress=_Progress(started),
        )
    except WaitTimeout as timeout:
        raise DemoError(
            f"the posting did not finish in {_POSTING_TIMEOUT_S:g} s:"
            f" {timeout.state.as_json()['jobs']}"
        ) from None
    elapsed = time.monotonic() - started
    done = state.jobs.get(JobStatus.DONE, 0)
    errored = state.jobs.get(JobStatus.ERRORED_OUT, 0)
    retried = sum(1 for _ in marks_dir.iterdir())
    _step(
        f"posting {state.status.value}: {done} done, {errored} errored_out"
        f" in {elapsed:.1f} s ({_ended(state) / elapsed:.0f} jobs/s)"
    )
    _say(
        f"    {retried} frame(s) failed once and succeeded on a retry"
        " (their failures are in the log above)"
    )
    return state


def _start_web(base_dir: Path, dsn: str) -> WebProcess:
    """``pdoflowd web`` on a free loopback port, with one admin user."""
    sections = {
        "database": {"dsn": dsn},
        "web": {
            "listen": f"127.0.0.1:{free_port()}",
            "users_file": str(base_dir / "web-users"),
            "allow_actions": True,
            "refresh_s": 1.0,
        },
    }
    web = WebProcess(base_dir, sections)
    added = subprocess.run(
        pdoflowd_command(
            "web",
            "--config",
            str(web.config_path),
            "--add-user",
            WEB_USER[0],
            "--admin",
        ),
        input=f"{WEB_USER[1]}\n".encode(),
        capture_output=True,
        env=checkout_environ(),
        check=False,
        timeout=60,
    )
    if added.returncode != 0:
        raise DemoError(f"pdoflowd web --add-user: {added.stderr.decode()}")
    try:
        web.start()
    except RuntimeError as exc:
        raise DemoError(str(exc)) from None
    return web


def _keep_up(dsn: str, web: WebProcess, marks_dir: Path) -> None:
    """Post a paused posting and wait for Ctrl-C, the console up."""
    posting = Client(dsn).post(
        ENTRY_POINT,
        [[frame, SIGMA] for frame in range(FRAMES)],
        [{"marks_dir": str(marks_dir)}] * FRAMES,
        tries=TRIES,
        paused=True,
    )
    _step(
        f"the web console stays up at {web.url}/ (user {WEB_USER[0]},"
        f" password {WEB_USER[1]}): posting {posting.id} waits, paused,"
        " for you to resume it there. Ctrl-C ends the demo."
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _say("")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; 0 when every job is done and the daemon exited 0."""
    keep_web = list(argv or []) == ["--web"]
    if argv and not keep_web:
        print("usage: python -m devtools.demo [--web]", file=sys.stderr)
        return 2
    begun = time.monotonic()
    _say(
        f"pdoflowd demo: a daemon with {WORKERS} workers runs {FRAMES} jobs"
        " on a throwaway PostgreSQL"
    )
    base_dir = Path(tempfile.mkdtemp(prefix="pdoflowd-demo-"))
    cluster: LocalCluster | None = None
    daemon: _Daemon | None = None
    web: WebProcess | None = None
    try:
        cluster = LocalCluster(base_dir / "pg")
        _step(
            f"starting a throwaway PostgreSQL on 127.0.0.1:{cluster.port}"
            f" ({cluster.bin_dir})"
        )
        cluster.init()
        cluster.start()
        dsn = cluster.create_database(_DATABASE)

        config_path = base_dir / "pdoflowd.toml"
        metrics_port = free_port()
        write_config(config_path, demo_config(dsn, metrics_port))
        _step(f"config {config_path}:")
        for line in config_path.read_text().splitlines():
            _say(f"    {line}" if line else "")

        _step(f"pdoflowd migrate --config {config_path}")
        _run_migrate(config_path)

        _step(f"pdoflowd run --config {config_path}")
        started = time.monotonic()
        daemon = _Daemon(config_path, base_dir / "notify.sock")
        pid = daemon.start().pid
        status = daemon.ready_status(_READY_TIMEOUT_S)
        waited = time.monotonic() - started
        _step(f"ready after {waited:.1f} s (pid {pid}): {status}")

        web = _start_web(base_dir, dsn)
        _step(
            f"pdoflowd web: the console is at {web.url}/ while the demo"
            f" runs (user {WEB_USER[0]}, password {WEB_USER[1]})"
        )

        marks_dir = base_dir / "marks"
        marks_dir.mkdir()
        state = _post_and_follow(dsn, marks_dir)

        _show_metrics(metrics_port)
        if keep_web:
            _keep_up(dsn, web, marks_dir)
        _step("stopping pdoflowd web with SIGTERM")
        web.stop()

        _step("stopping pdoflowd with SIGTERM")
        code = daemon.stop()
        _step(f"pdoflowd exited with status {code}")
        if state.jobs.get(JobStatus.DONE, 0) != FRAMES:
            raise DemoError(f"not every job was done: {state.status.value}")
        if code != 0:
            raise DemoError(f"pdoflowd exited with {code} after SIGTERM")
        return 0
    finally:
        # Clean up even after a second Ctrl-C; every step has a time limit.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if web is not None:
                web.stop()
            if daemon is not None:
                daemon.close()
            if cluster is not None:
                _step("stopping PostgreSQL")
                cluster.stop()
            shutil.rmtree(base_dir, ignore_errors=True)
            took = time.monotonic() - begun
            _step(f"removed {base_dir}; the demo took {took:.1f} s")
        finally:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except RuntimeError as error:
        # DemoError, or a PostgreSQL that would not start (devcluster).
        print(f"demo failed: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        sys.exit(130)
