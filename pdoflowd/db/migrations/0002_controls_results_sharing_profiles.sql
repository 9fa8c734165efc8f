-- pdoflowd schema, version 2: cancelled postings, requirements, results,
-- progress, shared variables, profiles, and row-level security for
-- submitters.

ALTER TABLE pdoflowd.postings
    DROP CONSTRAINT postings_status_check,
    ADD CONSTRAINT postings_status_check CHECK (status IN (
        'paused', 'executing', 'finished', 'errored_out', 'cancelled')),
    -- Capabilities a daemon must provide (workers.provides) to claim a job.
    ADD COLUMN requires text[] NOT NULL DEFAULT '{}',
    -- Whether the jobs' return values are kept in jobs.result.
    ADD COLUMN store_result boolean NOT NULL DEFAULT false,
    -- The tries each job was given; a retry gives them again.
    ADD COLUMN tries integer NOT NULL DEFAULT 3 CHECK (tries >= 1);

ALTER TABLE pdoflowd.jobs
    ADD COLUMN result jsonb,
    ADD COLUMN progress real CHECK (progress >= 0 AND progress <= 1),
    ADD COLUMN progress_note text,
    ADD COLUMN progress_at timestamptz;

-- What each daemon claims, so that a job nobody can run can be told apart.
ALTER TABLE pdoflowd.daemons
    ADD COLUMN provides text[] NOT NULL DEFAULT '{}',
    ADD COLUMN posters text[] NOT NULL DEFAULT '{}';

-- Shared variables: small JSON values the jobs of one posting share.
CREATE TABLE pdoflowd.shared_variables (
    posting_id bigint NOT NULL
        REFERENCES pdoflowd.postings (id) ON DELETE CASCADE,
    name text NOT NULL,
    value jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (posting_id, name)
);

-- Profiles of sampled jobs (jobs.profile_sample_rate), as pstats sees them.
CREATE TABLE pdoflowd.job_profiles (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id bigint NOT NULL REFERENCES pdoflowd.jobs (id) ON DELETE CASCADE,
    attempt integer NOT NULL,
    entry_point text NOT NULL,
    total_time double precision NOT NULL,
    ncalls bigint NOT NULL,
    primitive_calls bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_profiles_job ON pdoflowd.job_profiles (job_id);
CREATE INDEX job_profiles_entry_point ON pdoflowd.job_profiles (entry_point);

-- Each profiled function once: (file, first line, name) as pstats keys it.
CREATE TABLE pdoflowd.profile_functions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    filename text NOT NULL,
    line integer NOT NULL,
    name text NOT NULL,
    UNIQUE (filename, line, name)
);

CREATE TABLE pdoflowd.profile_function_stats (
    profile_id bigint NOT NULL
        REFERENCES pdoflowd.job_profiles (id) ON DELETE CASCADE,
    function_id bigint NOT NULL REFERENCES pdoflowd.profile_functions (id),
    ncalls bigint NOT NULL,
    primitive_calls bigint NOT NULL,
    tottime double precision NOT NULL,
    cumtime double precision NOT NULL,
    PRIMARY KEY (profile_id, function_id)
);
CREATE INDEX profile_function_stats_function
    ON pdoflowd.profile_function_stats (function_id);

CREATE TABLE pdoflowd.profile_call_map (
    profile_id bigint NOT NULL
        REFERENCES pdoflowd.job_profiles (id) ON DELETE CASCADE,
    caller_id bigint NOT NULL REFERENCES pdoflowd.profile_functions (id),
    callee_id bigint NOT NULL REFERENCES pdoflowd.profile_functions (id),
    ncalls bigint NOT NULL,
    primitive_calls bigint NOT NULL,
    tottime double precision NOT NULL,
    cumtime double precision NOT NULL,
    PRIMARY KEY (profile_id, caller_id, callee_id)
);

-- Row-level security: a role without UPDATE on pdoflowd.jobs (a submitter)
-- sees and adds only postings whose poster it is, and their jobs and
-- shared variables. Table owners and superusers are not subject to it; a
-- daemon role (UPDATE on pdoflowd.jobs) passes the first, cheap test once
-- per statement.
ALTER TABLE pdoflowd.postings ENABLE ROW LEVEL SECURITY;
CREATE POLICY postings_of_their_poster ON pdoflowd.postings
    USING ((SELECT has_table_privilege('pdoflowd.jobs'::regclass, 'UPDATE'))
           OR poster = session_user);

ALTER TABLE pdoflowd.jobs ENABLE ROW LEVEL SECURITY;
CREATE POLICY jobs_of_visible_postings ON pdoflowd.jobs
    USING ((SELECT has_table_privilege('pdoflowd.jobs'::regclass, 'UPDATE'))
           OR EXISTS (SELECT FROM pdoflowd.postings AS p
                      WHERE p.id = jobs.posting_id));

ALTER TABLE pdoflowd.shared_variables ENABLE ROW LEVEL SECURITY;
CREATE POLICY shared_variables_of_visible_postings
    ON pdoflowd.shared_variables
    USING ((SELECT has_table_privilege('pdoflowd.jobs'::regclass, 'UPDATE'))
           OR EXISTS (SELECT FROM pdoflowd.postings AS p
                      WHERE p.id = shared_variables.posting_id));

-- Pause, resume, cancel, retry and mark a posting: for its poster (the
-- session user that inserted it) or a role with UPDATE on pdoflowd.jobs.
-- A submitter needs no UPDATE privilege of its own, so it cannot touch a
-- job any other way. Anyone else is told the posting does not exist.
CREATE FUNCTION pdoflowd.control_posting(
    posting_uuid uuid, action text, fresh_tries integer DEFAULT NULL)
RETURNS TABLE (new_status text, jobs_changed bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target pdoflowd.postings%ROWTYPE;
    changed bigint := 0;
BEGIN
    SELECT * INTO target FROM pdoflowd.postings AS p
    WHERE p.uuid = posting_uuid
    FOR UPDATE;
    IF NOT FOUND OR NOT (
        target.poster = session_user
        OR has_table_privilege(session_user, 'pdoflowd.jobs'::regclass,
                               'UPDATE')) THEN
        RAISE EXCEPTION 'no posting %', posting_uuid
            USING ERRCODE = 'no_data_found';
    END IF;
    IF action = 'pause' THEN
        IF target.status <> 'executing' THEN
            RAISE EXCEPTION 'posting % is %; only an executing posting can '
                'be paused', posting_uuid, target.status
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
        UPDATE pdoflowd.postings SET status = 'paused'
        WHERE id = target.id;
    ELSIF action = 'resume' THEN
        IF target.status NOT IN ('paused', 'errored_out') THEN
            RAISE EXCEPTION 'posting % is %; only a paused or errored-out '
                'posting can be resumed', posting_uuid, target.status
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
        UPDATE pdoflowd.postings SET status = 'executing', finished_at = NULL
        WHERE id = target.id;
        PERFORM pg_notify('pdoflowd_jobs', '');
    ELSIF action = 'cancel' THEN
        IF target.status NOT IN ('paused', 'executing', 'errored_out') THEN
            RAISE EXCEPTION 'posting % is %; it has ended already',
                posting_uuid, target.status
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
        UPDATE pdoflowd.postings SET status = 'cancelled', finished_at = now()
        WHERE id = target.id;
        -- Running jobs lose their owner here, so a late outcome of theirs
        -- is fenced off; their daemon ends their worker processes.
        UPDATE pdoflowd.jobs
        SET status = 'errored_out', error = 'cancelled', traceback = NULL,
            exited_ok = false, completed_at = now(), owner = NULL
        WHERE posting_id = target.id AND status IN ('waiting', 'executing');
        GET DIAGNOSTICS changed = ROW_COUNT;
    ELSIF action = 'retry' THEN
        IF fresh_tries IS NOT NULL AND fresh_tries < 1 THEN
            RAISE EXCEPTION 'tries must be at least 1, got %', fresh_tries
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        UPDATE pdoflowd.jobs
        SET status = 'waiting',
            tries_remaining = coalesce(fresh_tries, target.tries),
            run_after = NULL, completed_at = NULL, exited_ok = NULL
        WHERE posting_id = target.id AND status = 'errored_out';
        GET DIAGNOSTICS changed = ROW_COUNT;
        IF changed > 0 THEN
            UPDATE pdoflowd.postings
            SET status = CASE WHEN status = 'paused' THEN 'paused'
                              ELSE 'executing' END,
                finished_at = NULL
            WHERE id = target.id;
            PERFORM pg_notify('pdoflowd_jobs', '');
        END IF;
    ELSIF action IN ('finished', 'errored_out') THEN
        UPDATE pdoflowd.postings
        SET status = action, finished_at = coalesce(finished_at, now())
        WHERE id = target.id;
    ELSE
        RAISE EXCEPTION 'unknown action %', action
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
        SELECT p.status, changed FROM pdoflowd.postings AS p
        WHERE p.id = target.id;
END
$$;
REVOKE ALL ON FUNCTION pdoflowd.control_posting(uuid, text, integer)
    FROM PUBLIC;
