"""Retention against a real PostgreSQL: which postings pruning deletes,
in how many transactions, what it leaves alone, who may prune, and
``pdoflow prune`` and ``pdoflow export``."""

from __future__ import annotations

import io
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from harness import Roles, grant, migrate_before, wait_until
from pdoflowd.cli import main
from pdoflowd.client import Client, PruningNotAllowed
from pdoflowd.db import migrate, profiles, retention
from pdoflowd.db.retention import ChunkResult, PruneCount
from pdoflowd.exitcodes import EXIT_NOPERM, EXIT_OK, EXIT_USAGE
from pdoflowd.status import PostingStatus

DAY = 86400.0
AGES = {
    PostingStatus.FINISHED: 30 * DAY,
    PostingStatus.ERRORED_OUT: 90 * DAY,
    PostingStatus.CANCELLED: 90 * DAY,
}


def ended_posting(
    dsn: str,
    *,
    jobs: int = 3,
    status: str = "finished",
    ended_days_ago: float = 40.0,
) -> uuid.UUID:
    """A posting of ``jobs`` jobs that ended (all its jobs done, or errored
    out) ``ended_days_ago`` days ago, and one shared variable."""
    posting = Client(dsn).post("jobfns.noop", [[i] for i in range(jobs)])
    job_status = "done" if status == "finished" else "errored_out"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE pdoflowd.jobs SET status = %s, attempt = 1,"
            " completed_at = now() WHERE posting_id ="
            " (SELECT id FROM pdoflowd.postings WHERE uuid = %s)",
            (job_status, posting.id),
        )
        conn.execute(
            "UPDATE pdoflowd.postings SET status = %s,"
            " finished_at = now() - make_interval(secs => %s * 86400)"
            " WHERE uuid = %s",
            (status, ended_days_ago, posting.id),
        )
    Client(dsn).shared(posting.id).set("note", {"kept": "until pruned"})
    return posting.id


def posting_id(conn: psycopg.Connection[Any], posting: uuid.UUID) -> int:
    row = conn.execute(
        "SELECT id FROM pdoflowd.postings WHERE uuid = %s", (posting,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def remaining(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM pdoflowd.postings),"
            " (SELECT count(*) FROM pdoflowd.jobs),"
            " (SELECT count(*) FROM pdoflowd.shared_variables),"
            " (SELECT count(*) FROM pdoflowd.job_profiles),"
            " (SELECT count(*) FROM pdoflowd.profile_function_stats)"
        ).fetchone()
    assert row is not None
    keys = ("postings", "jobs", "shared", "profiles", "profile_stats")
    return dict(zip(keys, row, strict=True))


def exists(dsn: str, posting: uuid.UUID) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pdoflowd.postings WHERE uuid = %s",
            (posting,),
        ).fetchone()
    return row == (1,)


def job_count(dsn: str, posting: uuid.UUID) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pdoflowd.jobs AS j"
            " JOIN pdoflowd.postings AS p ON p.id = j.posting_id"
            " WHERE p.uuid = %s",
            (posting,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def add_profile(dsn: str, posting: uuid.UUID) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT j.id FROM pdoflowd.jobs AS j JOIN pdoflowd.postings AS p"
            " ON p.id = j.posting_id WHERE p.uuid = %s LIMIT 1",
            (posting,),
        ).fetchone()
        assert row is not None
        profiles.insert_profile(
            conn,
            profiles.ProfileRecord(
                job_id=row[0],
                attempt=1,
                entry_point="jobfns.noop",
                total_time=0.1,
                ncalls=2,
                primitive_calls=2,
                functions=[("a.py", 1, "f"), ("a.py", 9, "g")],
                stats=[(0, 1, 1, 0.05, 0.1), (1, 1, 1, 0.05, 0.05)],
                calls=[(0, 1, 1, 1, 0.05, 0.05)],
            ),
        )


def prune_all(dsn: str, batch: int = 1000) -> PruneCount:
    removed = PruneCount()
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            done = retention.prune_some(conn, AGES, batch=batch, postings=10)
            removed += done.removed
            if not done.more_left:
                return removed


# ------------------------------------------------------------ what goes


def test_pruning_removes_exactly_the_postings_ended_before_their_cutoff(
    dsn: str,
) -> None:
    old_finished = ended_posting(dsn, jobs=4)
    add_profile(dsn, old_finished)
    young_finished = ended_posting(dsn, ended_days_ago=29)
    # Errored-out and cancelled postings are kept longer.
    errored_kept = ended_posting(dsn, status="errored_out", ended_days_ago=60)
    errored_old = ended_posting(dsn, status="errored_out", ended_days_ago=91)
    cancelled_old = ended_posting(dsn, status="cancelled", ended_days_ago=91)
    executing = Client(dsn).post("jobfns.noop", [[1]]).id
    paused = Client(dsn).post("jobfns.noop", [[1]], paused=True).id
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Not ended, however old: never pruned.
        conn.execute(
            "UPDATE pdoflowd.postings SET created_at = now() - interval"
            " '400 days' WHERE uuid = ANY(%s)",
            ([executing, paused],),
        )
    before = remaining(dsn)
    assert before["profiles"] == 1 and before["profile_stats"] == 2

    removed = prune_all(dsn)

    assert removed == PruneCount(postings=3, jobs=4 + 3 + 3)
    for gone in (old_finished, errored_old, cancelled_old):
        assert not exists(dsn, gone)
    for kept in (young_finished, errored_kept, executing, paused):
        assert exists(dsn, kept)
    after = remaining(dsn)
    assert after["postings"] == before["postings"] - 3
    assert after["jobs"] == before["jobs"] - 10
    assert after["shared"] == before["shared"] - 3
    assert after["profiles"] == 0 and after["profile_stats"] == 0


def test_a_posting_with_a_job_still_running_is_kept_until_it_ends(
    dsn: str,
) -> None:
    # Marked finished by hand while one of its jobs still runs.
    posting = ended_posting(dsn, jobs=3)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE pdoflowd.jobs SET status = 'executing', owner = %s"
            " WHERE id = (SELECT min(id) FROM pdoflowd.jobs)",
            (uuid.uuid4(),),
        )

    assert prune_all(dsn) == PruneCount()
    assert job_count(dsn, posting) == 3

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE pdoflowd.jobs SET status = 'done'")
    assert prune_all(dsn) == PruneCount(1, 3)


def test_a_cancelled_claim_whose_run_may_go_on_keeps_its_posting(
    dsn: str,
) -> None:
    posting = ended_posting(dsn, status="cancelled", ended_days_ago=100)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE pdoflowd.jobs SET owner = %s"
            " WHERE id = (SELECT min(id) FROM pdoflowd.jobs)",
            (uuid.uuid4(),),
        )

    assert prune_all(dsn) == PruneCount()
    assert exists(dsn, posting)


def test_a_posting_is_pruned_a_batch_of_jobs_per_transaction(dsn: str) -> None:
    posting = ended_posting(dsn, jobs=35)
    observed = []
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        psycopg.connect(dsn, autocommit=True) as observer,
    ):
        ident = posting_id(conn, posting)
        chunks = []
        while not chunks or not chunks[-1].posting_deleted:
            chunks.append(retention.prune_chunk(conn, ident, AGES, batch=10))
            # Another session sees each chunk committed on its own.
            observed.append(job_count(dsn, posting))
        assert observer.execute(
            "SELECT count(*) FROM pdoflowd.postings WHERE id = %s", (ident,)
        ).fetchone() == (0,)

    assert chunks == [
        ChunkResult(True, 10, False),
        ChunkResult(True, 10, False),
        ChunkResult(True, 10, False),
        ChunkResult(True, 5, True),
    ]
    assert observed == [25, 15, 5, 0]


def test_a_posting_resumed_between_two_chunks_keeps_its_other_jobs(
    dsn: str,
) -> None:
    posting = ended_posting(
        dsn, jobs=35, status="errored_out", ended_days_ago=91
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        ident = posting_id(conn, posting)
        first = retention.prune_chunk(conn, ident, AGES, batch=10)
        Client(dsn).retry(posting)
        second = retention.prune_chunk(conn, ident, AGES, batch=10)

    assert first == ChunkResult(True, 10, False)
    assert second == ChunkResult(False, 0, False)
    assert job_count(dsn, posting) == 25
    assert Client(dsn).status(posting).status is PostingStatus.EXECUTING


def test_pruning_skips_a_posting_another_session_holds_without_waiting(
    dsn: str,
) -> None:
    held = ended_posting(dsn, jobs=2)
    free = ended_posting(dsn, jobs=2, ended_days_ago=35)
    with (
        psycopg.connect(dsn) as holder,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):
        holder.execute(
            "SELECT FROM pdoflowd.postings WHERE uuid = %s FOR UPDATE",
            (held,),
        )
        # A wait would end in an error here, not in a slow pass.
        conn.execute("SET lock_timeout = '5s'")
        done = retention.prune_some(conn, AGES, batch=10, postings=10)
        holder.rollback()

    assert done.removed == PruneCount(1, 2) and done.interrupted is None
    assert exists(dsn, held) and not exists(dsn, free)


def test_jobs_another_session_holds_are_skipped_and_keep_their_posting(
    dsn: str,
) -> None:
    posting = ended_posting(dsn, jobs=3)
    with (
        psycopg.connect(dsn) as holder,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):
        holder.execute(
            "SELECT FROM pdoflowd.jobs WHERE id ="
            " (SELECT min(id) FROM pdoflowd.jobs) FOR UPDATE"
        )
        conn.execute("SET lock_timeout = '5s'")
        done = retention.prune_some(conn, AGES, batch=10, postings=10)
        holder.rollback()

    assert done.removed == PruneCount(0, 2)
    assert job_count(dsn, posting) == 1
    assert prune_all(dsn) == PruneCount(1, 1)


def test_a_chunk_past_its_deadline_is_rolled_back_whole_and_ends_the_pass(
    dsn: str,
) -> None:
    posting = ended_posting(dsn, jobs=3)
    with (
        psycopg.connect(dsn) as holder,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):
        # Deleting the posting deletes its shared variable, which waits.
        holder.execute("SELECT FROM pdoflowd.shared_variables FOR UPDATE")
        before = conn.execute("SHOW statement_timeout").fetchone()
        done = retention.prune_some(
            conn, AGES, batch=10, postings=10, statement_timeout_s=0.2
        )
        after = conn.execute("SHOW statement_timeout").fetchone()
        holder.rollback()

    assert done.removed == PruneCount() and done.more_left
    assert done.interrupted is not None
    assert "statement timeout" in done.interrupted
    assert job_count(dsn, posting) == 3 and exists(dsn, posting)
    # The deadline was the chunk's alone.
    assert after == before
    assert prune_all(dsn) == PruneCount(1, 3)


def test_a_pass_stops_when_told_and_says_more_is_left(dsn: str) -> None:
    ended_posting(dsn, jobs=25)
    with psycopg.connect(dsn, autocommit=True) as conn:
        done = retention.prune_some(
            conn, AGES, batch=10, postings=10, go_on=lambda n: n < 2
        )

    assert done.removed == PruneCount(0, 20) and done.more_left
    assert prune_all(dsn, batch=10) == PruneCount(1, 5)


def test_only_one_session_holds_the_pruning_lock(dsn: str) -> None:
    with (
        psycopg.connect(dsn, autocommit=True) as first,
        psycopg.connect(dsn, autocommit=True) as second,
    ):
        assert retention.try_lock_pruning(first)
        assert not retention.try_lock_pruning(second)
        first.close()
        # Released when the first session's backend has gone.
        wait_until(lambda: retention.try_lock_pruning(second))


def test_finding_prunable_postings_reads_the_index_of_ended_ones(
    dsn: str,
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pdoflowd.postings (uuid, target_function,"
            " entry_point, status, finished_at)"
            " SELECT gen_random_uuid(), 'f', 'm.f', 'executing', NULL"
            " FROM generate_series(1, 20000)"
        )
        conn.execute(
            "INSERT INTO pdoflowd.postings (uuid, target_function,"
            " entry_point, status, finished_at)"
            " SELECT gen_random_uuid(), 'f', 'm.f', 'finished',"
            " now() - make_interval(days => i % 20)"
            " FROM generate_series(1, 20000) AS i"
        )
        conn.execute(
            "INSERT INTO pdoflowd.jobs (uuid, posting_id, status)"
            " SELECT gen_random_uuid(), p.id, s.status"
            " FROM pdoflowd.postings AS p,"
            " (VALUES ('done'), ('errored_out')) AS s(status)"
        )
        conn.execute("ANALYZE pdoflowd.postings")
        conn.execute("ANALYZE pdoflowd.jobs")
        params = {
            "finished": 30 * DAY,
            "errored_out": None,
            "cancelled": None,
            "limit": 100,
        }
        plan = json.dumps(
            conn.execute(
                "EXPLAIN (FORMAT JSON) " + retention._PRUNABLE_POSTINGS,
                params,
            ).fetchone()
        )

        one = {**params, "id": 1, "batch": 1000}
        chunk_plans = [
            json.dumps(
                conn.execute(
                    "EXPLAIN (FORMAT JSON) " + statement, one
                ).fetchone()
            )
            for statement in (
                retention._LOCK_POSTING,
                retention._DELETE_JOBS,
                retention._DELETE_POSTING,
            )
        ]

    assert "postings_ended" in plan, plan
    for each in (plan, *chunk_plans):
        assert '"Seq Scan"' not in each, each


# ------------------------------------------------------------ who prunes


def test_a_daemon_role_prunes_with_its_grants_alone(
    dsn: str, roles: Roles
) -> None:
    daemon_role = roles.make()
    grant(dsn, daemons=[daemon_role])
    posting = ended_posting(dsn, jobs=3)
    add_profile(dsn, posting)

    removed = Client(roles.dsn_of(daemon_role)).prune(30 * DAY)

    assert removed == PruneCount(1, 3)
    assert remaining(dsn)["profiles"] == 0


def test_a_submitter_is_refused_and_nothing_is_pruned(
    dsn: str, roles: Roles
) -> None:
    poster = roles.make()
    grant(dsn, submitters=[poster])
    mine = Client(roles.dsn_of(poster)).post("jobfns.noop", [[1]])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE pdoflowd.postings SET status = 'finished',"
            " finished_at = now() - interval '40 days'"
        )

    with pytest.raises(PruningNotAllowed, match="DELETE"):
        Client(roles.dsn_of(poster)).prune(30 * DAY)
    with pytest.raises(PruningNotAllowed):
        Client(roles.dsn_of(poster)).prune(30 * DAY, dry_run=True)
    assert exists(dsn, mine.id)


# ------------------------------------------------------------ the verbs


def run(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    *args: str,
) -> tuple[int, str, str]:
    """``pdoflow ARGS`` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def pdoflow(
    dsn: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Any:
    def call(*args: str) -> tuple[int, str, str]:
        return run(capsys, monkeypatch, "--dsn", dsn, *args)

    return call


def one_line_error(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pdoflow: ")
    return lines[0]


def test_prune_dry_run_counts_without_deleting(dsn: str, pdoflow: Any) -> None:
    ended_posting(dsn, jobs=4)
    ended_posting(dsn, jobs=2, status="errored_out", ended_days_ago=31)
    ended_posting(dsn, jobs=7, ended_days_ago=2)
    before = remaining(dsn)

    code, out, err = pdoflow("prune", "--older-than", "30d", "--dry-run")

    assert code == EXIT_OK, err
    assert out == (
        "would remove 2 postings and 6 jobs (finished, errored_out,"
        " cancelled, ended more than 30d ago)\n"
    )
    assert remaining(dsn) == before


def test_prune_json_says_what_it_removed(dsn: str, pdoflow: Any) -> None:
    ended_posting(dsn, jobs=4)
    errored = ended_posting(dsn, jobs=2, status="errored_out")

    code, out, err = pdoflow(
        "prune", "--older-than", "720h", "--status", "finished", "--json"
    )

    assert code == EXIT_OK, err
    assert json.loads(out) == {
        "dry_run": False,
        "older_than_s": 30 * DAY,
        "statuses": ["finished"],
        "postings": 1,
        "jobs": 4,
    }
    assert exists(dsn, errored)
    code, out, _ = pdoflow("prune", "--older-than", "0s", "--dry-run", "--json")
    assert json.loads(out)["postings"] == 1


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--older-than", "30", "30d"),
        ("--older-than", "-1d", "30d"),
        ("--older-than", "30 d", "30d"),
        ("--older-than", "1w", "30d"),
        ("--older-than", "nand", "30d"),
        ("--older-than", "99999999d", "at most"),
        ("--status", "executing", "finished, errored_out, cancelled"),
        ("--status", "finished,paused", "finished, errored_out, cancelled"),
        ("--status", "finished,,", "finished, errored_out, cancelled"),
        ("--status", "", "finished, errored_out, cancelled"),
        ("--batch", "100001", "1 to 100000"),
        ("--batch", "0", "1 to"),
    ],
)
def test_prune_refuses_a_bad_duration_or_status(
    pdoflow: Any, dsn: str, option: str, value: str, says: str
) -> None:
    posting = ended_posting(dsn)
    arguments = ["prune", "--older-than", "1d", f"{option}={value}"]

    code, out, err = pdoflow(*arguments)

    assert code == EXIT_USAGE
    line = one_line_error(err)
    assert option in line and says in line
    assert out == ""
    assert exists(dsn, posting)


def test_prune_needs_older_than(pdoflow: Any) -> None:
    code, _, err = pdoflow("prune", "--dry-run")
    assert code == EXIT_USAGE
    assert "--older-than" in one_line_error(err)


def test_prune_as_a_submitter_is_refused_with_noperm(
    dsn: str,
    roles: Roles,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    poster = roles.make()
    grant(dsn, submitters=[poster])

    code, _, err = run(
        capsys,
        monkeypatch,
        "--dsn",
        roles.dsn_of(poster),
        "prune",
        "--older-than",
        "1d",
    )

    assert code == EXIT_NOPERM
    assert "may not prune" in one_line_error(err)


def test_durations_are_accepted_by_the_older_options(
    dsn: str, pdoflow: Any
) -> None:
    posting = Client(dsn).post("jobfns.noop", [[1]])
    code, _out, err = pdoflow(
        "wait", str(posting.id), "--timeout", "0s", "--interval", "1s"
    )
    assert code == 2, err
    code, _, err = pdoflow("wait", str(posting.id), "--timeout", "soon")
    assert code == EXIT_USAGE
    assert "--timeout" in one_line_error(err)


def test_export_to_a_file_that_cannot_be_written_is_a_usage_error(
    dsn: str, pdoflow: Any, tmp_path: Path
) -> None:
    posting = ended_posting(dsn)
    target = tmp_path / "missing" / "out.jsonl"

    code, out, err = pdoflow("export", str(posting), "--output", str(target))

    assert (code, out) == (EXIT_USAGE, "")
    assert str(target) in one_line_error(err)
    assert not target.parent.exists()


def test_export_of_an_unknown_posting_writes_nothing(
    pdoflow: Any, tmp_path: Path
) -> None:
    target = tmp_path / "out.jsonl"
    code, _out, err = pdoflow(
        "export", str(uuid.uuid4()), "--output", str(target)
    )
    assert code == EXIT_USAGE
    assert "no posting" in one_line_error(err)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_a_role_granted_a_daemons_privileges_before_retention_may_prune(
    empty_dsn: str,
) -> None:
    made = Roles(empty_dsn)
    try:
        role = made.make()
        with psycopg.connect(empty_dsn, autocommit=True) as conn:
            pending = migrate_before(conn, "postings_ended")
            # What a daemon role was granted on these tables until now.
            conn.execute(
                sql.SQL("GRANT USAGE ON SCHEMA pdoflowd TO {}").format(
                    sql.Identifier(role)
                )
            )
            conn.execute(
                sql.SQL(
                    "GRANT SELECT, UPDATE ON pdoflowd.postings, pdoflowd.jobs"
                    " TO {}"
                ).format(sql.Identifier(role))
            )

        assert migrate.upgrade(empty_dsn) == pending

        with psycopg.connect(made.dsn_of(role)) as conn:
            assert retention.may_prune(conn)
    finally:
        made.drop()
