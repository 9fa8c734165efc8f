"""A worker's capture of what its jobs write to stdout and stderr.

Owns the pipe that a worker's file descriptors 1 and 2 write into for as
long as it lives, and the thread that reads it: every line goes on to the
worker's own stderr (the journal) at once, prefixed with the running job's
id, and the last ``jobs.output_tail_bytes`` of each job's output are kept
for it (:meth:`OutputCapture.end`). Only bytes pass through: the job's
child processes and C libraries are captured as its prints are.

The worker's log records bypass the pipe (:func:`pdoflowd.daemon.logs.
use_stream`), so nothing the worker says is lost should it die with output
not yet read. A job with no output costs an ``ioctl`` and no lock; one with
output, a line the worker writes after it and waits for the reader to see.
It must not know of claims, outcomes or the database.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import select
import sys
import termios
import threading
import uuid
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["CapturedOutput", "OutputCapture"]

# How long the end of a job waits for the reader to reach it.
_END_WAIT_S = 2.0
_CHUNK = 65536


@dataclass(frozen=True)
class CapturedOutput:
    """The tail of one job's output (at most the capture's tail size) and
    how many bytes it wrote in all."""

    tail: bytes
    total_bytes: int

    @property
    def truncated(self) -> bool:
        return self.total_bytes > len(self.tail)


class OutputCapture:
    """Redirects fds 1 and 2 of this process into a pipe read by a thread.

    Call :meth:`begin` as a job starts and :meth:`end` as it ends (both
    from the thread that runs jobs). ``journal`` is where the lines go on
    to (a duplicate of the original stderr, which the caller keeps for its
    log records too).
    """

    def __init__(self, tail_bytes: int, journal: BinaryIO) -> None:
        self.tail_bytes = tail_bytes
        self.journal = journal
        self._lock = threading.Lock()
        self._seen = threading.Condition(self._lock)
        # Guarded by _lock: the running job's prefix, its output so far,
        # and the end markers the reader has reached.
        self._job: uuid.UUID | None = None
        self._prefix = b""
        self._tail = bytearray()
        self._total = 0
        self._ends_seen = 0
        self._ends_sent = 0
        self._partial = b""
        # Read without the lock, so that a job that wrote nothing costs no
        # lock: chunks the reader has taken (counted once taken), whether
        # it is taking one now (set before it reads), and the count the
        # job's thread saw last.
        self._taken = 0
        self._reading = False
        self._taken_seen = 0
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._read_fd = read_fd
        self._count = array.array("i", [0])
        os.set_blocking(read_fd, False)
        self._thread = threading.Thread(
            target=self._read, name="pdoflowd-output", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------ the job

    def begin(self, job_id: uuid.UUID) -> None:
        """A job starts: its lines are prefixed with its id from now on."""
        if self._taken == self._taken_seen and not self._reading:
            # Nothing written since the last job ended: nothing to reset.
            self._job = job_id
            return
        with self._lock:
            # A line written between jobs without its end is not the job's.
            left = self._partial
            self._partial = b""
            # Spelt out by the reader, when the job writes something.
            self._job = job_id
            self._prefix = b""
            self._tail.clear()
            self._total = 0
            self._taken_seen = self._taken
        if left:
            self._forward([left + b"\n"])

    def end(self) -> CapturedOutput | None:
        """The job ended: what it wrote (None: nothing)."""
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):  # a job closed or broke them
            pass
        # In this order: a byte the job wrote is in the pipe, or being
        # read, or taken (the reader counts a chunk before it says it is
        # done reading).
        if (
            not self._unread()
            and not self._reading
            and self._taken == self._taken_seen
        ):
            self._job = None
            return None
        with self._lock:
            if not (self._total or self._partial or self._unread()):
                self._job = None
                self._taken_seen = self._taken
                return None
            self._ends_sent += 1
            wanted = self._ends_sent
        try:
            os.write(1, _END + b"\n")
        except OSError:  # the job closed its stdout: take what was read
            wanted = 0
        with self._seen:
            self._seen.wait_for(
                lambda: self._ends_seen >= wanted, timeout=_END_WAIT_S
            )
            captured = CapturedOutput(bytes(self._tail), self._total)
            self._job = None
            self._prefix = b""
            self._tail.clear()
            self._total = 0
            self._taken_seen = self._taken
        return captured if captured.total_bytes else None

    def _unread(self) -> int:
        """Bytes waiting in the pipe (FIONREAD)."""
        fcntl.ioctl(self._read_fd, termios.FIONREAD, self._count)
        return self._count[0]

    # ------------------------------------------------------------ the reader

    def _read(self) -> None:
        while True:
            select.select([self._read_fd], [], [])
            self._reading = True
            with self._lock:
                try:
                    chunk = os.read(self._read_fd, _CHUNK)
                except BlockingIOError:
                    self._reading = False
                    continue
                if not chunk:
                    return
                out = self._take(chunk)
                self._taken += 1
            self._reading = False
            self._forward(out)

    def _forward(self, lines: list[bytes]) -> None:
        """Pass lines on to the journal (outside the lock: it may block)."""
        if not lines:
            return
        with contextlib.suppress(OSError):
            self.journal.write(b"".join(lines))
            self.journal.flush()

    def _take(self, chunk: bytes) -> list[bytes]:
        """Split ``chunk`` into lines: the end markers end a job, the rest
        is output to keep and pass on (called with the lock held)."""
        if self._job is not None and not self._prefix:
            self._prefix = f"[job {self._job}] ".encode()
        elif self._job is None:
            self._prefix = b""
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out = []
        for line in lines:
            if line.endswith(_END):
                line = line[: -len(_END)]
                if line:
                    self._keep(line)
                    out.append(self._prefix + line + b"\n")
                self._ends_seen += 1
                self._seen.notify_all()
                continue
            self._keep(line + b"\n")
            out.append(self._prefix + line + b"\n")
        if self._partial and len(self._partial) >= _CHUNK:
            # A long line without its end: pass it on in pieces.
            self._keep(self._partial)
            out.append(self._prefix + self._partial + b"\n")
            self._partial = b""
        return out

    def _keep(self, data: bytes) -> None:
        self._total += len(data)
        self._tail += data
        excess = len(self._tail) - self.tail_bytes
        if excess > 0:
            del self._tail[:excess]


# Ends a job's output in the pipe: a line no job writes (NULs and a name).
_END = b"\x00pdoflowd:end-of-job\x00"
