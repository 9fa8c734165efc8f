"""The supervisor: the ``pdoflowd run`` main process and its one loop.

Owns the worker pool's life: forking workers (holding no database connection
and no thread while it forks), reaping them the moment they exit, taking
back exactly the jobs a dead worker held, refilling slots with backoff,
enforcing job timeouts and draining on SIGTERM. Its database work (LISTEN,
heartbeat, rescue, settling, taking jobs back) lives in the database
session, a process of its own (see dbsession): the supervisor holds no
database connection, so nothing PostgreSQL or the network does can stall
its loop. Signal handlers only write to a wake-up pipe; a single
``selectors`` loop waits on that pipe, the workers' report pipes, the
session's pipe and the HTTP sockets, and dispatches a ``handle_<signal>``
method per signal. It writes its pulse on every pass, and measures each
pass. It must not run jobs or touch the database.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import logging
import os
import random
import selectors
import signal
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdoflowd import __version__, policy
from pdoflowd.config import (
    Config,
    ConfigError,
    MetricsConfig,
)
from pdoflowd.daemon import metrics, worker
from pdoflowd.daemon.httpserver import EndpointError, HttpServer, tls_context
from pdoflowd.daemon.notify import Notifier
from pdoflowd.daemon.scoreboard import Scoreboard, WorkerState
from pdoflowd.daemon.session import Event, SessionEvent, SessionHandle
from pdoflowd.exitcodes import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_SCHEMA

log = logging.getLogger("pdoflowd.daemon.supervisor")


_TICK_S = 0.1
_STATUS_INTERVAL_S = 1.0
_SCOREBOARD_SLOTS = 1024
_HANDLED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGCHLD,
)


class StopMode(enum.Enum):
    GRACEFUL = "graceful"
    FAST = "fast"


@dataclass
class WorkerHandle:
    """The supervisor's view of one live worker process."""

    slot: int
    pid: int
    wake_fd: int
    report_fd: int
    generation: int
    started: float
    ready: bool = False
    retiring: str | None = None
    boot_error: str | None = None
    kill_reason: str | None = None
    kill_at: float = 0.0
    timed_out_job: int | None = None
    cancelled_job: int | None = None
    report_buffer: bytes = b""


@dataclass(frozen=True)
class Takeback:
    """How to count the jobs taken back from a worker that ended."""

    outcome: str = "worker_died"
    running_s: float | None = None


@dataclass
class Slot:
    """A place in the pool, kept across the workers that fill it."""

    index: int
    worker_pid: int | None = None
    consecutive_crashes: int = 0
    next_spawn_at: float = 0.0


class Supervisor:
    """Forks, watches and replaces workers; the daemon's main loop."""

    def __init__(
        self,
        config: Config,
        password: str | None,
        *,
        notifier: Notifier | None = None,
        reload_config: Callable[[], tuple[Config, str | None]] | None = None,
    ) -> None:
        self.config = config
        self.password = password
        self.notifier = notifier or Notifier()
        self.reload_config = reload_config
        self.daemon_id = uuid.uuid4()
        self.hostname = socket.gethostname()
        self.scoreboard = Scoreboard(_SCOREBOARD_SLOTS)
        self.selector = selectors.DefaultSelector()
        self.workers: dict[int, WorkerHandle] = {}
        self.slots = [Slot(i) for i in range(config.workers.count)]
        self.generation = 0
        self.session = SessionHandle()
        self.session_crashes = 0
        self.session_start_at = 0.0
        self.session_restart = False
        self.schema_problem: str | None = None
        # How to count each take-back asked of the session, by its number.
        self.takebacks: dict[int, Takeback] = {}
        self.stop_mode: StopMode | None = None
        self.stop_deadline = 0.0
        self.exit_code = EXIT_OK
        self.announced_ready = False
        self.crash_times: list[float] = []
        self.next_watchdog = 0.0
        self.next_status = 0.0
        self.last_status = ""
        self.metrics = metrics.PoolMetrics(
            version=__version__,
            function_labels=config.metrics.function_labels,
        )
        self.http: HttpServer | None = None
        self.rng = random.Random()
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Run until stopped; return the process exit code."""
        self.install_signal_handlers()
        self.selector.register(self._signal_r, selectors.EVENT_READ, "signal")
        try:
            if not self.open_endpoint():
                return self.exit_code
            if not self.start_database():
                return self.exit_code
            self.loop()
        finally:
            self.stop_session()
            if self.http is not None:
                self.http.close()
            self.selector.close()
        return self.exit_code

    def open_endpoint(self) -> bool:
        """Serve /metrics, /livez and /readyz from this loop, if enabled."""
        settings = self.config.metrics
        if not settings.enabled:
            return True
        try:
            context = _tls(settings)
        except EndpointError as exc:
            log.error("metrics endpoint: %s", exc)
            self.exit_code = EXIT_CONFIG
            return False
        endpoint = metrics.MetricsEndpoint(
            self.metrics, self.readiness, self.refresh_worker_gauges
        )
        try:
            self.http = HttpServer(
                self.selector,
                settings.host,
                settings.port,
                endpoint,
                tls=context,
            )
        except EndpointError as exc:
            log.error("metrics endpoint: %s", exc)
            self.exit_code = EXIT_FAILURE
            return False
        host, port = self.http.address
        log.info("metrics endpoint on %s:%d", host, port)
        return True

    def readiness(self) -> metrics.Readiness:
        return metrics.readiness(
            started=self.announced_ready,
            draining=self.stop_mode is not None,
            live_workers=sum(1 for h in self.workers.values() if h.ready),
            database_reachable=self.session.connected,
        )

    def refresh_worker_gauges(self) -> None:
        self.metrics.set_workers(
            (h.slot, h.pid, self.scoreboard.read(h.slot).state.name.lower())
            for h in self.workers.values()
        )

    def start_database(self) -> bool:
        """Start the database session; wait until it has connected and
        found the schema current, before any worker is forked."""
        self.notifier.status("waiting for the database")
        self.start_session()
        while self.stop_mode is None:
            if self.session.connected:
                self.notifier.status(f"starting {len(self.slots)} workers")
                return True
            if self.schema_problem is not None:
                self.notifier.status(self.schema_problem)
                self.exit_code = EXIT_SCHEMA
                return False
            self.notifier.extend_timeout(5)
            self.wait_for_signals(0.5)
        return False

    def wait_for_signals(self, seconds: float) -> None:
        """Serve signals, the endpoint and the session for a while."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.scoreboard.beat()
            for key, events in self.selector.select(min(left, _TICK_S)):
                self.dispatch(key, events)
            if self.http is not None:
                self.http.expire()
            self.reap()
            self.keep_session()
            if self.stop_mode is not None:
                return

    def start_session(self) -> None:
        """Fork the database session (no connection lives here to share)."""
        self.scoreboard.beat()
        pid = self.session.start(
            daemon_id=self.daemon_id,
            hostname=self.hostname,
            config=self.config,
            password=self.password,
            scoreboard=self.scoreboard,
            inherited_fds=self.parent_fds(),
        )
        self.selector.register(
            self.session.event_fd, selectors.EVENT_READ, "session"
        )
        log.debug("database session %d started", pid)

    def keep_session(self) -> None:
        """Restart the session if it ended and the daemon goes on."""
        if self.session.pid is not None or self.stop_mode is not None:
            return
        if time.monotonic() >= self.session_start_at:
            self.start_session()

    def restart_session(self) -> None:
        """End the session, so that a new one starts on the current config
        and password (what it was asked and did not finish is asked of the
        new one)."""
        if self.session.pid is not None:
            self.session_restart = True
            self.signal_worker(self.session.pid, signal.SIGTERM)

    def session_exited(self, status: int) -> None:
        # Unregistered by the number kept: the pipe is closed next, and a
        # new one may get the same number.
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.session.event_fd)
        self.on_session_events(self.session.ended())
        if self.stop_mode is not None:
            return
        if self.session_restart:
            self.session_restart = False
            self.session_start_at = time.monotonic()
            return
        self.session_crashes += 1
        delay = policy.respawn_delay(
            self.session_crashes,
            self.config.daemon.respawn_delay_s,
            self.config.daemon.respawn_delay_max_s,
            self.rng.random(),
        )
        log.warning(
            "database session ended (wait status %d); starting another in "
            "%.1f s",
            status,
            delay,
        )
        self.session_start_at = time.monotonic() + delay

    def stop_session(self) -> None:
        """Let the session write what it was asked and mark this daemon
        stopped, within the drain budget (at least a few seconds)."""
        if self.session.pid is None:
            return
        self.session.stop()
        budget = max(5.0, self.stop_deadline - time.monotonic())
        deadline = time.monotonic() + budget
        while self.session.pid is not None and time.monotonic() < deadline:
            for key, events in self.selector.select(_TICK_S):
                self.dispatch(key, events)
            if self.http is not None:
                self.http.expire()
            self.session.flush()
            self.reap()
        if self.session.pid is not None:
            log.warning(
                "database session did not finish within %.0f s; ending it",
                budget,
            )
            self.signal_worker(self.session.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.session.pid, 0)
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.session.event_fd)
            self.on_session_events(self.session.ended())

    def on_session_events(self, events: list[SessionEvent]) -> None:
        for event in events:
            fields = event.fields
            if event.kind is Event.CONNECTED:
                self.session_crashes = 0
                self.schema_problem = None
                self.wake_idle_workers()
            elif event.kind is Event.SCHEMA_NOT_CURRENT:
                self.schema_problem = str(fields.get("message"))
            elif event.kind is Event.NOTIFIED:
                self.wake_idle_workers()
            elif event.kind is Event.DB_ERROR:
                self.metrics.count_db_error(str(fields.get("operation")))
            elif event.kind is Event.TAKEN_BACK:
                self.taken_back(fields)
            elif event.kind is Event.RESCUED:
                self.metrics.count_taken_back(
                    running=int(fields.get("running", 0)),
                    released=int(fields.get("released", 0)),
                )
                if fields.get("waiting"):
                    self.wake_idle_workers()
            elif event.kind is Event.QUEUE:
                self.metrics.set_queue(
                    dict(fields.get("counts") or {}), fields.get("oldest")
                )
            elif event.kind is Event.CANCELLED:
                self.end_cancelled_jobs(set(fields.get("jobs") or ()))
            elif event.kind is Event.CLAIMS_CANCELLED:
                self.check_claims(set(fields.get("owners") or ()))

    def taken_back(self, fields: dict[str, Any]) -> None:
        takeback = self.takebacks.pop(int(fields.get("seq", -1)), Takeback())
        running = int(fields.get("running", 0))
        self.metrics.count_taken_back(
            running=running,
            released=int(fields.get("released", 0)),
            outcome=takeback.outcome,
            duration_s=takeback.running_s if running else None,
        )
        if fields.get("waiting"):
            self.wake_idle_workers()

    # ------------------------------------------------------------ signals

    def install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._signal_w, warn_on_full_buffer=False)
        for signum in _HANDLED_SIGNALS:
            signal.signal(signum, _note_signal)

    def dispatch_signals(self) -> None:
        try:
            data = os.read(self._signal_r, 4096)
        except BlockingIOError:
            return
        for number in data:
            name = signal.Signals(number).name.lower()
            handler = getattr(self, f"handle_{name}", None)
            if handler is not None:
                handler()

    def handle_sigterm(self) -> None:
        self.begin_stop(StopMode.GRACEFUL)

    def handle_sigint(self) -> None:
        self.begin_stop(StopMode.FAST)

    handle_sigquit = handle_sigint

    def handle_sigchld(self) -> None:
        self.reap()

    def handle_sighup(self) -> None:
        if self.stop_mode is not None or self.reload_config is None:
            return
        self.notifier.reloading()
        try:
            new, password = self.reload_config()
        except ConfigError as exc:
            problems = "; ".join(f"{p.key}: {p.message}" for p in exc.problems)
            log.error(
                "reload refused, keeping the running config: %s", problems
            )
            self.metrics.config_reloaded(False)
            self.notifier.ready(f"reload refused: {problems}")
            return
        try:
            context = _tls(new.metrics)
        except EndpointError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            self.metrics.config_reloaded(False)
            self.notifier.ready(f"reload refused: metrics endpoint: {exc}")
            return
        if new.metrics.listen != self.config.metrics.listen:
            log.warning(
                "metrics.listen changed; the endpoint moves at the next start"
            )
        if self.http is not None:
            self.http.set_tls(context)
        self.metrics.set_function_labels(new.metrics.function_labels)
        # Workers forked from now on, and the next connection of our own,
        # log in with the password as it reads now (a rotated file).
        self.password = password
        self.apply_config(new)
        self.restart_session()
        self.metrics.config_reloaded(True)
        self.notifier.ready(self.status_text())

    def add_slot(self) -> None:
        """Grow the pool by one, on a scoreboard slot nobody uses."""
        used = {s.index for s in self.slots} | {
            h.slot for h in self.workers.values()
        }
        index = next(i for i in range(_SCOREBOARD_SLOTS) if i not in used)
        self.slots.append(Slot(index))

    def handle_sigttin(self) -> None:
        if self.stop_mode is None and len(self.slots) < _SCOREBOARD_SLOTS // 2:
            self.add_slot()
            log.info("one worker more: %d", len(self.slots))

    def handle_sigttou(self) -> None:
        if self.stop_mode is None and len(self.slots) > 1:
            slot = self.slots.pop()
            log.info("one worker fewer: %d", len(self.slots))
            if slot.worker_pid is not None:
                self.signal_worker(slot.worker_pid, signal.SIGTERM)

    def apply_config(self, new: Config) -> None:
        """Adopt a reloaded config and roll the workers onto it."""
        self.config = new
        self.generation += 1
        count = new.workers.count
        while len(self.slots) < count:
            self.add_slot()
        while len(self.slots) > count:
            slot = self.slots.pop()
            if slot.worker_pid is not None:
                self.signal_worker(slot.worker_pid, signal.SIGTERM)
        log.info("config reloaded: %d workers, rolling them onto it", count)

    def roll_workers(self) -> None:
        """Replace workers of an older generation, one at a time."""
        if self.stop_mode is not None:
            return
        stale = [
            h for h in self.workers.values() if h.generation < self.generation
        ]
        if not stale or any(h.retiring == "reload" for h in stale):
            return
        if any(not h.ready for h in self.workers.values()):
            return
        handle = min(stale, key=lambda h: h.slot)
        handle.retiring = "reload"
        self.signal_worker(handle.pid, signal.SIGTERM)

    def begin_stop(self, mode: StopMode) -> None:
        if self.stop_mode is StopMode.FAST or self.stop_mode is mode:
            return
        self.stop_mode = mode
        now = time.monotonic()
        if mode is StopMode.GRACEFUL:
            budget = self.config.workers.drain_timeout_s
            self.stop_deadline = now + budget
            log.info("draining: running jobs may finish within %g s", budget)
            self.notifier.stopping(f"draining {self.busy_count()} running jobs")
            self.notifier.extend_timeout(budget + 5)
            for handle in self.workers.values():
                self.signal_worker(handle.pid, signal.SIGTERM)
        else:
            self.stop_deadline = now
            log.info("fast stop: killing running jobs")
            self.notifier.stopping("fast stop")
        self.enforce_stop_deadline()

    def enforce_stop_deadline(self) -> None:
        if self.stop_mode is None or time.monotonic() < self.stop_deadline:
            return
        for handle in self.workers.values():
            if handle.kill_reason is None:
                handle.kill_reason = (
                    "daemon stopped fast: job killed"
                    if self.stop_mode is StopMode.FAST
                    else "drain budget exceeded: job killed after "
                    f"{self.config.workers.drain_timeout_s:g} s"
                )
                self.signal_worker(handle.pid, signal.SIGKILL)

    # ------------------------------------------------------------ the loop

    def loop(self) -> None:
        while True:
            self.spawn_due_workers()
            if self.stop_mode is not None and not self.workers:
                return
            ready = self.selector.select(_TICK_S)
            began = time.monotonic()
            self.scoreboard.beat()
            for key, events in ready:
                self.dispatch(key, events)
            if self.http is not None:
                self.http.expire()
            self.reap()
            self.enforce_timeouts()
            self.enforce_stop_deadline()
            self.roll_workers()
            self.keep_session()
            self.session.flush()
            self.periodic_chores()
            self.update_readiness()
            self.metrics.observe_loop_tick(time.monotonic() - began)

    def dispatch(self, key: selectors.SelectorKey, events: int) -> None:
        """Hand one ready file to its owner."""
        if key.data == "signal":
            self.dispatch_signals()
        elif key.data == "session":
            self.on_session_events(self.session.read())
        elif isinstance(key.data, int):
            self.read_report(key.data)
        elif self.http is not None:
            self.http.handle(key, events)

    def periodic_chores(self) -> None:
        now = time.monotonic()
        if self.notifier.watchdog_s and now >= self.next_watchdog:
            if self.healthy():
                self.notifier.watchdog()
            self.next_watchdog = now + self.notifier.watchdog_s
        if self.stop_mode is not None and now >= self.next_status:
            self.next_status = now + _STATUS_INTERVAL_S
            left = max(0.0, self.stop_deadline - now)
            self.notifier.status(
                f"draining: {self.busy_count()} jobs running, {left:.0f} s left"
            )
        elif self.announced_ready and now >= self.next_status:
            self.next_status = now + _STATUS_INTERVAL_S
            text = self.status_text()
            if text != self.last_status:
                self.last_status = text
                self.notifier.status(text)

    def healthy(self) -> bool:
        return self.stop_mode is None or bool(self.workers)

    def busy_count(self) -> int:
        return sum(
            1
            for h in self.workers.values()
            if self.scoreboard.read(h.slot).state is WorkerState.RUNNING
        )

    def status_text(self) -> str:
        ready = sum(1 for h in self.workers.values() if h.ready)
        return (
            f"{ready} workers, {self.busy_count()} busy, "
            f"{self.metrics.processed('done'):,} jobs done"
        )

    def update_readiness(self) -> None:
        if self.announced_ready or self.stop_mode is not None:
            return
        ready = [h for h in self.workers.values() if h.ready]
        if self.session.connected and len(ready) >= len(self.slots):
            self.announced_ready = True
            log.info(
                "ready: %d workers (daemon %s)", len(ready), self.daemon_id
            )
            self.notifier.ready(self.status_text())

    # ------------------------------------------------------------ workers

    def spawn_due_workers(self) -> None:
        if self.stop_mode is not None or self.schema_problem is not None:
            return
        now = time.monotonic()
        due = [
            s
            for s in self.slots
            if s.worker_pid is None and s.next_spawn_at <= now
        ]
        # Fork safety: the supervisor holds no database connection at all.
        for slot in due:
            self.spawn(slot)

    def spawn(self, slot: Slot) -> None:
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC)
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        os.set_blocking(report_r, False)
        spec = worker.WorkerSpec(
            slot=slot.index,
            daemon_id=self.daemon_id,
            config=self.config,
            password=self.password,
            scoreboard=self.scoreboard,
            wake_fd=wake_r,
            report_fd=report_w,
            parent_pid=os.getpid(),
            inherited_fds=(*self.parent_fds(), wake_w, report_r),
        )
        # Resets the slot whatever its last worker left there.
        self.scoreboard.write(slot.index, pid=0, state=WorkerState.BOOTING)
        pid = os.fork()
        if pid == 0:
            worker.main(spec)
        os.close(wake_r)
        os.close(report_w)
        handle = WorkerHandle(
            slot=slot.index,
            pid=pid,
            wake_fd=wake_w,
            report_fd=report_r,
            generation=self.generation,
            started=time.monotonic(),
        )
        self.workers[pid] = handle
        slot.worker_pid = pid
        self.selector.register(report_r, selectors.EVENT_READ, pid)
        log.debug("worker %d started in slot %d", pid, slot.index)

    def parent_fds(self) -> tuple[int, ...]:
        """The supervisor's own files, which a forked child must close."""
        fds = [self._signal_r, self._signal_w, self.selector_fd()]
        for other in self.workers.values():
            fds += [other.wake_fd, other.report_fd]
        fds += self.session.fds()
        if self.http is not None:
            fds += self.http.fds()
        return tuple(fd for fd in fds if fd >= 0)

    def selector_fd(self) -> int:
        fileno = getattr(self.selector, "fileno", None)
        return int(fileno()) if fileno is not None else -1

    def signal_worker(self, pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def wake_idle_workers(self) -> None:
        for handle in self.workers.values():
            state = self.scoreboard.read(handle.slot).state
            if state is WorkerState.IDLE:
                with contextlib.suppress(BlockingIOError, BrokenPipeError):
                    os.write(handle.wake_fd, b"\0")

    def read_report(self, pid: int) -> bool:
        """Read what a worker sent; False when nothing more is there."""
        handle = self.workers.get(pid)
        if handle is None:
            return False
        try:
            data = os.read(handle.report_fd, 65536)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
            data = b""
        if not data:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(handle.report_fd)
            return False
        handle.report_buffer += data
        *lines, handle.report_buffer = handle.report_buffer.split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                log.warning("unreadable report from worker %d", pid)
                continue
            self.on_report(handle, message)
        return True

    def on_report(self, handle: WorkerHandle, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "ready":
            handle.ready = True
        elif event == "boot_failed":
            handle.boot_error = str(message.get("reason"))
        elif event == "retiring":
            handle.retiring = str(message.get("reason"))
        elif event in metrics.REPORT_EVENTS:
            try:
                self.metrics.apply_worker_report(message)
            except ValueError as exc:
                log.warning("bad report from worker %d: %s", handle.pid, exc)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            handle = self.workers.get(pid)
            if handle is not None:
                self.worker_exited(handle, status)
            elif pid == self.session.pid:
                self.session_exited(status)

    def worker_exited(self, handle: WorkerHandle, status: int) -> None:
        # Its last lines (counts of outcomes it wrote) must not be lost.
        while self.read_report(handle.pid):
            pass
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(handle.report_fd)
        os.close(handle.report_fd)
        os.close(handle.wake_fd)
        del self.workers[handle.pid]
        view = self.scoreboard.read(handle.slot)
        running = view.job_id if view.state is WorkerState.RUNNING else None
        if not view.consistent:
            # Killed inside a write of its slot: what was read may be torn.
            # The owner token is still worth a try; a wrong one changes
            # nothing, and the sweep of ownerless jobs does the rest.
            log.warning("worker %d left its slot half written", handle.pid)
        slot = next((s for s in self.slots if s.worker_pid == handle.pid), None)
        if slot is not None:
            slot.worker_pid = None
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        reason = handle.kill_reason or policy.describe_exit(status)
        if handle.boot_error:
            reason = f"worker could not start: {handle.boot_error}"
        if clean:
            running = None
            log.info(
                "worker %d (slot %d) exited%s",
                handle.pid,
                handle.slot,
                f" to retire ({handle.retiring})" if handle.retiring else "",
            )
        else:
            log.warning(
                "worker %d (slot %d): %s%s",
                handle.pid,
                handle.slot,
                reason,
                f" while running job {running}" if running else "",
            )
        timed_out = handle.timed_out_job is not None
        if view.owner is not None:
            request = self.session.take_back(view.owner, running, reason)
            self.takebacks[request.seq] = Takeback(
                outcome="timeout" if timed_out else "worker_died",
                running_s=None
                if running is None
                else time.monotonic() - view.started,
            )
        # Cleared after the owner token was read and sent for taking back.
        self.scoreboard.clear(handle.slot)
        if slot is not None:
            self.plan_respawn(slot, handle, clean)

    def plan_respawn(
        self, slot: Slot, handle: WorkerHandle, clean: bool
    ) -> None:
        now = time.monotonic()
        label = handle.retiring or ("timeout" if handle.timed_out_job else None)
        if handle.cancelled_job is not None:
            label = "cancelled"
        ended_on_purpose = (
            handle.timed_out_job is not None or handle.cancelled_job is not None
        )
        if clean or ended_on_purpose:
            slot.consecutive_crashes = 0
            slot.next_spawn_at = now
            self.count_restart(label or "exited")
            return
        daemon = self.config.daemon
        if now - handle.started >= daemon.healthy_uptime_s:
            slot.consecutive_crashes = 0
        slot.consecutive_crashes += 1
        self.crash_times.append(now)
        self.count_restart("boot_failed" if handle.boot_error else "crashed")
        slot.next_spawn_at = now + policy.respawn_delay(
            slot.consecutive_crashes,
            daemon.respawn_delay_s,
            daemon.respawn_delay_max_s,
            self.rng.random(),
        )
        if self.stop_mode is None and policy.is_crash_loop(
            self.crash_times,
            now,
            daemon.crash_loop_max,
            daemon.crash_loop_window_s,
        ):
            log.error(
                "crash loop: %d worker crashes within %g s; stopping so the "
                "service manager can restart the daemon",
                daemon.crash_loop_max,
                daemon.crash_loop_window_s,
            )
            self.exit_code = EXIT_FAILURE
            self.begin_stop(StopMode.FAST)

    def count_restart(self, reason: str) -> None:
        self.metrics.count_worker_restart(reason)

    def enforce_timeouts(self) -> None:
        """TERM a worker whose job overran; KILL it if it is still in it.

        SIGTERM past a job's deadline raises inside the job, so a worker
        running Python code records the timeout itself and carries on; one
        stuck in C code is killed after the grace period.
        """
        now = time.monotonic()
        grace = self.config.jobs.timeout_grace_s
        for handle in self.workers.values():
            view = self.scoreboard.read(handle.slot)
            running = view.job_id if view.state is WorkerState.RUNNING else None
            if handle.timed_out_job is not None:
                if running != handle.timed_out_job:
                    handle.timed_out_job = None
                    handle.kill_reason = None
                elif now >= handle.kill_at:
                    handle.kill_at = float("inf")
                    self.signal_worker(handle.pid, signal.SIGKILL)
                continue
            if (
                running is not None
                and view.deadline
                and now >= view.deadline
                and handle.kill_reason is None
            ):
                limit = view.deadline - view.started
                handle.timed_out_job = running
                handle.kill_reason = f"timeout after {limit:g} s"
                handle.kill_at = now + grace
                self.signal_worker(handle.pid, signal.SIGTERM)

    def check_claims(self, owners: set[str]) -> None:
        """Ask the workers holding claims a cancel ended to check them before
        their next job starts (worker.CLAIMS_SIGNAL)."""
        for handle in self.workers.values():
            owner = self.scoreboard.read(handle.slot).owner
            if owner is not None and str(owner) in owners:
                self.signal_worker(handle.pid, worker.CLAIMS_SIGNAL)

    def end_cancelled_jobs(self, cancelled: set[int]) -> None:
        """KILL the workers running a job whose posting was cancelled.

        The cancel has ended the job in the database already (a late outcome
        of it is fenced off); ending the process stops the work itself.
        """
        for handle in self.workers.values():
            view = self.scoreboard.read(handle.slot)
            if (
                view.state is not WorkerState.RUNNING
                or view.job_id not in cancelled
                or handle.kill_reason is not None
            ):
                continue  # not running it (any more), or ending already
            handle.cancelled_job = view.job_id
            handle.kill_reason = "cancelled"
            log.info(
                "ending worker %d: its job %d was cancelled",
                handle.pid,
                view.job_id,
            )
            self.signal_worker(handle.pid, signal.SIGKILL)


def _note_signal(signum: int, frame: object) -> None:
    """Handlers only wake the loop (through the wake-up fd); it acts."""


def _tls(settings: MetricsConfig) -> ssl.SSLContext | None:
    """The endpoint's TLS context, or None for plain HTTP."""
    if settings.tls_cert_file is None:
        return None
    return tls_context(
        settings.tls_cert_file,
        settings.tls_key_file,
        settings.tls_client_ca_file,
    )
