"""The sd_notify lifecycle, read the way systemd reads it.

Each daemon under test gets a real AF_UNIX datagram socket as NOTIFY_SOCKET
(a file path or an abstract ``@name``) with SO_PASSCRED, so every datagram
arrives with its sender's pid: that shows which process spoke, and that no
worker ever does.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.daemonproc import NotifySocket
from harness import Daemon, daemon_config, wait_until, write_config
from pdoflowd.client import Client
from pdoflowd.daemon import notify


@pytest.fixture(params=["path", "abstract"])
def notify_address(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "path":
        return str(tmp_path / "notify.sock")
    return f"@pdoflowd-test-{uuid.uuid4().hex}"


@pytest.fixture
def start(tmp_path: Path, dsn: str) -> Iterator[Any]:
    """Start a daemon whose NOTIFY_SOCKET is one the test reads."""
    running: list[Daemon] = []

    def start(
        address: str | None = None,
        env: dict[str, str] | None = None,
        database: str | None = None,
        **overrides: Any,
    ) -> tuple[Daemon, NotifySocket]:
        address = address or str(tmp_path / f"notify{len(running)}.sock")
        daemon = Daemon(
            tmp_path,
            daemon_config(database or dsn, **overrides),
            env=env,
            name=f"daemon{len(running)}",
            notify=NotifySocket(address),
        )
        running.append(daemon)
        daemon.start()
        return daemon, daemon.notify

    yield start
    for daemon in running:
        daemon.close()


def worker_pids(daemon: Daemon, count: int) -> list[int]:
    return wait_until(
        lambda: len(found := daemon.workers()) == count and found, timeout=30
    )


# -------------------------------------------------------------- pure parts


def test_watchdog_interval_is_none_without_watchdog_usec() -> None:
    assert notify.watchdog_interval({}, 42) is None


def test_watchdog_interval_is_half_the_timeout() -> None:
    assert notify.watchdog_interval({"WATCHDOG_USEC": "400000"}, 42) == 0.2


def test_watchdog_interval_applies_when_watchdog_pid_is_ours() -> None:
    environ = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}
    assert notify.watchdog_interval(environ, 42) == 15.0


def test_watchdog_interval_is_none_when_meant_for_another_pid() -> None:
    environ = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}
    assert notify.watchdog_interval(environ, 42) is None


@pytest.mark.parametrize(
    "environ",
    [
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": ""},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "me"},
    ],
)
def test_watchdog_interval_is_none_for_unusable_values(
    environ: dict[str, str],
) -> None:
    assert notify.watchdog_interval(environ, 42) is None


def test_status_value_keeps_a_message_on_one_line() -> None:
    assert notify.status_value("a: bad\nb: worse\n") == "a: bad; b: worse"


def test_notifier_without_notify_socket_sends_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = notify.Notifier()
    assert not notifier.enabled
    notifier.ready("ignored")


def test_notifier_sends_utf8_status_intact_and_keeps_no_socket(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    listener = NotifySocket(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    notifier = notify.Notifier()
    fds_before = set(os.listdir("/proc/self/fd"))
    notifier.ready("3 workers — ready, 1 µs")
    assert set(os.listdir("/proc/self/fd")) == fds_before
    [message] = listener.poll(1.0)
    assert message.pid == os.getpid()
    assert message.fields == {
        "READY": "1",
        "STATUS": "3 workers — ready, 1 µs",
    }
    listener.close()


def test_notifier_reloading_carries_the_monotonic_clock(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    listener = NotifySocket(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notify.Notifier().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [message] = listener.poll(1.0)
    assert message.fields["RELOADING"] == "1"
    assert before <= int(message.fields["MONOTONIC_USEC"]) <= after
    listener.close()


# -------------------------------------------------------------- the daemon


def test_ready_comes_from_the_main_pid_and_workers_never_speak(
    start: Any, notify_address: str, dsn: str
) -> None:
    daemon, listener = start(notify_address, workers={"count": 2})
    ready = listener.wait_for("READY=1", daemon=daemon)
    workers = worker_pids(daemon, 2)
    client = Client(dsn)
    posting = client.post("jobfns.noop", [[]] * 20)
    client.wait(posting.id, timeout=30, poll_interval=0.05)
    daemon.send(signal.SIGHUP)
    listener.wait_for("RELOADING=1", daemon=daemon)
    assert daemon.stop() == 0
    listener.poll(0.3)
    assert ready.pid == daemon.pid
    senders = {message.pid for message in listener.received}
    assert senders == {daemon.pid}
    assert not senders & set(workers)


def test_status_says_what_it_waits_for_before_ready(
    start: Any, pg_server: Any, pdoflowd_template: str
) -> None:
    name = f"t_late_{uuid.uuid4().hex[:10]}"
    daemon, listener = start(database=pg_server.dsn(name))
    waiting = listener.wait_for(
        "STATUS=waiting for the database", daemon=daemon
    )
    listener.poll(1.5)
    assert not any("READY=1" in m for m in listener.received)
    assert any("EXTEND_TIMEOUT_USEC" in m.fields for m in listener.received)
    pg_server.create_database(name, template=pdoflowd_template)
    try:
        ready = listener.wait_for("READY=1", daemon=daemon)
        before = listener.received[: listener.received.index(ready)]
        assert waiting in before
        assert ready.fields["STATUS"].startswith("2 workers")
        assert daemon.stop() == 0
    finally:
        daemon.close()
        pg_server.drop_database(name)


def test_extend_timeout_while_waiting_is_a_few_seconds_at_a_time(
    start: Any, pg_server: Any
) -> None:
    daemon, listener = start(
        database=pg_server.dsn(f"t_absent_{uuid.uuid4().hex[:10]}")
    )
    listener.wait_for("STATUS=waiting for the database", daemon=daemon)
    listener.poll(2.0)
    extends = [
        int(m.fields["EXTEND_TIMEOUT_USEC"])
        for m in listener.received
        if "EXTEND_TIMEOUT_USEC" in m.fields
    ]
    assert extends
    assert all(0 < usec <= 30_000_000 for usec in extends)
    assert daemon.stop() == 0


def test_sighup_with_a_valid_config_sends_reloading_then_ready(
    start: Any, dsn: str
) -> None:
    daemon, listener = start(workers={"count": 2})
    listener.wait_for("READY=1", daemon=daemon)
    write_config(daemon.config_path, daemon_config(dsn, workers={"count": 3}))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    daemon.send(signal.SIGHUP)
    reloading = listener.wait_for("RELOADING=1", daemon=daemon)
    assert int(reloading.fields["MONOTONIC_USEC"]) >= before
    ready = listener.wait_for("READY=1", daemon=daemon, after=reloading)
    assert ready.fields["STATUS"]
    assert reloading.pid == ready.pid == daemon.pid
    worker_pids(daemon, 3)
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_sighup_with_an_invalid_config_keeps_running_and_names_the_error(
    start: Any, dsn: str
) -> None:
    daemon, listener = start(workers={"count": 2})
    listener.wait_for("READY=1", daemon=daemon)
    workers = worker_pids(daemon, 2)
    write_config(daemon.config_path, daemon_config(dsn, workers={"count": 0}))
    daemon.send(signal.SIGHUP)
    reloading = listener.wait_for("RELOADING=1", daemon=daemon)
    answer = listener.wait_for("READY=1", daemon=daemon, after=reloading)
    assert "workers.count" in answer.fields["STATUS"]
    assert "refused" in answer.fields["STATUS"]
    time.sleep(0.5)
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert daemon.workers() == workers


def test_sigterm_sends_stopping_and_extends_only_within_the_drain_budget(
    start: Any,
) -> None:
    daemon, listener = start(workers={"count": 2, "drain_timeout_s": 4.0})
    listener.wait_for("READY=1", daemon=daemon)
    daemon.send(signal.SIGTERM)
    stopping = listener.wait_for("STOPPING=1", daemon=daemon)
    assert "drain" in stopping.fields["STATUS"]
    assert daemon.wait() == 0
    listener.poll(0.3)
    extends = [
        int(m.fields["EXTEND_TIMEOUT_USEC"])
        for m in listener.after(stopping)
        if "EXTEND_TIMEOUT_USEC" in m.fields
    ]
    # The budget plus a few seconds for the supervisor's own shutdown.
    assert all(usec <= (4.0 + 10) * 1_000_000 for usec in extends)
    assert stopping.pid == daemon.pid


def test_watchdog_pings_arrive_when_the_watchdog_is_meant_for_us(
    start: Any,
) -> None:
    daemon, listener = start(env={"WATCHDOG_USEC": "400000"})
    listener.wait_for("READY=1", daemon=daemon)
    listener.poll(1.6)
    pings = [m for m in listener.received if "WATCHDOG=1" in m]
    assert len(pings) >= 4
    assert {m.pid for m in pings} == {daemon.pid}


def test_no_watchdog_pings_when_watchdog_pid_names_another_process(
    start: Any,
) -> None:
    daemon, listener = start(
        env={"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}
    )
    listener.wait_for("READY=1", daemon=daemon)
    listener.poll(1.6)
    assert not any("WATCHDOG=1" in m for m in listener.received)


def test_invalid_config_exits_78_with_a_status_naming_the_key(
    start: Any,
) -> None:
    daemon, listener = start(workers={"count": 0})
    assert daemon.wait() == 78
    listener.poll(0.3)
    statuses = [m.fields.get("STATUS", "") for m in listener.received]
    assert any("workers.count" in status for status in statuses)
    assert not any("READY=1" in m for m in listener.received)


def test_schema_not_current_exits_4_without_ready(
    start: Any, empty_dsn: str
) -> None:
    daemon, listener = start(database=empty_dsn)
    assert daemon.wait() == 4
    listener.poll(0.3)
    assert not any("READY=1" in m for m in listener.received)
