"""The shared-memory scoreboard, across a real fork."""

from __future__ import annotations

import os

from pdoflowd.scoreboard import Scoreboard, WorkerState


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
