"""The supervisor: the ``pdoflowd run`` main process and its one loop.

Owns the worker pool's life: forking workers (holding no database connection
and no thread while it forks), reaping them the moment they exit, taking
back exactly the jobs a dead worker held, refilling slots with backoff,
enforcing job timeouts, draining on SIGTERM, and its own database chores
(LISTEN for new jobs, heartbeat, rescue of lost hosts, settling postings).
Signal handlers only write to a wake-up pipe; a single ``selectors`` loop
waits on that pipe, the workers' report pipes and the LISTEN socket, and
dispatches a ``handle_<signal>`` method per signal. It must not run jobs.
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

import psycopg

from pdoflowd import __version__, metrics, policy, queries, worker
from pdoflowd.config import (
    EX_CONFIG,
    Config,
    ConfigError,
    MetricsConfig,
    connection_kwargs,
)
from pdoflowd.httpserver import EndpointError, HttpServer, tls_context
from pdoflowd.migrate import SchemaNotCurrent, check_current
from pdoflowd.notify import Notifier
from pdoflowd.scoreboard import Scoreboard, WorkerState
from pdoflowd.status import JobStatus

log = logging.getLogger("pdoflowd.supervisor")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_SCHEMA = 4

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
    owner: uuid.UUID
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
    """Jobs to take back from a worker that ended, until it is done."""

    owner: uuid.UUID
    running: int | None
    reason: str
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
        self.conn: psycopg.Connection[Any] | None = None
        self.listen_fd = -1
        self.db_retry_at = 0.0
        self.db_delay = 0.5
        self.connected_since = 0.0
        self.pending_requeues: list[Takeback] = []
        self.stop_mode: StopMode | None = None
        self.stop_deadline = 0.0
        self.exit_code = EXIT_OK
        self.announced_ready = False
        self.crash_times: list[float] = []
        self.next_heartbeat = 0.0
        self.next_maintenance = 0.0
        self.next_watchdog = 0.0
        self.next_status = 0.0
        self.last_status = ""
        self.metrics = metrics.PoolMetrics(
            version=__version__,
            function_labels=config.metrics.function_labels,
        )
        self.http: HttpServer | None = None
        self.next_queue_stats = 0.0
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
            self.shutdown_database()
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
            self.exit_code = EX_CONFIG
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
            database_reachable=self.conn is not None,
        )

    def refresh_worker_gauges(self) -> None:
        self.metrics.set_workers(
            (h.slot, h.pid, self.scoreboard.read(h.slot).state.name.lower())
            for h in self.workers.values()
        )

    def start_database(self) -> bool:
        """Wait for the database and check the schema before any fork."""
        delay = 0.5
        while self.stop_mode is None:
            self.notifier.status("waiting for the database")
            try:
                self.open_connection()
            except SchemaNotCurrent as exc:
                log.error("%s", exc)
                self.notifier.status(str(exc))
                self.exit_code = EXIT_SCHEMA
                return False
            except psycopg.Error as exc:
                log.warning(
                    "database unreachable, retrying in %.1f s: %s", delay, exc
                )
                self.notifier.extend_timeout(delay + 5)
                self.wait_for_signals(delay)
                delay = min(delay * 2, 10.0)
                continue
            self.notifier.status(f"starting {len(self.slots)} workers")
            return True
        return False

    def wait_for_signals(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            for key, events in self.selector.select(min(left, _TICK_S)):
                if key.data == "signal":
                    self.dispatch_signals()
                elif self.http is not None:
                    self.http.handle(key, events)
            if self.http is not None:
                self.http.expire()
            if self.stop_mode is not None:
                return

    def open_connection(self) -> None:
        """Connect the supervisor's own session: LISTEN and chores."""
        kwargs = connection_kwargs(
            self.config.database, self.password, listen=True
        )
        conn: psycopg.Connection[Any] = psycopg.connect(
            autocommit=True,
            **kwargs,  # type: ignore[arg-type]
        )
        try:
            check_current(conn)
            conn.execute(f"LISTEN {queries.NOTIFY_CHANNEL}")
            lost_at = queries.heartbeat(
                conn,
                daemon_id=self.daemon_id,
                hostname=self.hostname,
                pid=os.getpid(),
                version=__version__,
                provides=self.config.workers.provides,
                posters=self.config.workers.posters,
            )
        except BaseException:
            conn.close()
            raise
        if lost_at is not None:
            log.error(
                "this daemon had been declared lost at %s; its jobs were "
                "taken back by another daemon",
                lost_at,
            )
        self.conn = conn
        self.db_delay = 0.5
        if self.db_retry_at > 0 or not self.connected_since:
            # A real outage: others' heartbeats went unseen meanwhile.
            self.connected_since = time.monotonic()
        self.next_heartbeat = time.monotonic() + (
            self.config.daemon.heartbeat_interval_s
        )
        self.listen_fd = conn.fileno()
        self.selector.register(self.listen_fd, selectors.EVENT_READ, "listen")
        self.wake_idle_workers()

    def close_connection(self) -> None:
        if self.conn is None:
            return
        # Unregister by the number kept at registration: a lost connection
        # no longer knows its socket.
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.selector.unregister(self.listen_fd)
        self.listen_fd = -1
        with contextlib.suppress(Exception):
            self.conn.close()
        self.conn = None

    def database_failed(self, what: str, exc: Exception) -> None:
        log.warning("%s failed: %s", what, exc)
        self.metrics.count_db_error(what)
        self.close_connection()
        self.db_retry_at = time.monotonic() + self.db_delay
        self.db_delay = min(self.db_delay * 2, 10.0)

    def ensure_connection(self) -> bool:
        if self.conn is not None:
            return True
        if time.monotonic() < self.db_retry_at:
            return False
        was_down = self.db_retry_at > 0
        try:
            self.open_connection()
        except (psycopg.Error, SchemaNotCurrent) as exc:
            self.database_failed("reconnecting", exc)
            return False
        if was_down:
            log.info("database connection restored")
        self.db_retry_at = 0.0
        return True

    def shutdown_database(self) -> None:
        if self.ensure_connection() and self.conn is not None:
            self.retry_pending_requeues()
            with contextlib.suppress(psycopg.Error):
                queries.mark_daemon_stopped(self.conn, self.daemon_id)
        self.close_connection()

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
            for key, events in self.selector.select(_TICK_S):
                if key.data == "signal":
                    self.dispatch_signals()
                elif key.data == "listen":
                    self.read_notifications()
                elif isinstance(key.data, int):
                    self.read_report(key.data)
                elif self.http is not None:
                    self.http.handle(key, events)
            if self.http is not None:
                self.http.expire()
            self.reap()
            self.enforce_timeouts()
            self.enforce_stop_deadline()
            self.roll_workers()
            self.periodic_chores()
            self.update_readiness()

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
        if not self.ensure_connection():
            return
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.config.daemon.heartbeat_interval_s
            self.db_chore("heartbeat", self.heartbeat)
        if now >= self.next_maintenance:
            interval = self.config.daemon.maintenance_interval_s
            self.next_maintenance = now + interval
            self.db_chore("maintenance", self.maintenance)
        if self.http is not None and now >= self.next_queue_stats:
            interval = self.config.metrics.queue_stats_interval_s
            self.next_queue_stats = now + interval
            self.db_chore("queue_stats", self.refresh_queue_gauges)

    def db_chore(self, what: str, chore: Callable[[], None]) -> None:
        if self.conn is None:
            # An earlier chore of this round lost the connection.
            return
        try:
            chore()
        except psycopg.Error as exc:
            self.database_failed(what, exc)

    def heartbeat(self) -> None:
        assert self.conn is not None
        lost_at = queries.heartbeat(
            self.conn,
            daemon_id=self.daemon_id,
            hostname=self.hostname,
            pid=os.getpid(),
            version=__version__,
            provides=self.config.workers.provides,
            posters=self.config.workers.posters,
        )
        if lost_at is not None:
            log.error(
                "this daemon had been declared lost at %s (no heartbeat "
                "within daemon.host_lease_s); its jobs then were taken back",
                lost_at,
            )

    def maintenance(self) -> None:
        assert self.conn is not None
        self.retry_pending_requeues()
        self.take_back_strays()
        lease = self.config.daemon.host_lease_s
        rescued = []
        if policy.may_rescue(time.monotonic() - self.connected_since, lease):
            rescued = queries.rescue_lost_daemons(self.conn, lease_s=lease)
        if rescued:
            log.warning("took back %d job(s) of lost daemons", len(rescued))
            self.metrics.count_taken_back(running=len(rescued), released=0)
            self.after_requeue(rescued)
        self.end_cancelled_jobs()
        unsettled = queries.unsettled_postings(self.conn)
        if unsettled:
            queries.settle_postings(
                self.conn,
                unsettled,
                error_threshold=self.config.jobs.posting_error_threshold,
            )

    def refresh_queue_gauges(self) -> None:
        assert self.conn is not None
        self.metrics.set_queue(*queries.queue_stats(self.conn))

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
        if self.conn is not None and len(ready) >= len(self.slots):
            self.announced_ready = True
            log.info(
                "ready: %d workers (daemon %s)", len(ready), self.daemon_id
            )
            self.notifier.ready(self.status_text())

    # ------------------------------------------------------------ workers

    def spawn_due_workers(self) -> None:
        if self.stop_mode is not None:
            return
        now = time.monotonic()
        due = [
            s
            for s in self.slots
            if s.worker_pid is None and s.next_spawn_at <= now
        ]
        if not due:
            return
        # Fork safety: no database connection lives across a fork.
        had_connection = self.conn is not None
        self.close_connection()
        for slot in due:
            self.spawn(slot)
        if had_connection:
            self.ensure_connection()

    def spawn(self, slot: Slot) -> None:
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC)
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        os.set_blocking(report_r, False)
        owner = uuid.uuid4()
        inherited = [
            self._signal_r,
            self._signal_w,
            self.selector_fd(),
            wake_w,
            report_r,
        ]
        for other in self.workers.values():
            inherited += [other.wake_fd, other.report_fd]
        if self.http is not None:
            inherited += self.http.fds()
        spec = worker.WorkerSpec(
            slot=slot.index,
            owner=owner,
            daemon_id=self.daemon_id,
            config=self.config,
            password=self.password,
            scoreboard=self.scoreboard,
            wake_fd=wake_r,
            report_fd=report_w,
            parent_pid=os.getpid(),
            inherited_fds=tuple(fd for fd in inherited if fd >= 0),
        )
        self.scoreboard.write(slot.index, pid=0, state=WorkerState.BOOTING)
        pid = os.fork()
        if pid == 0:
            worker.main(spec)
        os.close(wake_r)
        os.close(report_w)
        handle = WorkerHandle(
            slot=slot.index,
            pid=pid,
            owner=owner,
            wake_fd=wake_w,
            report_fd=report_r,
            generation=self.generation,
            started=time.monotonic(),
        )
        self.workers[pid] = handle
        slot.worker_pid = pid
        self.selector.register(report_r, selectors.EVENT_READ, pid)
        log.debug("worker %d started in slot %d", pid, slot.index)

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

    def read_notifications(self) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            conn.pgconn.consume_input()
            while conn.pgconn.notifies() is not None:
                pass
        except psycopg.Error as exc:
            self.database_failed("listening", exc)
            return
        if conn.pgconn.status != psycopg.pq.ConnStatus.OK:
            self.database_failed("listening", psycopg.OperationalError("lost"))
            return
        self.wake_idle_workers()

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
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            handle = self.workers.get(pid)
            if handle is not None:
                self.worker_exited(handle, status)

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
        self.scoreboard.clear(handle.slot)
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
        self.requeue(
            Takeback(
                handle.owner,
                running,
                reason,
                outcome="timeout" if timed_out else "worker_died",
                running_s=None
                if running is None
                else time.monotonic() - view.started,
            )
        )
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

    def requeue(self, takeback: Takeback) -> None:
        self.pending_requeues.append(takeback)
        if self.ensure_connection():
            self.db_chore("taking back jobs", self.retry_pending_requeues)

    def retry_pending_requeues(self) -> None:
        while self.pending_requeues and self.conn is not None:
            takeback = self.pending_requeues[0]
            requeued = queries.requeue_owner(
                self.conn,
                daemon_id=self.daemon_id,
                owner=takeback.owner,
                running_job_id=takeback.running,
                reason=takeback.reason,
            )
            self.pending_requeues.pop(0)
            running = sum(1 for j in requeued if j.was_running)
            self.metrics.count_taken_back(
                running=running,
                released=len(requeued) - running,
                outcome=takeback.outcome,
                duration_s=takeback.running_s,
            )
            if requeued:
                log.info(
                    "took back %d job(s) of a worker that ended (%s)",
                    len(requeued),
                    takeback.reason,
                )
                self.after_requeue(requeued)

    def take_back_strays(self) -> None:
        """Take back jobs claimed under an owner that is no worker of ours.

        A worker killed while its claim statement was in flight leaves a
        claim that may commit after the worker's jobs were taken back; its
        jobs were never started, so they go back as released.
        """
        assert self.conn is not None
        known = [h.owner for h in self.workers.values()]
        known += [t.owner for t in self.pending_requeues]
        strays = queries.stray_owners(
            self.conn, daemon_id=self.daemon_id, known_owners=known
        )
        if strays:
            self.pending_requeues += [
                Takeback(owner, None, "its worker ended while claiming")
                for owner in strays
            ]
            self.retry_pending_requeues()

    def after_requeue(self, jobs: list[queries.RequeuedJob]) -> None:
        assert self.conn is not None
        errored = {
            j.posting_id for j in jobs if j.status is JobStatus.ERRORED_OUT
        }
        if errored:
            queries.settle_postings(
                self.conn,
                errored,
                error_threshold=self.config.jobs.posting_error_threshold,
            )
        if any(j.status is JobStatus.WAITING for j in jobs):
            self.wake_idle_workers()

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

    def end_cancelled_jobs(self) -> None:
        """KILL the workers running a job whose posting was cancelled.

        The cancel has ended the job in the database already (a late outcome
        of it is fenced off); ending the process stops the work itself.
        """
        assert self.conn is not None
        running: dict[int, WorkerHandle] = {}
        for handle in self.workers.values():
            view = self.scoreboard.read(handle.slot)
            if (
                view.state is WorkerState.RUNNING
                and view.job_id is not None
                and handle.kill_reason is None
            ):
                running[view.job_id] = handle
        if not running:
            return
        for job_id in queries.cancelled_among(self.conn, running):
            handle = running[job_id]
            view = self.scoreboard.read(handle.slot)
            if view.state is not WorkerState.RUNNING or view.job_id != job_id:
                continue  # it has moved on meanwhile
            handle.cancelled_job = job_id
            handle.kill_reason = "cancelled"
            log.info(
                "ending worker %d: its job %d was cancelled", handle.pid, job_id
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
