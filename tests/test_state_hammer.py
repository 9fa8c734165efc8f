"""A posting's status and its jobs' statuses agree at every commit, however
claims, outcomes, take-backs, rescues and controls interleave.

A seeded random driver: threads stand for daemons (each with a few workers
that claim, start, finish, flush, release, die, and a supervisor that
hears of cancels and sweeps) and for a poster (pause, resume, cancel and
retry, sometimes in a transaction it holds open a moment). Every action is
the real statement of ``queries`` on a real connection; after each one its
thread checks the invariants in one snapshot. A job started by one worker
while another still runs it breaks a primary key of ``hammer_runs``.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from pdoflowd.client import Client
from pdoflowd.db import postings, queue, upkeep

POSTINGS = 4
JOBS_PER_POSTING = 10
DAEMON_THREADS = 3
WORKERS_PER_DAEMON = 2
STEPS = 600
ERROR_THRESHOLD = 3
RUNTIME_LIMIT_S = 25.0

# Each names what it found; a row means the invariant is broken.
INVARIANTS = {
    "a finished posting has a job left to run": """
        SELECT j.id FROM pdoflowd.jobs j
        JOIN pdoflowd.postings p ON p.id = j.posting_id
        WHERE p.status = 'finished' AND j.status IN ('waiting', 'executing')
    """,
    "a cancelled posting has a job left to run": """
        SELECT j.id FROM pdoflowd.jobs j
        JOIN pdoflowd.postings p ON p.id = j.posting_id
        WHERE p.status = 'cancelled' AND j.status IN ('waiting', 'executing')
    """,
    "an errored-out posting is short of errored-out jobs": f"""
        SELECT p.id FROM pdoflowd.postings p
        WHERE p.status = 'errored_out'
          AND (SELECT count(*) FROM pdoflowd.jobs j WHERE j.posting_id = p.id
               AND j.status = 'errored_out') < {ERROR_THRESHOLD}
    """,
    "an executing job has no owner": """
        SELECT id FROM pdoflowd.jobs
        WHERE status = 'executing' AND (owner IS NULL OR daemon_id IS NULL)
    """,
    "a waiting job has an owner or no try left": """
        SELECT id FROM pdoflowd.jobs
        WHERE status = 'waiting' AND (owner IS NOT NULL OR tries_remaining < 1)
    """,
    "a cancelled claim outside a cancelled posting": """
        SELECT j.id FROM pdoflowd.jobs j
        JOIN pdoflowd.postings p ON p.id = j.posting_id
        WHERE j.status = 'errored_out' AND j.owner IS NOT NULL
          AND p.status <> 'cancelled'
    """,
    "a done job that did not exit ok": """
        SELECT id FROM pdoflowd.jobs
        WHERE status = 'done' AND exited_ok IS NOT TRUE
    """,
}
_CHECK = "SELECT " + ", ".join(
    f"ARRAY({query})" for query in INVARIANTS.values()
)


class Broken(Exception):
    """An invariant failed; says which, after what."""


def check_invariants(conn: Any, after: str) -> None:
    row = conn.execute(_CHECK).fetchone()
    for name, found in zip(INVARIANTS, row, strict=True):
        if found:
            raise Broken(f"{name} (rows {found}) after {after}")


@dataclass
class SimWorker:
    owner: uuid.UUID = field(default_factory=uuid.uuid4)
    batch: list[queue.ClaimedJob] = field(default_factory=list)
    running: queue.ClaimedJob | None = None
    pending: list[queue.Outcome] = field(default_factory=list)
    in_doubt: bool = False


class Driver:
    """The shared state of one hammering: postings, log, failures."""

    def __init__(self, dsn: str, seed: int) -> None:
        self.dsn = dsn
        self.seed = seed
        self.postings: list[uuid.UUID] = []
        self.failures: list[str] = []
        self.log: list[str] = []
        self.lock = threading.Lock()
        self.deadline = time.monotonic() + RUNTIME_LIMIT_S

    def note(self, who: str, what: str) -> str:
        line = f"{who}: {what}"
        with self.lock:
            self.log.append(line)
        return line

    def fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)

    def running(self) -> bool:
        return not self.failures and time.monotonic() < self.deadline


class SimDaemon:
    """A daemon: its workers' protocol and its supervisor's chores."""

    def __init__(self, driver: Driver, index: int, conn: Any) -> None:
        self.driver = driver
        self.name = f"daemon{index}"
        self.rng = random.Random(driver.seed * 100 + index)
        self.conn = conn
        self.new_host()

    def new_host(self) -> None:
        self.daemon_id = uuid.uuid4()
        upkeep.heartbeat(
            self.conn,
            daemon_id=self.daemon_id,
            hostname=self.name,
            pid=1,
            version="0",
            lease_s=60,
        )
        self.workers = [SimWorker() for _ in range(WORKERS_PER_DAEMON)]

    # ------------------------------------------------------------ steps

    def step(self) -> str:
        w = self.rng.choice(self.workers)
        actions: list[tuple[int, Callable[[SimWorker], str]]] = [
            (2, self.hear_of_cancels),
            (2, self.sweep),
            (1, self.rescue),
        ]
        if w.batch and w.running is None:
            actions += [(8, self.start), (1, self.release)]
        if w.running is not None:
            actions.append((8, self.finish))
        if w.pending:
            actions.append((6, self.flush))
        if not (w.batch or w.running or w.pending):
            actions.append((8, self.claim))
        else:
            actions.append((1, self.die))
        if self.rng.random() < 0.005:
            actions = [(1, self.host_dies)]
        _, action = self.rng.choices(actions, [a[0] for a in actions])[0]
        return action(w)

    def claim(self, w: SimWorker) -> str:
        w.batch = queue.claim(
            self.conn,
            owner=w.owner,
            daemon_id=self.daemon_id,
            limit=self.rng.randint(1, 3),
        )
        return f"{w.owner} claimed {[j.id for j in w.batch]}"

    def start(self, w: SimWorker) -> str:
        # The worker's check: when told of a cancel, or now and then.
        if w.in_doubt or self.rng.random() < 0.3:
            w.in_doubt = False
            held = queue.held_claims(self.conn, owner=w.owner, jobs=w.batch)
            lost = [j for j in w.batch if j.id not in held]
            queue.give_up_claims(
                self.conn,
                owner=w.owner,
                claims=[(j.id, j.attempt) for j in lost],
            )
            w.batch = [j for j in w.batch if j.id in held]
            if not w.batch:
                return f"{w.owner} gave up {[j.id for j in lost]}"
        job = w.batch.pop(0)
        try:
            self.conn.execute(
                "INSERT INTO hammer_runs (job_id, owner) VALUES (%s, %s)",
                (job.id, w.owner),
            )
        except psycopg.errors.UniqueViolation:
            raise Broken(f"job {job.id} started twice at once") from None
        w.running = job
        return f"{w.owner} started {job.id}"

    def end_run(self, w: SimWorker) -> None:
        if w.running is not None:
            self.conn.execute(
                "DELETE FROM hammer_runs WHERE job_id = %s AND owner = %s",
                (w.running.id, w.owner),
            )

    def finish(self, w: SimWorker) -> str:
        assert w.running is not None
        self.end_run(w)
        job, w.running = w.running, None
        kind = self.rng.choices(
            ["done", "failed", "timeout", "refused"], [6, 3, 1, 1]
        )[0]
        w.pending.append(
            queue.Outcome(
                job.id,
                job.attempt,
                kind,
                error=None if kind == "done" else kind,
                retry_delay_s=0.0,
            )
        )
        return f"{w.owner} ended {job.id} as {kind}"

    def flush(self, w: SimWorker) -> str:
        if not w.pending:
            return "nothing to flush"
        outcomes, w.pending = w.pending, []
        recorded = queue.record_outcomes(
            self.conn, owner=w.owner, outcomes=outcomes
        )
        written = {r.job_id for r in recorded}
        queue.give_up_claims(
            self.conn,
            owner=w.owner,
            claims=[
                (o.job_id, o.attempt)
                for o in outcomes
                if o.job_id not in written
            ],
        )
        ended = {r.posting_id for r in recorded if r.status.value != "waiting"}
        # Now and then the settle is left to the sweep.
        if ended and self.rng.random() < 0.7:
            queue.settle_postings(
                self.conn, ended, error_threshold=ERROR_THRESHOLD
            )
        return f"{w.owner} flushed {[(o.job_id, o.kind) for o in outcomes]}"

    def release(self, w: SimWorker) -> str:
        w.pending += [
            queue.Outcome(j.id, j.attempt, "released") for j in w.batch
        ]
        w.batch = []
        return f"{w.owner} released its batch"

    def take_back(self, w: SimWorker, reason: str) -> str:
        self.end_run(w)
        requeued = queue.requeue_owner(
            self.conn,
            daemon_id=self.daemon_id,
            owner=w.owner,
            running_job_id=None if w.running is None else w.running.id,
            reason=reason,
        )
        errored = {
            r.posting_id for r in requeued if r.status.value == "errored_out"
        }
        queue.settle_postings(
            self.conn, errored, error_threshold=ERROR_THRESHOLD
        )
        self.workers[self.workers.index(w)] = SimWorker()
        return f"{w.owner} {reason}: took back {[r.job_id for r in requeued]}"

    def die(self, w: SimWorker) -> str:
        return self.take_back(w, "died")

    def hear_of_cancels(self, _: SimWorker) -> str:
        """What the supervisor does on a cancel notification."""
        doubtful = upkeep.cancelled_claim_owners(
            self.conn, daemon_id=self.daemon_id
        )
        running = {w.running.id: w for w in self.workers if w.running}
        doomed = queue.cancelled_among(self.conn, running)
        for w in list(self.workers):
            if w.running is not None and w.running.id in doomed:
                self.take_back(w, "was cancelled")
            elif w.owner in doubtful:
                w.in_doubt = True
        return f"heard of cancels: {sorted(doomed)} ended"

    def sweep(self, _: SimWorker) -> str:
        unsettled = queue.unsettled_postings(self.conn)
        queue.settle_postings(
            self.conn, unsettled, error_threshold=ERROR_THRESHOLD
        )
        return f"swept {unsettled}"

    def rescue(self, _: SimWorker) -> str:
        rescued = upkeep.take_back_ownerless_jobs(
            self.conn, may_declare_lost=True
        )
        errored = {
            r.posting_id for r in rescued if r.status.value == "errored_out"
        }
        queue.settle_postings(
            self.conn, errored, error_threshold=ERROR_THRESHOLD
        )
        return f"rescued {[r.job_id for r in rescued]}"

    def host_dies(self, _: SimWorker) -> str:
        for w in self.workers:
            self.end_run(w)
        self.conn.execute(
            "UPDATE pdoflowd.daemons SET heartbeat_at = now() - interval"
            " '1 hour' WHERE id = %s",
            (self.daemon_id,),
        )
        lost = self.daemon_id
        self.new_host()
        return f"host {lost} died"

    def stop(self) -> None:
        """The daemon stops: every worker flushes, then is taken back."""
        for w in list(self.workers):
            self.flush(w)
            self.take_back(w, "stopped")


class Poster:
    """Controls on random postings, sometimes held open a moment."""

    def __init__(self, driver: Driver, conn: Any) -> None:
        self.driver = driver
        self.rng = random.Random(driver.seed * 100 + 99)
        self.conn = conn

    def step(self) -> str:
        action = self.rng.choices(
            ["post", "pause", "resume", "cancel", "retry"], [2, 2, 3, 2, 4]
        )[0]
        if action == "post":
            return f"posted {post(self.driver, self.conn)}"
        posting = self.rng.choice(self.driver.postings)
        tries = self.rng.randint(1, 3) if action == "retry" else None
        held = self.rng.random() < 0.5
        try:
            if held:
                with self.conn.transaction():
                    postings.control_posting(
                        self.conn, posting, action, tries=tries
                    )
                    time.sleep(self.rng.uniform(0.001, 0.02))
            else:
                postings.control_posting(
                    self.conn, posting, action, tries=tries
                )
        except psycopg.errors.ObjectNotInPrerequisiteState:
            return f"{action} {posting} refused"
        return f"{action} {posting}{' (held)' if held else ''}"


def post(driver: Driver, conn: Any) -> uuid.UUID:
    posting = Client(driver.dsn).post(
        "jobfns.noop",
        [[i] for i in range(JOBS_PER_POSTING)],
        tries=2,
        conn=conn,
    )
    driver.postings.append(posting.id)
    return posting.id


def hammer(driver: Driver, who: str, make_step: Callable[[], str]) -> None:
    try:
        with psycopg.connect(driver.dsn, autocommit=True) as checker:
            for _ in range(STEPS):
                if not driver.running():
                    return
                what = driver.note(who, make_step())
                check_invariants(checker, what)
    except Broken as broken:
        driver.fail(str(broken))
    except Exception as exc:
        driver.fail(f"{who}: {type(exc).__name__}: {exc}")


@pytest.mark.parametrize("seed", [1, 2])
def test_postings_and_their_jobs_agree_at_every_commit(
    dsn: str, seed: int
) -> None:
    driver = Driver(dsn, seed)
    with psycopg.connect(dsn, autocommit=True) as setup:
        for _ in range(POSTINGS):
            post(driver, setup)
        setup.execute(
            "CREATE TABLE hammer_runs (job_id bigint PRIMARY KEY, owner uuid)"
        )
    connections = [
        psycopg.connect(dsn, autocommit=True) for _ in range(DAEMON_THREADS + 1)
    ]
    try:
        daemons = [
            SimDaemon(driver, i, connections[i]) for i in range(DAEMON_THREADS)
        ]
        poster = Poster(driver, connections[-1])
        threads = [
            threading.Thread(target=hammer, args=(driver, d.name, d.step))
            for d in daemons
        ]
        threads.append(
            threading.Thread(
                target=hammer, args=(driver, "poster", poster.step)
            )
        )
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not driver.failures, _report(driver)
        # Everyone stops; whatever is left is taken back and settled.
        for d in daemons:
            d.stop()
        daemons[0].rescue(daemons[0].workers[0])
        daemons[0].sweep(daemons[0].workers[0])
        conn = connections[0]
        check_invariants(conn, "the end")
        assert queue.unsettled_postings(conn) == []
        leftovers = conn.execute(
            "SELECT id, status, owner FROM pdoflowd.jobs WHERE status ="
            " 'executing' OR (status = 'errored_out' AND owner IS NOT NULL)"
        ).fetchall()
        assert leftovers == [], _report(driver)
    finally:
        for c in connections:
            c.close()


def _report(driver: Driver) -> str:
    tail = "\n".join(driver.log[-40:])
    return f"seed {driver.seed}: {driver.failures}\nlast steps:\n{tail}"
