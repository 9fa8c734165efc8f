"""The supervisor: the ``pdoflowd run`` main process and its one loop.

Owns the loop and what only the main process may do: the signals (their
handlers only write to a wake-up pipe; the loop dispatches a
``handle_<signal>`` method per signal), the stop modes and the stop's
deadline, reloading the config (SIGHUP), readiness and every word to
systemd, the HTTP endpoint, the periodic chores (the watchdog, the status
line), and what to do with what the database session says. On each pass
it writes its pulse, reaps children, and has the pool
(:mod:`~pdoflowd.daemon.pool`: workers, their ends, timeouts, refills)
and the session keeper (:mod:`~pdoflowd.daemon.sessionkeeper`) do their
part; each pass is measured. Its database work (LISTEN, heartbeat, rescue,
settling, taking jobs back) lives in the database session, a process of
its own: the supervisor holds no database connection and no thread, so it
may fork at any time and nothing PostgreSQL or the network does can stall
its loop. It must not run jobs or touch the database.
"""

from __future__ import annotations

import enum
import logging
import os
import random
import selectors
import signal
import ssl
import time
import uuid
from collections.abc import Callable
from typing import Any

from pdoflowd import __version__
from pdoflowd.config import (
    Config,
    ConfigError,
    MetricsConfig,
)
from pdoflowd.daemon import metrics
from pdoflowd.daemon.httpserver import EndpointError, HttpServer, tls_context
from pdoflowd.daemon.notify import Notifier
from pdoflowd.daemon.pool import Pool, ReportPipe
from pdoflowd.daemon.scoreboard import Scoreboard
from pdoflowd.daemon.sessionkeeper import SessionKeeper, SessionPipe
from pdoflowd.daemon.sessionpipe import Event, SessionEvent
from pdoflowd.daemon.timers import Every
from pdoflowd.exitcodes import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_SCHEMA

log = logging.getLogger("pdoflowd.daemon.supervisor")


_TICK_S = 0.1
_STATUS_INTERVAL_S = 1.0
_SCOREBOARD_SLOTS = 1024
# The signals the supervisor handles (through its wake-up pipe).
HANDLED_SIGNALS = (
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


class WakeUp(enum.Enum):
    """The selector's data for the signal wake-up pipe."""

    SIGNALS = "signals"


class Supervisor:
    """The daemon's main loop: signals, stops, reloads, readiness."""

    def __init__(
        self,
        config: Config,
        password: str | None,
        *,
        notifier: Notifier | None = None,
        reload_config: Callable[[], tuple[Config, str | None]] | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.reload_config = reload_config
        self.daemon_id = uuid.uuid4()
        self.scoreboard = Scoreboard(_SCOREBOARD_SLOTS)
        self.selector = selectors.DefaultSelector()
        self.metrics = metrics.PoolMetrics(
            version=__version__,
            function_labels=config.metrics.function_labels,
            schedules=[schedule.name for schedule in config.schedules],
        )
        rng = random.Random()
        self.keeper = SessionKeeper(
            config,
            password,
            daemon_id=self.daemon_id,
            scoreboard=self.scoreboard,
            selector=self.selector,
            rng=rng,
            inherited_fds=self.parent_fds,
        )
        self.pool = Pool(
            config,
            password,
            daemon_id=self.daemon_id,
            scoreboard=self.scoreboard,
            selector=self.selector,
            metrics=self.metrics,
            rng=rng,
            inherited_fds=self.parent_fds,
            take_back=self.keeper.take_back,
        )
        self.stop_mode: StopMode | None = None
        self.stop_deadline = 0.0
        self.exit_code = EXIT_OK
        self.announced_ready = False
        self.watchdog_timer = (
            Every(self.notifier.watchdog_s)
            if self.notifier.watchdog_s
            else None
        )
        self.status_timer = Every(_STATUS_INTERVAL_S)
        self.last_status = ""
        self.http: HttpServer | None = None
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Run until stopped; return the process exit code."""
        try:
            if self.begin():
                while self.step():
                    pass
        finally:
            self.finish()
        return self.exit_code

    def begin(self) -> bool:
        """Take the signals, open the endpoint, start the database session
        and wait for it; False when the daemon cannot go on (the exit code
        says why) or was stopped meanwhile."""
        self.install_signal_handlers()
        self.selector.register(
            self._signal_r, selectors.EVENT_READ, WakeUp.SIGNALS
        )
        return self.open_endpoint() and self.start_database()

    def finish(self) -> None:
        """Let the session finish, close the endpoint and the selector."""
        self.stop_session()
        if self.http is not None:
            self.http.close()
        self.selector.close()

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
            live_workers=self.pool.ready_count(),
            database_reachable=self.keeper.connected,
        )

    def refresh_worker_gauges(self) -> None:
        self.metrics.set_workers(self.pool.worker_states())

    def start_database(self) -> bool:
        """Start the database session; wait until it has connected and
        found the schema current, before any worker is forked."""
        self.notifier.status("waiting for the database")
        self.keeper.start()
        while self.stop_mode is None:
            if self.keeper.connected:
                self.notifier.status(f"starting {len(self.pool.slots)} workers")
                return True
            if self.keeper.schema_problem is not None:
                self.notifier.status(self.keeper.schema_problem)
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

    # ------------------------------------------------------------ session

    def keep_session(self) -> None:
        """Restart the session if it ended and the daemon goes on."""
        if self.stop_mode is None:
            self.keeper.keep()

    def session_exited(self, status: int) -> None:
        self.on_session_events(self.keeper.ended())
        if self.stop_mode is None:
            self.keeper.plan_next(status)

    def stop_session(self) -> None:
        """Let the session write what it was asked and mark this daemon
        stopped, within the drain budget (at least a few seconds)."""
        if self.keeper.pid is None:
            return
        self.keeper.stop()
        budget = max(5.0, self.stop_deadline - time.monotonic())
        deadline = time.monotonic() + budget
        while self.keeper.pid is not None and time.monotonic() < deadline:
            for key, events in self.selector.select(_TICK_S):
                self.dispatch(key, events)
            if self.http is not None:
                self.http.expire()
            self.keeper.flush()
            self.reap()
        if self.keeper.pid is not None:
            log.warning(
                "database session did not finish within %.0f s; ending it",
                budget,
            )
            self.on_session_events(self.keeper.kill())

    def on_session_events(self, events: list[SessionEvent]) -> None:
        for event in events:
            fields = event.fields
            if event.kind is Event.CONNECTED:
                self.keeper.note_connected()
                self.pool.wake_idle()
            elif event.kind is Event.SCHEMA_NOT_CURRENT:
                self.keeper.schema_problem = str(fields.get("message"))
            elif event.kind is Event.NOTIFIED:
                self.pool.wake_idle()
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
                    self.pool.wake_idle()
            elif event.kind is Event.QUEUE:
                self.metrics.set_queue(
                    dict(fields.get("counts") or {}), fields.get("oldest")
                )
            elif event.kind is Event.CANCELLED:
                self.pool.end_cancelled_jobs(set(fields.get("jobs") or ()))
            elif event.kind is Event.CLAIMS_CANCELLED:
                self.pool.check_claims(set(fields.get("owners") or ()))
            elif event.kind is Event.SCHEDULE_RUNS:
                self.metrics.count_schedule_runs(
                    dict(fields.get("runs") or {}),
                    dict(fields.get("last") or {}),
                )
            elif event.kind is Event.PRUNED:
                self.metrics.count_pruned(
                    postings=int(fields.get("postings", 0)),
                    jobs=int(fields.get("jobs", 0)),
                )
            elif event.kind is Event.LIMITS_DIFFER:
                self.metrics.set_limits_differ(int(fields.get("daemons", 0)))

    def taken_back(self, fields: dict[str, Any]) -> None:
        takeback = self.keeper.taken_back(int(fields.get("seq", -1)))
        running = int(fields.get("running", 0))
        self.metrics.count_taken_back(
            running=running,
            released=int(fields.get("released", 0)),
            outcome=takeback.outcome,
            duration_s=takeback.running_s if running else None,
        )
        if fields.get("waiting"):
            self.pool.wake_idle()

    # ------------------------------------------------------------ children

    def parent_fds(self) -> tuple[int, ...]:
        """The supervisor's own files, which a forked child must close."""
        fds = [self._signal_r, self._signal_w, self.selector_fd()]
        fds += self.pool.fds()
        fds += self.keeper.fds()
        if self.http is not None:
            fds += self.http.fds()
        return tuple(fd for fd in fds if fd >= 0)

    def selector_fd(self) -> int:
        fileno = getattr(self.selector, "fileno", None)
        return int(fileno()) if fileno is not None else -1

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.pool.workers:
                crash_loop = self.pool.worker_exited(
                    pid, status, stopping=self.stop_mode is not None
                )
                if crash_loop:
                    self.exit_code = EXIT_FAILURE
                    self.begin_stop(StopMode.FAST)
            elif pid == self.keeper.pid:
                self.session_exited(status)

    # ------------------------------------------------------------ signals

    def install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._signal_w, warn_on_full_buffer=False)
        for signum in HANDLED_SIGNALS:
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
        self.metrics.set_schedules(schedule.name for schedule in new.schedules)
        # Workers forked from now on, and the next connection of our own,
        # log in with the password as it reads now (a rotated file).
        self.config = new
        self.pool.apply_config(new, password)
        self.keeper.restart(new, password)
        self.metrics.config_reloaded(True)
        self.notifier.ready(self.status_text())

    def handle_sigttin(self) -> None:
        if self.stop_mode is None:
            self.pool.grow()

    def handle_sigttou(self) -> None:
        if self.stop_mode is None:
            self.pool.shrink()

    def begin_stop(self, mode: StopMode) -> None:
        if self.stop_mode is StopMode.FAST or self.stop_mode is mode:
            return
        self.stop_mode = mode
        now = time.monotonic()
        if mode is StopMode.GRACEFUL:
            budget = self.config.workers.drain_timeout_s
            self.stop_deadline = now + budget
            log.info("draining: running jobs may finish within %g s", budget)
            self.notifier.stopping(
                f"draining {self.pool.busy_count()} running jobs"
            )
            self.notifier.extend_timeout(budget + 5)
            self.pool.terminate_all()
        else:
            self.stop_deadline = now
            log.info("fast stop: killing running jobs")
            self.notifier.stopping("fast stop")
        self.enforce_stop_deadline()

    def enforce_stop_deadline(self) -> None:
        if self.stop_mode is None or time.monotonic() < self.stop_deadline:
            return
        self.pool.kill_on_stop(
            "daemon stopped fast: job killed"
            if self.stop_mode is StopMode.FAST
            else "drain budget exceeded: job killed after "
            f"{self.config.workers.drain_timeout_s:g} s"
        )

    # ------------------------------------------------------------ the loop

    def step(self) -> bool:
        """One pass of the loop; False once a stop has ended every worker."""
        if self.stop_mode is None and self.keeper.schema_problem is None:
            self.pool.spawn_due()
        if self.stop_mode is not None and not self.pool.workers:
            return False
        ready = self.selector.select(_TICK_S)
        began = time.monotonic()
        self.scoreboard.beat()
        for key, events in ready:
            self.dispatch(key, events)
        if self.http is not None:
            self.http.expire()
        self.reap()
        self.pool.enforce_timeouts()
        self.enforce_stop_deadline()
        if self.stop_mode is None:
            self.pool.roll()
        self.keep_session()
        self.keeper.flush()
        self.periodic_chores()
        self.update_readiness()
        self.metrics.observe_loop_tick(time.monotonic() - began)
        return True

    def dispatch(self, key: selectors.SelectorKey, events: int) -> None:
        """Hand one ready file to its owner."""
        data: object = key.data
        if data is WakeUp.SIGNALS:
            self.dispatch_signals()
        elif data is SessionPipe.EVENTS:
            self.on_session_events(self.keeper.read())
        elif isinstance(data, ReportPipe):
            self.pool.read_report(data.pid)
        elif self.http is not None:
            self.http.handle(key, events)

    def periodic_chores(self) -> None:
        now = time.monotonic()
        watchdog = self.watchdog_timer
        # Its time comes round either way; the ping goes only while healthy.
        if watchdog is not None and watchdog.due(now) and self.healthy():
            self.notifier.watchdog()
        if self.stop_mode is not None:
            if self.status_timer.due(now):
                left = max(0.0, self.stop_deadline - now)
                self.notifier.status(
                    f"draining: {self.pool.busy_count()} jobs running, "
                    f"{left:.0f} s left"
                )
        elif self.announced_ready and self.status_timer.due(now):
            text = self.status_text()
            if text != self.last_status:
                self.last_status = text
                self.notifier.status(text)

    def healthy(self) -> bool:
        return self.stop_mode is None or bool(self.pool.workers)

    def status_text(self) -> str:
        return (
            f"{self.pool.ready_count()} workers, "
            f"{self.pool.busy_count()} busy, "
            f"{self.metrics.processed('done'):,} jobs done"
        )

    def update_readiness(self) -> None:
        if self.announced_ready or self.stop_mode is not None:
            return
        ready = self.pool.ready_count()
        if self.keeper.connected and ready >= len(self.pool.slots):
            self.announced_ready = True
            log.info("ready: %d workers (daemon %s)", ready, self.daemon_id)
            self.notifier.ready(self.status_text())


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
