"""The shared-memory scoreboard, across a real fork."""

from __future__ import annotations

import os
import signal
import struct
import time
import uuid

from pdoflowd.daemon.scoreboard import (
    STASH_BYTES,
    Scoreboard,
    WorkerState,
    woken_by_new_work,
)


def test_a_child_write_is_seen_by_the_parent() -> None:
    board = Scoreboard(4)
    pid = os.fork()
    if pid == 0:
        board.write(
            2,
            pid=os.getpid(),
            state=WorkerState.RUNNING,
            job_id=42,
            started=1.5,
            deadline=9.5,
        )
        os._exit(0)
    os.waitpid(pid, 0)
    view = board.read(2)
    assert view.pid == pid
    assert view.state is WorkerState.RUNNING
    assert view.job_id == 42
    assert (view.started, view.deadline) == (1.5, 9.5)


def test_slots_are_independent() -> None:
    board = Scoreboard(3)
    board.write(0, pid=10, state=WorkerState.IDLE)
    board.write(1, pid=11, state=WorkerState.RUNNING, job_id=7)
    assert board.read(0).job_id is None
    assert board.read(1).job_id == 7
    assert board.read(2).state is WorkerState.EMPTY


def test_clear_empties_a_slot() -> None:
    board = Scoreboard(1)
    board.write(0, pid=10, state=WorkerState.RUNNING, job_id=3)
    board.clear(0)
    view = board.read(0)
    assert (view.state, view.job_id, view.pid) == (WorkerState.EMPTY, None, 0)


def test_a_writer_killed_inside_its_write_stalls_no_reader() -> None:
    board = Scoreboard(2)
    owner = uuid.uuid4()
    board.write(0, pid=10, state=WorkerState.RUNNING, job_id=3, owner=owner)
    pid = os.fork()
    if pid == 0:
        # Begin a write the way Scoreboard.write does, and die inside it.
        offset = _slot_offset(0)
        seq = struct.unpack_from("=Q", board._map, offset)[0]
        struct.pack_into("=Q", board._map, offset, seq + 1)
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    began = time.monotonic()
    view = board.read(0)
    assert time.monotonic() - began < 5
    assert not view.consistent
    # What was there stays readable, for the take-back to try.
    assert (view.owner, view.job_id) == (owner, 3)
    # The next write (the supervisor resetting the slot) heals it.
    board.write(0, pid=0, state=WorkerState.BOOTING)
    healed = board.read(0)
    assert healed.consistent
    assert (healed.state, healed.owner) == (WorkerState.BOOTING, None)
    board.clear(0)
    assert board.read(0).consistent


def test_writers_killed_at_random_leave_every_slot_readable() -> None:
    board = Scoreboard(1)
    for round_ in range(30):
        pid = os.fork()
        if pid == 0:
            token = uuid.uuid4()
            while True:
                board.write(0, pid=1, state=WorkerState.RUNNING, owner=token)
        time.sleep(0.001 * (round_ % 7))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        board.read(0)  # bounded, torn or not
        board.write(0, pid=0, state=WorkerState.BOOTING)
        assert board.read(0).consistent


def test_live_owners_are_the_tokens_of_slots_in_use() -> None:
    board = Scoreboard(3)
    first, second = uuid.uuid4(), uuid.uuid4()
    board.write(0, pid=1, state=WorkerState.IDLE, owner=first)
    board.write(1, pid=2, state=WorkerState.RUNNING, job_id=4, owner=second)
    board.write(2, pid=3, state=WorkerState.BOOTING)
    assert sorted(board.live_owners()) == sorted([first, second])
    board.clear(0)
    assert board.live_owners() == [second]


def test_the_pulse_ages_until_the_next_beat() -> None:
    board = Scoreboard(1)
    assert board.pulse_age() == float("inf")
    board.beat()
    assert 0 <= board.pulse_age() < 1
    time.sleep(0.05)
    assert board.pulse_age() >= 0.05


def test_a_stash_written_by_a_child_is_read_by_the_parent() -> None:
    board = Scoreboard(3)
    assert board.stashed(1) == b"", "empty from the start"
    pid = os.fork()
    if pid == 0:
        board.stash(1, b"a long line\n" * 10)
        board.stash(1, b"shorter\n")
        os._exit(0)
    os.waitpid(pid, 0)
    assert board.stashed(1) == b"shorter\n"
    assert board.stashed(0) == board.stashed(2) == b""
    board.write(1, pid=9, state=WorkerState.RUNNING, job_id=4)
    assert board.stashed(1) == b"shorter\n", "beside the slot, not in it"
    board.clear(1)
    assert board.stashed(1) == b""


def test_a_stash_too_long_is_refused_and_the_last_one_kept() -> None:
    board = Scoreboard(2)
    assert board.stash(0, b"kept")
    assert not board.stash(0, b"x" * (STASH_BYTES + 1))
    assert board.stashed(0) == b"kept"
    assert board.stash(1, b"y" * STASH_BYTES)
    assert board.stashed(0) == b"kept"
    assert board.stashed(1) == b"y" * STASH_BYTES


def test_a_stash_left_half_written_reads_as_none() -> None:
    board = Scoreboard(1)
    board.stash(0, b"before")
    pid = os.fork()
    if pid == 0:
        # Begin a write the way Scoreboard.stash does, and die inside it.
        offset = _stash_offset(0, capacity=1)
        seq = struct.unpack_from("=Q", board._map, offset)[0]
        struct.pack_into("=Q", board._map, offset, seq + 1)
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    began = time.monotonic()
    assert board.stashed(0) is None
    assert time.monotonic() - began < 5
    board.clear(0)
    assert board.stashed(0) == b""


def _stash_offset(slot: int, *, capacity: int) -> int:
    from pdoflowd.daemon import scoreboard

    return (
        scoreboard._HEADER
        + scoreboard._SLOT.size * capacity
        + slot * scoreboard._STASH_SIZE
    )


def _slot_offset(slot: int) -> int:
    from pdoflowd.daemon import scoreboard

    return scoreboard._HEADER + slot * scoreboard._SLOT.size


def test_new_work_wakes_idle_and_claiming_workers_only() -> None:
    woken = {state for state in WorkerState if woken_by_new_work(state)}
    # A claim that looked before the work was there must not leave its
    # worker asleep for a whole poll interval.
    assert woken == {WorkerState.IDLE, WorkerState.CLAIMING}
