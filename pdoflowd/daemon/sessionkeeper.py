"""Keeping the database session running, on the supervisor's side.

Owns the session process's life as the supervisor sees it: forking it
(through :class:`SessionHandle`, holding no
connection), starting another when it ends on its own (after a backoff
that grows with its crashes), ending it on a reload so that the next one
starts on the new config and password, asking it to finish on a stop and
killing it past the budget, what it last said about the schema, and how
to count each take-back asked of it until it says it is done.

It is a class of its own rather than more of the supervisor because this
state (crashes, the next start, a restart asked, the take-backs) and its
backoff are the session's business, not the loop's: the loop calls
:meth:`SessionKeeper.keep` on each pass, routes what the session says, and
serves the session's pipe while it stops. It must not wait or select (the
loop does), act on what the session says about workers or the queue, or
speak to systemd.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import random
import selectors
import signal
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from pdoflowd import policy
from pdoflowd.config import Config
from pdoflowd.daemon.pool import Takeback, signal_process
from pdoflowd.daemon.scoreboard import Scoreboard
from pdoflowd.daemon.session import SessionSpec, main
from pdoflowd.daemon.sessionpipe import (
    Event,
    Request,
    SessionEvent,
    TakeBack,
    decode_lines,
    encode,
)

log = logging.getLogger("pdoflowd.daemon.sessionkeeper")


class SessionPipe(enum.Enum):
    """The selector's data for the database session's event pipe."""

    EVENTS = "session events"


class SessionKeeper:
    """The supervisor's database session: started, kept, restarted."""

    def __init__(
        self,
        config: Config,
        password: str | None,
        *,
        daemon_id: uuid.UUID,
        scoreboard: Scoreboard,
        selector: selectors.BaseSelector,
        rng: random.Random,
        inherited_fds: Callable[[], tuple[int, ...]],
    ) -> None:
        self.config = config
        self.password = password
        self.daemon_id = daemon_id
        self.hostname = socket.gethostname()
        self.scoreboard = scoreboard
        self.selector = selector
        self.rng = rng
        # The supervisor's own files (the session's pipes too).
        self.inherited_fds = inherited_fds
        self.handle = SessionHandle()
        self.crashes = 0
        self.start_at = 0.0
        self.restart_asked = False
        # Why the schema will not do, as the session last said (or None).
        self.schema_problem: str | None = None
        # How to count each take-back asked of the session, by its number.
        self.takebacks: dict[int, Takeback] = {}

    @property
    def pid(self) -> int | None:
        return self.handle.pid

    @property
    def connected(self) -> bool:
        return self.handle.connected

    def fds(self) -> tuple[int, ...]:
        return self.handle.fds()

    def start(self) -> None:
        """Fork the session (no connection lives here to share)."""
        self.scoreboard.beat()
        pid = self.handle.start(
            daemon_id=self.daemon_id,
            hostname=self.hostname,
            config=self.config,
            password=self.password,
            scoreboard=self.scoreboard,
            inherited_fds=self.inherited_fds(),
        )
        self.selector.register(
            self.handle.event_fd, selectors.EVENT_READ, SessionPipe.EVENTS
        )
        log.debug("database session %d started", pid)

    def keep(self) -> None:
        """Start a session if none runs and its time has come."""
        if self.handle.pid is None and time.monotonic() >= self.start_at:
            self.start()

    def restart(self, config: Config, password: str | None) -> None:
        """End the session, so that a new one starts on ``config`` and
        ``password`` (what it was asked and did not finish is asked of the
        new one)."""
        self.config = config
        self.password = password
        if self.handle.pid is not None:
            self.restart_asked = True
            signal_process(self.handle.pid, signal.SIGTERM)

    def ended(self) -> list[SessionEvent]:
        """The session was reaped: its last words; forget its pipes."""
        # Unregistered by the number kept: the pipe is closed next, and a
        # new one may get the same number.
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.handle.event_fd)
        return self.handle.ended()

    def plan_next(self, status: int) -> None:
        """When to start the next session, the last one having ended with
        wait ``status``: at once after a restart asked, else backing off."""
        if self.restart_asked:
            self.restart_asked = False
            self.start_at = time.monotonic()
            return
        self.crashes += 1
        delay = policy.respawn_delay(
            self.crashes,
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
        self.start_at = time.monotonic() + delay

    def kill(self) -> list[SessionEvent]:
        """End a session that did not finish in time: its last words."""
        pid = self.handle.pid
        if pid is None:
            return []
        signal_process(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        return self.ended()

    def stop(self) -> None:
        """Ask the session to finish the take-backs, mark the daemon
        stopped and exit."""
        self.handle.stop()

    def flush(self) -> None:
        """Write what waits for room in the session's pipe."""
        self.handle.flush()

    # ------------------------------------------------------------ its words

    def read(self) -> list[SessionEvent]:
        """What the session said since the last read."""
        return self.handle.read()

    def note_connected(self) -> None:
        self.crashes = 0
        self.schema_problem = None

    def take_back(
        self,
        owner: uuid.UUID,
        running: int | None,
        reason: str,
        counted_as: Takeback,
    ) -> None:
        """Ask for a dead worker's jobs back; remember how to count them."""
        request = self.handle.take_back(owner, running, reason)
        self.takebacks[request.seq] = counted_as

    def taken_back(self, seq: int) -> Takeback:
        """How to count the jobs of a take-back the session has done."""
        return self.takebacks.pop(seq, Takeback())


class SessionHandle:
    """The supervisor's side: fork the session, ask it, read what it says.

    Every take-back asked for is kept until the session says it is done,
    and asked again of a new session if this one ends first.
    """

    def __init__(self) -> None:
        self.pid: int | None = None
        self.request_fd = -1
        self.event_fd = -1
        self.connected = False
        self.pending: dict[int, TakeBack] = {}
        self.next_seq = 0
        self.stop_sent = False
        self._buffer = b""
        self._unsent = b""

    def start(
        self,
        *,
        daemon_id: uuid.UUID,
        hostname: str,
        config: Config,
        password: str | None,
        scoreboard: Scoreboard,
        inherited_fds: tuple[int, ...],
    ) -> int:
        """Fork the session (the caller holds no connection); its pid."""
        request_r, request_w = os.pipe2(os.O_CLOEXEC)
        event_r, event_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(request_w, False)
        os.set_blocking(event_r, False)
        spec = SessionSpec(
            daemon_id=daemon_id,
            hostname=hostname,
            config=config,
            password=password,
            scoreboard=scoreboard,
            request_fd=request_r,
            event_fd=event_w,
            parent_pid=os.getpid(),
            inherited_fds=tuple(
                fd for fd in (*inherited_fds, request_w, event_r) if fd >= 0
            ),
        )
        pid = os.fork()
        if pid == 0:
            main(spec)
        os.close(request_r)
        os.close(event_w)
        self.pid, self.request_fd, self.event_fd = pid, request_w, event_r
        self.connected = False
        self.stop_sent = False
        self._buffer = self._unsent = b""
        for take_back in sorted(self.pending.values(), key=lambda t: t.seq):
            self._send(take_back.as_line())
        return pid

    def fds(self) -> tuple[int, ...]:
        """This side's pipe ends, which no other child may keep."""
        return tuple(fd for fd in (self.request_fd, self.event_fd) if fd >= 0)

    def take_back(
        self, owner: uuid.UUID, running: int | None, reason: str
    ) -> TakeBack:
        """Ask for a dead worker's jobs back; returns the request."""
        self.next_seq += 1
        request = TakeBack(self.next_seq, owner, running, reason)
        self.pending[request.seq] = request
        self._send(request.as_line())
        return request

    def stop(self) -> None:
        """Ask the session to finish the take-backs, mark the daemon
        stopped and exit."""
        if not self.stop_sent:
            self.stop_sent = True
            self._send({"request": Request.STOP.value})

    def _send(self, message: dict[str, Any]) -> None:
        self._unsent += encode(message)
        self.flush()

    def flush(self) -> None:
        """Write what waits for room in the pipe, never blocking (lines
        are cut only where the pipe is full; the session reads on)."""
        while self._unsent and self.request_fd >= 0:
            try:
                written = os.write(self.request_fd, self._unsent)
            except (BlockingIOError, BrokenPipeError):
                return
            self._unsent = self._unsent[written:]

    def read(self) -> list[SessionEvent]:
        """What the session said since the last read."""
        if self.event_fd < 0:
            return []
        chunks = []
        while True:
            try:
                data = os.read(self.event_fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(data)
        messages, self._buffer = decode_lines(self._buffer + b"".join(chunks))
        events = []
        for message in messages:
            try:
                kind = Event(message.pop("event"))
            except (KeyError, ValueError):
                continue
            if kind is Event.CONNECTED:
                self.connected = True
            elif kind is Event.DISCONNECTED:
                self.connected = False
            elif kind is Event.TAKEN_BACK:
                self.pending.pop(int(message.get("seq", -1)), None)
            events.append(SessionEvent(kind, message))
        return events

    def ended(self) -> list[SessionEvent]:
        """The session exited (reaped): its last words; forget its pipes."""
        events = self.read()
        for fd in self.fds():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pid, self.request_fd, self.event_fd = None, -1, -1
        self.connected = False
        return events
