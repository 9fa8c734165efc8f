-- pdoflowd schema, version 11: schedules (periodic postings).

-- One row per fire time of a schedule that some daemon posted: the unique
-- key is what makes each fire time post once, whatever the number of
-- daemons and hosts. The row is inserted in the transaction that inserts
-- the posting, so a daemon that loses the race (or crashes) posts nothing.
-- Rows older than a schedule's newest may be pruned: a daemon never posts
-- a fire time at or before the newest one recorded.
CREATE TABLE pdoflowd.schedule_runs (
    schedule text NOT NULL,
    run_at timestamptz NOT NULL,
    posted_at timestamptz NOT NULL DEFAULT now(),
    daemon_id uuid NOT NULL,
    -- NULL once retention deletes the posting.
    posting_id bigint REFERENCES pdoflowd.postings (id) ON DELETE SET NULL,
    PRIMARY KEY (schedule, run_at)
);
CREATE INDEX schedule_runs_posting ON pdoflowd.schedule_runs (posting_id);

-- The schedules each daemon runs, as its configuration said when its
-- database session last started: what `pdoflow schedules` lists.
CREATE TABLE pdoflowd.schedules (
    daemon_id uuid NOT NULL
        REFERENCES pdoflowd.daemons (id) ON DELETE CASCADE,
    name text NOT NULL,
    entry_point text NOT NULL,
    cron text,
    every_s bigint,
    timezone text NOT NULL,
    priority integer NOT NULL,
    backfill integer NOT NULL,
    key_template text NOT NULL,
    args jsonb NOT NULL,
    kwargs jsonb NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (daemon_id, name),
    CHECK ((cron IS NULL) <> (every_s IS NULL))
);

-- Daemons post now: an upgrade grants the roles that had the daemon's
-- privileges what migrate.DAEMON_GRANTS adds (INSERT on postings and jobs,
-- these two tables), as it does after every migration.
