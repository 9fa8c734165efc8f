"""The worker pool: slots, and the worker processes that fill them.

Owns the supervisor's side of every worker: forking it into a slot (the
caller holds no database connection and no thread), reading its report
pipe, reaping its end and asking for the jobs it left behind, refilling
its slot (at once, or with backoff after a crash, and telling the caller
of a crash loop), rolling workers onto a reloaded config one at a time,
growing and shrinking the pool, and ending workers: a job past its timeout
(TERM, then KILL after the grace), a job whose posting was cancelled, a
stop past its deadline. Why a worker ended is one :class:`WorkerEnd`, in
an :class:`Ending` with what it needs. It must not touch the database,
speak to systemd, handle signals or decide when to stop: the supervisor
does, and calls in. It runs past 600 lines because it is one worker's
whole life as its parent sees it: why a worker ends stays beside the
code that ends it and the code that counts it.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import random
import selectors
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from pdoflowd import policy
from pdoflowd.config import Config
from pdoflowd.daemon import reports, worker
from pdoflowd.daemon.metrics import PoolMetrics
from pdoflowd.daemon.scoreboard import (
    Scoreboard,
    WorkerState,
    woken_by_new_work,
)

log = logging.getLogger("pdoflowd.daemon.pool")


class WorkerEnd(enum.Enum):
    """Why a worker ended, or is ending."""

    # Asked to retire on a reload, or said it would (max_jobs, max_memory).
    RETIRED = "retired"
    # Said it could not start (its import or connection failed).
    BOOT_FAILED = "boot_failed"
    # Its job overran: TERM (the job raises), KILL after the grace.
    TIMED_OUT = "timed_out"
    # Killed: the job it ran (or that job's posting) was cancelled.
    CANCELLED = "cancelled"
    # Killed: the daemon's stop reached its deadline.
    KILLED_ON_STOP = "killed_on_stop"
    # Exited cleanly without a word (told to stop, or its slot removed).
    EXITED = "exited"
    # Ended without a word otherwise: its wait status tells how.
    DIED = "died"


# The ends the supervisor forces, each with the reason on the running job.
_KILLS = frozenset(
    {WorkerEnd.TIMED_OUT, WorkerEnd.CANCELLED, WorkerEnd.KILLED_ON_STOP}
)


@dataclass(frozen=True)
class Ending:
    """Why a worker ends, with what that needs.

    ``detail`` is why it retires (RETIRED), what kept it from starting
    (BOOT_FAILED), or the reason recorded on its running job (the kills).
    ``job`` is the job timed out or cancelled; ``kill_at`` is when a worker
    still in its timed-out job gets SIGKILL, and ``killed`` says SIGKILL
    was sent. ``retiring`` keeps the reason of a retirement that a kill
    overtook: the restart is still counted under it.
    """

    why: WorkerEnd
    detail: str = ""
    job: int | None = None
    kill_at: float = 0.0
    killed: bool = False
    retiring: str | None = None

    @property
    def forced(self) -> bool:
        """Whether the supervisor is ending it already (no second kill)."""
        return self.why in _KILLS or self.killed

    @property
    def retire_reason(self) -> str | None:
        return self.detail if self.why is WorkerEnd.RETIRED else self.retiring

    @property
    def on_purpose(self) -> bool:
        """Ended by the supervisor for its job's sake: no crash."""
        return self.why in (WorkerEnd.TIMED_OUT, WorkerEnd.CANCELLED)

    @property
    def takeback_outcome(self) -> str:
        """How the running job taken back from it is counted."""
        return "timeout" if self.why is WorkerEnd.TIMED_OUT else "worker_died"

    def reason(self, status: int) -> str:
        """The reason recorded on the job it was running."""
        if self.why is WorkerEnd.BOOT_FAILED:
            return f"worker could not start: {self.detail}"
        if self.why in _KILLS:
            return self.detail
        return policy.describe_exit(status)

    def restart_reason(self) -> str:
        """The restart's label, for a worker that did not crash."""
        if self.why is WorkerEnd.CANCELLED:
            return "cancelled"
        timed_out = "timeout" if self.why is WorkerEnd.TIMED_OUT else None
        return self.retire_reason or timed_out or "exited"


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
    end: Ending | None = None
    report_buffer: bytes = b""
    # The number of the last metrics report counted (see reports.py).
    metrics_seq: int = 0

    @property
    def forced(self) -> bool:
        return self.end is not None and self.end.forced

    def retire(self, reason: str) -> None:
        if self.end is None or self.end.why is WorkerEnd.RETIRED:
            self.end = Ending(WorkerEnd.RETIRED, reason)
        else:
            self.end = replace(self.end, retiring=reason)

    def ends(
        self,
        why: WorkerEnd,
        detail: str,
        *,
        job: int | None = None,
        kill_at: float = 0.0,
        killed: bool = False,
    ) -> None:
        """It ends for ``why``, keeping the reason of a retirement."""
        retiring = None if self.end is None else self.end.retire_reason
        self.end = Ending(
            why,
            detail,
            job=job,
            kill_at=kill_at,
            killed=killed,
            retiring=retiring,
        )

    def boot_failed(self, error: str) -> None:
        if error:  # an empty word says nothing: its exit status tells
            killed = self.end is not None and self.end.killed
            self.ends(WorkerEnd.BOOT_FAILED, error, killed=killed)

    def timeout_over(self) -> None:
        """It recorded the timeout itself and went on: no end after all."""
        reason = None if self.end is None else self.end.retire_reason
        self.end = None if reason is None else Ending(WorkerEnd.RETIRED, reason)

    def kill_on_stop(self, reason: str) -> None:
        if self.end is not None and self.end.why is WorkerEnd.BOOT_FAILED:
            self.end = replace(self.end, killed=True)
        else:
            self.ends(WorkerEnd.KILLED_ON_STOP, reason, killed=True)


@dataclass(frozen=True)
class Takeback:
    """How to count the jobs taken back from a worker that ended."""

    outcome: str = "worker_died"
    running_s: float | None = None


@dataclass(frozen=True)
class ReportPipe:
    """The selector's data for a worker's report pipe."""

    pid: int


@dataclass
class Slot:
    """A place in the pool, kept across the workers that fill it."""

    index: int
    worker_pid: int | None = None
    consecutive_crashes: int = 0
    next_spawn_at: float = 0.0


# Asks the database session for the jobs under an owner token back: the
# owner, the job it was running (it uses a try), the reason recorded on
# it, and how to count them.
TakeBackJobs = Callable[[uuid.UUID, int | None, str, Takeback], None]


def signal_process(pid: int, signum: int) -> None:
    """Send a signal to a child that may have ended already."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


class Pool:
    """The slots and their workers, as the supervisor's loop drives them."""

    def __init__(
        self,
        config: Config,
        password: str | None,
        *,
        daemon_id: uuid.UUID,
        scoreboard: Scoreboard,
        selector: selectors.BaseSelector,
        metrics: PoolMetrics,
        rng: random.Random,
        inherited_fds: Callable[[], tuple[int, ...]],
        take_back: TakeBackJobs,
    ) -> None:
        self.config = config
        self.password = password
        self.daemon_id = daemon_id
        self.scoreboard = scoreboard
        self.selector = selector
        self.metrics = metrics
        self.rng = rng
        # The supervisor's own files (these pipes too): a child closes them.
        self.inherited_fds = inherited_fds
        self.take_back = take_back
        self.workers: dict[int, WorkerHandle] = {}
        self.slots = [Slot(i) for i in range(config.workers.count)]
        self.generation = 0
        self.crash_times: list[float] = []

    # ------------------------------------------------------------ views

    def fds(self) -> list[int]:
        """The workers' pipe ends this side holds."""
        fds = []
        for handle in self.workers.values():
            fds += [handle.wake_fd, handle.report_fd]
        return fds

    def ready_count(self) -> int:
        return sum(1 for h in self.workers.values() if h.ready)

    def busy_count(self) -> int:
        return sum(
            1
            for h in self.workers.values()
            if self.scoreboard.read(h.slot).state is WorkerState.RUNNING
        )

    def worker_states(self) -> Iterator[tuple[int, int, str]]:
        """Slot, pid and state name of each live worker (for the gauges)."""
        for h in self.workers.values():
            state = self.scoreboard.read(h.slot).state
            yield h.slot, h.pid, state.name.lower()

    # ------------------------------------------------------------ spawning

    def spawn_due(self) -> None:
        """Fill the empty slots whose time has come."""
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
            inherited_fds=(*self.inherited_fds(), wake_w, report_r),
        )
        # Resets the slot whatever its last worker left there.
        self.scoreboard.write(slot.index, pid=0, state=WorkerState.BOOTING)
        self.scoreboard.stash(slot.index, b"")
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
        self.selector.register(report_r, selectors.EVENT_READ, ReportPipe(pid))
        log.debug("worker %d started in slot %d", pid, slot.index)

    # ------------------------------------------------------------ reports

    def wake_idle(self) -> None:
        """Nudge the idle workers to claim (new work was announced).

        A worker still claiming is nudged too: its claim may have looked
        before the new work was there, and the nudge, kept in its pipe,
        ends the wait it goes into next at once. Left out, such a worker
        slept its whole poll interval with work waiting.
        """
        for handle in self.workers.values():
            state = self.scoreboard.read(handle.slot).state
            if woken_by_new_work(state):
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
            self.on_report(handle, line)
        return True

    def on_report(self, handle: WorkerHandle, line: bytes) -> None:
        """Act on one line of a worker's report (:mod:`reports` decodes)."""
        try:
            report = reports.decode(line)
        except ValueError as exc:
            log.warning("bad report from worker %d: %s", handle.pid, exc)
            return
        if isinstance(report, reports.Ready):
            handle.ready = True
        elif isinstance(report, reports.BootFailed):
            handle.boot_failed(report.reason)
        elif isinstance(report, reports.Retiring):
            handle.retire(report.reason)
        else:
            if isinstance(report, reports.MetricsReport):
                handle.metrics_seq = max(handle.metrics_seq, report.seq)
            self.metrics.apply(report)

    def count_stash(self, handle: WorkerHandle) -> None:
        """Count what an ended worker counted and did not report: the copy
        it kept in its scoreboard slot, unless a report it sent (read
        first) counted it already."""
        data = self.scoreboard.stashed(handle.slot)
        if data is None:
            log.warning("worker %d left its metrics half written", handle.pid)
            return
        if not data:
            return
        try:
            report = reports.decode(data)
        except ValueError as exc:
            log.warning("bad metrics from worker %d: %s", handle.pid, exc)
            return
        if (
            isinstance(report, reports.MetricsReport)
            and report.seq > handle.metrics_seq
        ):
            handle.metrics_seq = report.seq
            self.metrics.apply(report)

    # ------------------------------------------------------------ ends

    def worker_exited(self, pid: int, status: int, *, stopping: bool) -> bool:
        """A worker was reaped: take back its jobs, plan its slot's refill.

        True when its crash makes a crash loop (while not ``stopping``).
        """
        handle = self.workers[pid]
        # Its last lines (counts of outcomes it wrote) must not be lost,
        # nor what it counted and had not sent yet.
        while self.read_report(pid):
            pass
        self.count_stash(handle)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(handle.report_fd)
        os.close(handle.report_fd)
        os.close(handle.wake_fd)
        del self.workers[pid]
        view = self.scoreboard.read(handle.slot)
        running = view.job_id if view.state is WorkerState.RUNNING else None
        if not view.consistent:
            # Killed inside a write of its slot: what was read may be torn.
            # The owner token is still worth a try; a wrong one changes
            # nothing, and the sweep of ownerless jobs does the rest.
            log.warning("worker %d left its slot half written", pid)
        slot = next((s for s in self.slots if s.worker_pid == pid), None)
        if slot is not None:
            slot.worker_pid = None
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        end = handle.end or Ending(
            WorkerEnd.EXITED if clean else WorkerEnd.DIED
        )
        reason = end.reason(status)
        if clean:
            running = None
            retiring = end.retire_reason
            log.info(
                "worker %d (slot %d) exited%s",
                pid,
                handle.slot,
                f" to retire ({retiring})" if retiring else "",
            )
        else:
            log.warning(
                "worker %d (slot %d): %s%s",
                pid,
                handle.slot,
                reason,
                f" while running job {running}" if running else "",
            )
        if view.owner is not None:
            self.take_back(
                view.owner,
                running,
                reason,
                Takeback(
                    outcome=end.takeback_outcome,
                    running_s=None
                    if running is None
                    else time.monotonic() - view.started,
                ),
            )
        if view.finishing is not None:
            # Ended inside the statement that writes its last claim's
            # outcomes: whatever of that claim it did not write comes back.
            self.take_back(
                view.finishing,
                None,
                reason,
                Takeback(outcome=end.takeback_outcome),
            )
        # Cleared after the owner token was read and sent for taking back.
        self.scoreboard.clear(handle.slot)
        if slot is None:
            return False
        return self.plan_respawn(slot, handle, end, clean, stopping=stopping)

    def plan_respawn(
        self,
        slot: Slot,
        handle: WorkerHandle,
        end: Ending,
        clean: bool,
        *,
        stopping: bool,
    ) -> bool:
        """When to refill ``slot``; True when its crash makes a crash loop."""
        now = time.monotonic()
        if clean or end.on_purpose:
            slot.consecutive_crashes = 0
            slot.next_spawn_at = now
            self.metrics.count_worker_restart(end.restart_reason())
            return False
        daemon = self.config.daemon
        if now - handle.started >= daemon.healthy_uptime_s:
            slot.consecutive_crashes = 0
        slot.consecutive_crashes += 1
        self.crash_times.append(now)
        self.metrics.count_worker_restart(
            "boot_failed" if end.why is WorkerEnd.BOOT_FAILED else "crashed"
        )
        slot.next_spawn_at = now + policy.respawn_delay(
            slot.consecutive_crashes,
            daemon.respawn_delay_s,
            daemon.respawn_delay_max_s,
            self.rng.random(),
        )
        if stopping or not policy.is_crash_loop(
            self.crash_times,
            now,
            daemon.crash_loop_max,
            daemon.crash_loop_window_s,
        ):
            return False
        log.error(
            "crash loop: %d worker crashes within %g s; stopping so the "
            "service manager can restart the daemon",
            daemon.crash_loop_max,
            daemon.crash_loop_window_s,
        )
        return True

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
            end = handle.end
            if end is not None and end.why is WorkerEnd.TIMED_OUT:
                if running != end.job:
                    handle.timeout_over()
                elif not end.killed and now >= end.kill_at:
                    handle.end = replace(end, killed=True)
                    signal_process(handle.pid, signal.SIGKILL)
                continue
            if (
                running is not None
                and view.deadline
                and now >= view.deadline
                and not handle.forced
            ):
                limit = view.deadline - view.started
                handle.ends(
                    WorkerEnd.TIMED_OUT,
                    f"timeout after {limit:g} s",
                    job=running,
                    kill_at=now + grace,
                )
                signal_process(handle.pid, signal.SIGTERM)

    def check_claims(self, owners: set[str]) -> None:
        """Ask the workers holding claims a cancel ended to check them before
        their next job starts (worker.CLAIMS_SIGNAL)."""
        for handle in self.workers.values():
            held = self.scoreboard.read(handle.slot).owners()
            if any(str(owner) in owners for owner in held):
                signal_process(handle.pid, worker.CLAIMS_SIGNAL)

    def end_cancelled_jobs(self, cancelled: set[int]) -> None:
        """KILL the workers running a job that was cancelled, alone or with
        its posting.

        The cancel has ended the job in the database already (a late outcome
        of it is fenced off); ending the process stops the work itself.
        """
        for handle in self.workers.values():
            view = self.scoreboard.read(handle.slot)
            if (
                view.state is not WorkerState.RUNNING
                or view.job_id not in cancelled
                or handle.forced
            ):
                continue  # not running it (any more), or ending already
            handle.ends(
                WorkerEnd.CANCELLED, "cancelled", job=view.job_id, killed=True
            )
            log.info(
                "ending worker %d: its job %d was cancelled",
                handle.pid,
                view.job_id,
            )
            signal_process(handle.pid, signal.SIGKILL)

    def terminate_all(self) -> None:
        """Ask every worker to stop after its current job."""
        for handle in self.workers.values():
            signal_process(handle.pid, signal.SIGTERM)

    def kill_on_stop(self, reason: str) -> None:
        """KILL every worker not being ended already; ``reason`` goes on
        the job it was running."""
        for handle in self.workers.values():
            if not handle.forced:
                handle.kill_on_stop(reason)
                signal_process(handle.pid, signal.SIGKILL)

    # ------------------------------------------------------------ size

    def add_slot(self) -> None:
        """Grow the pool by one, on a scoreboard slot nobody uses."""
        used = {s.index for s in self.slots} | {
            h.slot for h in self.workers.values()
        }
        index = next(
            i for i in range(self.scoreboard.capacity) if i not in used
        )
        self.slots.append(Slot(index))

    def stop_worker_of(self, slot: Slot) -> None:
        """A slot was removed: its worker stops after its job."""
        if slot.worker_pid is not None:
            signal_process(slot.worker_pid, signal.SIGTERM)

    def grow(self) -> None:
        """One worker more (SIGTTIN), up to half the scoreboard."""
        if len(self.slots) < self.scoreboard.capacity // 2:
            self.add_slot()
            log.info("one worker more: %d", len(self.slots))

    def shrink(self) -> None:
        """One worker fewer (SIGTTOU), never none."""
        if len(self.slots) > 1:
            slot = self.slots.pop()
            log.info("one worker fewer: %d", len(self.slots))
            self.stop_worker_of(slot)

    def apply_config(self, new: Config, password: str | None) -> None:
        """Adopt a reloaded config (and password, as it reads now) and
        roll the workers onto it."""
        self.config = new
        self.password = password
        self.generation += 1
        count = new.workers.count
        while len(self.slots) < count:
            self.add_slot()
        while len(self.slots) > count:
            self.stop_worker_of(self.slots.pop())
        log.info("config reloaded: %d workers, rolling them onto it", count)

    def roll(self) -> None:
        """Replace workers of an older generation, one at a time."""
        stale = [
            h for h in self.workers.values() if h.generation < self.generation
        ]
        if not stale or any(
            h.end is not None and h.end.retire_reason == "reload" for h in stale
        ):
            return
        if any(not h.ready for h in self.workers.values()):
            return
        handle = min(stale, key=lambda h: h.slot)
        handle.retire("reload")
        signal_process(handle.pid, signal.SIGTERM)
