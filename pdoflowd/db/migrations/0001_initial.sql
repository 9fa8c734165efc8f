-- pdoflowd schema, version 1: postings, jobs and the daemons that run them.

CREATE TABLE pdoflowd.postings (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uuid uuid NOT NULL UNIQUE,
    poster text NOT NULL DEFAULT session_user,
    target_function text NOT NULL,
    entry_point text NOT NULL,
    status text NOT NULL DEFAULT 'executing'
        CHECK (status IN ('paused', 'executing', 'finished', 'errored_out')),
    timeout_s double precision CHECK (timeout_s > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);

-- The maintenance sweep looks for executing postings with nothing left.
CREATE INDEX postings_executing ON pdoflowd.postings (id)
    WHERE status = 'executing';

CREATE TABLE pdoflowd.jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uuid uuid NOT NULL UNIQUE,
    posting_id bigint NOT NULL
        REFERENCES pdoflowd.postings (id) ON DELETE CASCADE,
    priority integer NOT NULL DEFAULT 0,
    posargs jsonb NOT NULL DEFAULT '[]',
    kwargs jsonb NOT NULL DEFAULT '{}',
    tries_remaining integer NOT NULL DEFAULT 3 CHECK (tries_remaining >= 0),
    status text NOT NULL DEFAULT 'waiting'
        CHECK (status IN ('waiting', 'executing', 'done', 'errored_out')),
    attempt integer NOT NULL DEFAULT 0,
    owner uuid,
    daemon_id uuid,
    created_at timestamptz NOT NULL DEFAULT now(),
    run_after timestamptz,
    claimed_at timestamptz,
    work_started_at timestamptz,
    completed_at timestamptz,
    exited_ok boolean,
    error text,
    traceback text
);

-- The claim walks this index in its ORDER BY; finished jobs are not in it,
-- so its cost does not grow with the history kept in the table.
CREATE INDEX jobs_claim ON pdoflowd.jobs (priority DESC, id)
    WHERE status = 'waiting';
-- Rescue finds a dead worker's or a dead host's jobs here.
CREATE INDEX jobs_executing ON pdoflowd.jobs (daemon_id, owner)
    WHERE status = 'executing';
-- Per-posting progress counts and the finish / error threshold checks.
CREATE INDEX jobs_posting_status ON pdoflowd.jobs (posting_id, status);

CREATE TABLE pdoflowd.daemons (
    id uuid PRIMARY KEY,
    hostname text NOT NULL,
    pid integer NOT NULL,
    version text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stopped_at timestamptz
);
