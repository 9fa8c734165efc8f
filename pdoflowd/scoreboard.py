"""The scoreboard: each worker's live state in memory shared with the parent.

Owns a fixed array of slots in an anonymous shared mapping made before the
workers are forked. A worker writes only its own slot (which job it runs,
since when, until when it may run); the supervisor reads any slot without a
system call, to know which job a dead worker was running and whom to time
out. Writes are guarded by a sequence number so a reader never sees half of
one. It must not know about the database or about processes' lifecycles.
"""

from __future__ import annotations

import enum
import mmap
import struct
from dataclasses import dataclass

_SLOT = struct.Struct("=QqqddQ")  # seq, pid, job_id, started, deadline, state
_NO_JOB = -1


class WorkerState(enum.IntEnum):
    """What a worker is doing, as far as the supervisor needs to know."""

    EMPTY = 0
    BOOTING = 1
    IDLE = 2
    CLAIMING = 3
    RUNNING = 4
    FLUSHING = 5
    EXITING = 6


@dataclass(frozen=True)
class SlotView:
    """A consistent copy of one slot."""

    pid: int
    job_id: int | None
    started: float
    deadline: float
    state: WorkerState


class Scoreboard:
    """``capacity`` slots of worker state, shared across fork."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._map = mmap.mmap(-1, _SLOT.size * capacity)

    def write(
        self,
        slot: int,
        *,
        pid: int,
        state: WorkerState,
        job_id: int | None = None,
        started: float = 0.0,
        deadline: float = 0.0,
    ) -> None:
        """Replace a slot's contents (only its own worker calls this)."""
        offset = slot * _SLOT.size
        seq = _SLOT.unpack_from(self._map, offset)[0]
        # An odd sequence number marks a write in progress.
        struct.pack_into("=Q", self._map, offset, seq + 1)
        _SLOT.pack_into(
            self._map,
            offset,
            seq + 1,
            pid,
            _NO_JOB if job_id is None else job_id,
            started,
            deadline,
            int(state),
        )
        struct.pack_into("=Q", self._map, offset, seq + 2)

    def read(self, slot: int) -> SlotView:
        """A consistent copy of a slot, retried while a write is under way."""
        offset = slot * _SLOT.size
        while True:
            seq, pid, job_id, started, deadline, state = _SLOT.unpack_from(
                self._map, offset
            )
            if seq % 2 == 0 and self._seq(offset) == seq:
                return SlotView(
                    pid,
                    None if job_id == _NO_JOB else job_id,
                    started,
                    deadline,
                    WorkerState(state),
                )

    def clear(self, slot: int) -> None:
        """Mark a slot empty (the supervisor, after reaping its worker)."""
        self.write(slot, pid=0, state=WorkerState.EMPTY)

    def _seq(self, offset: int) -> int:
        value: int = struct.unpack_from("=Q", self._map, offset)[0]
        return value
