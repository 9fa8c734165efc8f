-- pdoflowd schema, version 8: schedules (periodic postings).

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

-- Daemons post now: roles granted the daemon's privileges before this
-- version (UPDATE on pdoflowd.jobs) get what schedules need too
-- (migrate.DAEMON_GRANTS lists it for roles granted from now on).
DO $$
DECLARE
    role_name text;
BEGIN
    FOR role_name IN
        SELECT DISTINCT g.grantee::regrole::text
        FROM pg_class AS c, aclexplode(c.relacl) AS g
        WHERE c.oid = 'pdoflowd.jobs'::regclass
          AND g.privilege_type = 'UPDATE'
          AND g.grantee <> 0
          AND g.grantee <> c.relowner
    LOOP
        EXECUTE format(
            'GRANT INSERT (uuid, target_function, entry_point, status,'
            ' timeout_s, requires, store_result, tries, idempotency_key,'
            ' key_scope) ON pdoflowd.postings TO %s', role_name);
        EXECUTE format(
            'GRANT INSERT (uuid, posting_id, priority, posargs, kwargs,'
            ' tries_remaining, run_after) ON pdoflowd.jobs TO %s', role_name);
        EXECUTE format(
            'GRANT SELECT, INSERT, UPDATE, DELETE ON pdoflowd.schedule_runs,'
            ' pdoflowd.schedules TO %s', role_name);
    END LOOP;
END
$$;
