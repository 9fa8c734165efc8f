"""The scoreboard: each worker's live state in memory shared with the parent.

Owns a fixed array of slots in an anonymous shared mapping made before the
workers are forked, and the supervisor's pulse ahead of them. A worker
writes only its own slot (the owner token of its current claim, and while
a claim is being made, the token of the claim before it whose outcomes the
same statement writes; which job it runs, since when, until when it may
run); the supervisor and the
database session read any slot without a system call, to know which job a
dead worker was running, whom to time out, and which owner tokens are alive.
The supervisor writes its pulse on every pass of its loop, so the database
session can tell a live supervisor from a frozen one. Each slot also has a
stash: a few bytes its worker keeps there, without a system call, for the
supervisor to read once the worker has died (what it counted and has not
reported yet). Writes are guarded by a sequence number so a reader never
sees half of one; a reader gives up after a bounded number of tries (a
writer killed inside a write leaves the sequence odd) and says so. It must
not know about the database or about processes' lifecycles, nor what a
stash holds.
"""

from __future__ import annotations

import enum
import mmap
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any

# seq, pid, job_id, started, deadline, state, owner token, finishing token
_SLOT = struct.Struct("=QqqddQ16s16s")
_SEQ = struct.Struct("=Q")
_PULSE = struct.Struct("=d")
# The pulse sits in a header as long as a slot, so slots stay aligned.
_HEADER = _SLOT.size
_NO_JOB = -1
_NO_OWNER = bytes(16)
# A write takes well under a microsecond; a sequence still odd after this
# many looks was left so by a writer that died inside its write.
_READ_TRIES = 10_000
# A stash: seq, length, then the bytes; one page per slot, touched only
# by slots in use.
_STASH_HEADER = struct.Struct("=QQ")
_STASH_SIZE = 4096
STASH_BYTES = _STASH_SIZE - _STASH_HEADER.size


class WorkerState(enum.IntEnum):
    """What a worker is doing, as far as the supervisor needs to know."""

    EMPTY = 0
    BOOTING = 1
    IDLE = 2
    CLAIMING = 3
    RUNNING = 4
    FLUSHING = 5
    EXITING = 6


def woken_by_new_work(state: WorkerState) -> bool:
    """Whether a worker in ``state`` is nudged when new work is announced:
    an idle one, and one claiming, whose claim may have looked before the
    work was there (the nudge waits in its pipe and ends its next wait)."""
    return state in (WorkerState.IDLE, WorkerState.CLAIMING)


@dataclass(frozen=True)
class SlotView:
    """A copy of one slot; ``consistent`` is False for a torn one."""

    pid: int
    job_id: int | None
    started: float
    deadline: float
    state: WorkerState
    owner: uuid.UUID | None = None
    consistent: bool = True
    # The token of the last claim while its outcomes are being written.
    finishing: uuid.UUID | None = None

    def owners(self) -> list[uuid.UUID]:
        """The tokens this slot holds claims under."""
        return [t for t in (self.owner, self.finishing) if t is not None]


class Scoreboard:
    """``capacity`` slots of worker state, shared across fork."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._stashes = _HEADER + _SLOT.size * capacity
        self._map = mmap.mmap(-1, self._stashes + _STASH_SIZE * capacity)

    def write(
        self,
        slot: int,
        *,
        pid: int,
        state: WorkerState,
        job_id: int | None = None,
        started: float = 0.0,
        deadline: float = 0.0,
        owner: uuid.UUID | None = None,
        finishing: uuid.UUID | None = None,
    ) -> None:
        """Replace a slot's contents (only its own worker calls this, or the
        supervisor while no worker lives in the slot)."""
        offset = _HEADER + slot * _SLOT.size
        # An odd sequence number marks a write in progress. One left odd by
        # a writer that died is taken as it is, and made even by this write.
        begin = _SEQ.unpack_from(self._map, offset)[0] | 1
        _SEQ.pack_into(self._map, offset, begin)
        _SLOT.pack_into(
            self._map,
            offset,
            begin,
            pid,
            _NO_JOB if job_id is None else job_id,
            started,
            deadline,
            int(state),
            _NO_OWNER if owner is None else owner.bytes,
            _NO_OWNER if finishing is None else finishing.bytes,
        )
        _SEQ.pack_into(self._map, offset, begin + 1)

    def read(self, slot: int) -> SlotView:
        """A consistent copy of a slot, retried while a write is under way;
        after a bounded number of tries, the copy as it is, marked torn."""
        offset = _HEADER + slot * _SLOT.size
        for _ in range(_READ_TRIES):
            fields = _SLOT.unpack_from(self._map, offset)
            if fields[0] % 2 == 0 and self._seq(offset) == fields[0]:
                return _view(fields, consistent=True)
        return _view(_SLOT.unpack_from(self._map, offset), consistent=False)

    def clear(self, slot: int) -> None:
        """Mark a slot empty, its stash too (the supervisor, after reaping
        its worker)."""
        self.write(slot, pid=0, state=WorkerState.EMPTY)
        self.stash(slot, b"")

    def stash(self, slot: int, data: bytes) -> bool:
        """Keep ``data`` in a slot's stash, in place of what it held (only
        its own worker calls this, or the supervisor while no worker lives
        in the slot). False, and the stash unchanged, when ``data`` is
        longer than STASH_BYTES."""
        if len(data) > STASH_BYTES:
            return False
        offset = self._stashes + slot * _STASH_SIZE
        begin = _SEQ.unpack_from(self._map, offset)[0] | 1
        _SEQ.pack_into(self._map, offset, begin)
        _STASH_HEADER.pack_into(self._map, offset, begin, len(data))
        start = offset + _STASH_HEADER.size
        self._map[start : start + len(data)] = data
        _SEQ.pack_into(self._map, offset, begin + 1)
        return True

    def stashed(self, slot: int) -> bytes | None:
        """What a slot's stash holds; None when it stays half written (its
        worker died inside a write of it)."""
        offset = self._stashes + slot * _STASH_SIZE
        start = offset + _STASH_HEADER.size
        for _ in range(_READ_TRIES):
            seq, length = _STASH_HEADER.unpack_from(self._map, offset)
            if seq % 2 or length > STASH_BYTES:
                continue
            data = self._map[start : start + length]
            if self._seq(offset) == seq:
                return data
        return None

    def live_owners(self) -> list[uuid.UUID]:
        """The owner tokens in every slot that is not empty."""
        owners = []
        for slot in range(self.capacity):
            view = self.read(slot)
            if view.state is not WorkerState.EMPTY:
                owners += view.owners()
        return owners

    def beat(self) -> None:
        """The supervisor's pulse: its loop is turning (monotonic clock)."""
        _PULSE.pack_into(self._map, 0, time.monotonic())

    def pulse_age(self) -> float:
        """Seconds since the supervisor's last pulse (inf: never)."""
        last: float = _PULSE.unpack_from(self._map, 0)[0]
        return time.monotonic() - last if last else float("inf")

    def _seq(self, offset: int) -> int:
        value: int = _SEQ.unpack_from(self._map, offset)[0]
        return value


def _view(fields: tuple[Any, ...], *, consistent: bool) -> SlotView:
    _, pid, job_id, started, deadline, state, owner, finishing = fields
    try:
        worker_state = WorkerState(state)
    except ValueError:  # torn: a state no write ever stored
        worker_state = WorkerState.BOOTING
    return SlotView(
        pid,
        None if job_id == _NO_JOB else job_id,
        started,
        deadline,
        worker_state,
        None if owner == _NO_OWNER else uuid.UUID(bytes=owner),
        consistent,
        None if finishing == _NO_OWNER else uuid.UUID(bytes=finishing),
    )
