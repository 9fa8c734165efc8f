-- pdoflowd schema as a fresh install creates it (the sum of migrations/).

CREATE TABLE pdoflowd.postings (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uuid uuid NOT NULL UNIQUE,
    poster text NOT NULL DEFAULT session_user,
    target_function text NOT NULL,
    entry_point text NOT NULL,
    status text NOT NULL DEFAULT 'executing' CHECK (status IN (
        'paused', 'executing', 'finished', 'errored_out', 'cancelled')),
    timeout_s double precision CHECK (timeout_s > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    -- Capabilities a daemon must provide (workers.provides) to claim a job.
    requires text[] NOT NULL DEFAULT '{}',
    -- Whether the jobs' return values are kept in jobs.result.
    store_result boolean NOT NULL DEFAULT false,
    -- The tries each job was given; a retry gives them again.
    tries integer NOT NULL DEFAULT 3 CHECK (tries >= 1),
    -- The poster's key for the posting (see postings_idempotency_key).
    idempotency_key text CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    key_scope text NOT NULL DEFAULT 'active'
        CHECK (key_scope IN ('active', 'forever')),
    -- What an upstream posting's failure does to this one (see
    -- posting_dependencies), whether its jobs are held now, and why a
    -- cancel that was nobody's command ended it.
    on_failure text NOT NULL DEFAULT 'cancel'
        CHECK (on_failure IN ('cancel', 'run')),
    held boolean NOT NULL DEFAULT false,
    cancel_reason text,
    -- Concurrency caps: at most max_running of its jobs executing at once,
    -- across all hosts; the named resources its jobs use (each bounded
    -- cluster-wide by the daemons' jobs.limits).
    max_running integer CHECK (max_running >= 1),
    uses text[] NOT NULL DEFAULT '{}'
);

-- While a posting with a key has not ended (paused or executing), another
-- posting of the same poster with that key cannot be inserted: a second
-- post returns the first. With key_scope 'forever' the key stays taken for
-- as long as the row exists. Per poster, so a key never tells one poster
-- of another's postings.
CREATE UNIQUE INDEX postings_idempotency_key
    ON pdoflowd.postings (poster, idempotency_key)
    WHERE idempotency_key IS NOT NULL
          AND (key_scope = 'forever' OR status IN ('paused', 'executing'));

-- The maintenance sweep looks for executing postings with nothing left.
CREATE INDEX postings_executing ON pdoflowd.postings (id)
    WHERE status = 'executing';

-- The capped postings running now: the claim asks whether there are any
-- on every call, and finds them here.
CREATE INDEX postings_capped ON pdoflowd.postings (id)
    WHERE status = 'executing' AND (max_running IS NOT NULL OR uses <> '{}');

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
        CHECK (status IN (
            'held', 'waiting', 'executing', 'done', 'errored_out')),
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
    traceback text,
    result jsonb,
    progress real CHECK (progress >= 0 AND progress <= 1),
    progress_note text,
    progress_at timestamptz
);

-- The claim walks this index in its ORDER BY; finished jobs are not in it,
-- so its cost does not grow with the history kept in the table.
CREATE INDEX jobs_claim ON pdoflowd.jobs (priority DESC, id)
    WHERE status = 'waiting';
-- Rescue finds a dead worker's or a dead host's jobs here.
CREATE INDEX jobs_executing ON pdoflowd.jobs (daemon_id, owner)
    WHERE status = 'executing';
-- Per-posting progress counts and the finish / error threshold checks, and
-- a capped posting's executing jobs' count.
CREATE INDEX jobs_posting_status ON pdoflowd.jobs (posting_id, status);
-- A capped posting's waiting jobs, best first: its claim walks this range
-- (its executing jobs are counted through jobs_posting_status). Partial,
-- so a job leaves it when claimed; widening jobs_posting_status instead
-- cost the uncapped claim a quarter more, its entries no longer
-- deduplicated.
CREATE INDEX jobs_capped_claim
    ON pdoflowd.jobs (posting_id, priority DESC, id)
    WHERE status = 'waiting';

CREATE TABLE pdoflowd.daemons (
    id uuid PRIMARY KEY,
    hostname text NOT NULL,
    pid integer NOT NULL,
    version text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stopped_at timestamptz,
    -- What the daemon claims, so that a job nobody can run can be told apart.
    provides text[] NOT NULL DEFAULT '{}',
    posters text[] NOT NULL DEFAULT '{}',
    -- Owner liveness (see queries.take_back_ownerless_jobs): the lease
    -- others wait for its next heartbeat, the owner tokens its live workers
    -- hold, and when its previous heartbeat was.
    lease_s double precision NOT NULL DEFAULT 30,
    live_owners uuid[] NOT NULL DEFAULT '{}',
    previous_heartbeat_at timestamptz,
    -- The jobs.limits it claims under (name -> limit), to compare.
    limits jsonb NOT NULL DEFAULT '{}'
);

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
-- The end of what one attempt of a job wrote to stdout and stderr (at most
-- the daemon's jobs.output_tail_bytes of it, as text) and how many bytes
-- it wrote in all. Written by the worker as the attempt ends, when it
-- wrote anything; gone with its job.
CREATE TABLE pdoflowd.job_output (
    job_id bigint NOT NULL REFERENCES pdoflowd.jobs (id) ON DELETE CASCADE,
    attempt integer NOT NULL,
    output text NOT NULL,
    total_bytes bigint NOT NULL CHECK (total_bytes >= 0),
    written_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, attempt)
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

ALTER TABLE pdoflowd.job_output ENABLE ROW LEVEL SECURITY;
CREATE POLICY job_output_of_visible_jobs ON pdoflowd.job_output
    USING ((SELECT has_table_privilege('pdoflowd.jobs'::regclass, 'UPDATE'))
           OR EXISTS (SELECT FROM pdoflowd.jobs AS j
                      WHERE j.id = job_output.job_id));

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
    state record;
    hold boolean;
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
        UPDATE pdoflowd.postings
        SET status = 'cancelled', finished_at = now(), held = false
        WHERE id = target.id;
        -- Claimed jobs end here, so no outcome of their claim is recorded,
        -- but keep their owner: their run may still be going, or be about
        -- to start. The daemons hear of it at once, to stop both.
        UPDATE pdoflowd.jobs
        SET status = 'errored_out', error = 'cancelled', traceback = NULL,
            exited_ok = false, completed_at = now()
        WHERE posting_id = target.id
          AND status IN ('held', 'waiting', 'executing');
        GET DIAGNOSTICS changed = ROW_COUNT;
        PERFORM pg_notify('pdoflowd_cancel', target.id::text);
        PERFORM pdoflowd.follow_upstreams(ARRAY[target.id]);
    ELSIF action = 'retry' THEN
        IF fresh_tries IS NOT NULL AND fresh_tries < 1 THEN
            RAISE EXCEPTION 'tries must be at least 1, got %', fresh_tries
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- A posting that waits for others: its jobs are held again while
        -- one has not ended; one that failed must be retried first.
        SELECT * INTO state FROM pdoflowd.upstream_state(target.id);
        IF state.failed_uuid IS NOT NULL AND target.on_failure = 'cancel' THEN
            RAISE EXCEPTION 'posting % waits for posting %, which is %; '
                'retry that one first', posting_uuid, state.failed_uuid,
                replace(state.failed_status, '_', ' ')
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
        hold := state.pending > 0;
        -- A job cancelled while claimed, whose run may still be going, goes
        -- back to that claim: its outcome counts, and if its owner is gone
        -- it is taken back like any other job of that owner.
        UPDATE pdoflowd.jobs
        SET status = CASE WHEN owner IS NOT NULL THEN 'executing'
                          WHEN hold THEN 'held'
                          ELSE 'waiting' END,
            tries_remaining = coalesce(fresh_tries, target.tries),
            run_after = NULL, completed_at = NULL, exited_ok = NULL
        WHERE posting_id = target.id AND status = 'errored_out';
        GET DIAGNOSTICS changed = ROW_COUNT;
        IF changed > 0 THEN
            UPDATE pdoflowd.postings
            SET status = CASE WHEN status = 'paused' THEN 'paused'
                              ELSE 'executing' END,
                finished_at = NULL, held = held OR hold,
                cancel_reason = NULL
            WHERE id = target.id;
            PERFORM pg_notify('pdoflowd_jobs', '');
        END IF;
    ELSIF action IN ('finished', 'errored_out') THEN
        UPDATE pdoflowd.postings
        SET status = action, finished_at = coalesce(finished_at, now())
        WHERE id = target.id;
        PERFORM pdoflowd.follow_upstreams(ARRAY[target.id]);
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

-- Cancel or retry one job: for its posting's poster or a role with UPDATE
-- on pdoflowd.jobs, as control_posting does for a posting (and with the
-- same locks, the posting's row first). A cancelled job errors out with
-- the error 'cancelled' and keeps its owner: its run may still be going,
-- and the daemons hear of it at once to stop it (the pdoflowd_cancel
-- channel, as a posting's cancel). A retried job waits again with fresh
-- tries, and its posting executes again unless it was paused.
CREATE FUNCTION pdoflowd.control_job(
    job_uuid uuid, action text, fresh_tries integer DEFAULT NULL)
RETURNS TABLE (new_status text, posting_status text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target pdoflowd.jobs%ROWTYPE;
    parent pdoflowd.postings%ROWTYPE;
    state record;
    hold boolean;
BEGIN
    SELECT * INTO target FROM pdoflowd.jobs AS j WHERE j.uuid = job_uuid;
    IF FOUND THEN
        SELECT * INTO parent FROM pdoflowd.postings AS p
        WHERE p.id = target.posting_id
        FOR UPDATE;
    END IF;
    IF NOT FOUND OR NOT (
        parent.poster = session_user
        OR has_table_privilege(session_user, 'pdoflowd.jobs'::regclass,
                               'UPDATE')) THEN
        RAISE EXCEPTION 'no job %', job_uuid
            USING ERRCODE = 'no_data_found';
    END IF;
    SELECT * INTO target FROM pdoflowd.jobs AS j
    WHERE j.id = target.id
    FOR UPDATE;
    IF action = 'cancel' THEN
        IF target.status NOT IN ('held', 'waiting', 'executing') THEN
            RAISE EXCEPTION 'job % is %; it has ended already',
                job_uuid, target.status
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
        UPDATE pdoflowd.jobs
        SET status = 'errored_out', error = 'cancelled', traceback = NULL,
            exited_ok = false, completed_at = now()
        WHERE id = target.id;
        PERFORM pg_notify('pdoflowd_cancel', parent.id::text);
    ELSIF action = 'retry' THEN
        IF fresh_tries IS NOT NULL AND fresh_tries < 1 THEN
            RAISE EXCEPTION 'tries must be at least 1, got %', fresh_tries
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF target.status <> 'errored_out' THEN
            RAISE EXCEPTION 'job % is %; only an errored-out job can be '
                'retried', job_uuid, target.status
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
        IF parent.status = 'cancelled' THEN
            RAISE EXCEPTION 'the posting % of job % is cancelled; retry the '
                'posting instead', parent.uuid, job_uuid
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
        -- As a posting's retry: held while an upstream posting has not
        -- ended, refused while one that failed cancels it, and a job
        -- cancelled while claimed, whose run may still be going, goes back
        -- to that claim.
        SELECT * INTO state FROM pdoflowd.upstream_state(parent.id);
        IF state.failed_uuid IS NOT NULL AND parent.on_failure = 'cancel' THEN
            RAISE EXCEPTION 'the posting % of job % waits for posting %, '
                'which is %; retry that one first', parent.uuid, job_uuid,
                state.failed_uuid, replace(state.failed_status, '_', ' ')
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
        hold := state.pending > 0;
        UPDATE pdoflowd.jobs
        SET status = CASE WHEN owner IS NOT NULL THEN 'executing'
                          WHEN hold THEN 'held'
                          ELSE 'waiting' END,
            tries_remaining = coalesce(fresh_tries, parent.tries),
            run_after = NULL, completed_at = NULL, exited_ok = NULL
        WHERE id = target.id;
        UPDATE pdoflowd.postings
        SET status = CASE WHEN status = 'paused' THEN 'paused'
                          ELSE 'executing' END,
            finished_at = NULL, held = held OR hold
        WHERE id = parent.id;
        PERFORM pg_notify('pdoflowd_jobs', '');
    ELSE
        RAISE EXCEPTION 'unknown action %', action
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
        SELECT j.status, p.status
        FROM pdoflowd.jobs AS j
        JOIN pdoflowd.postings AS p ON p.id = j.posting_id
        WHERE j.id = target.id;
END
$$;
REVOKE ALL ON FUNCTION pdoflowd.control_job(uuid, text, integer)
    FROM PUBLIC;

-- The oldest runnable waiting job, for the queue gauges, without a scan of
-- every waiting job: the age reads one end of this index.
CREATE INDEX jobs_waiting_since
    ON pdoflowd.jobs ((coalesce(run_after, created_at)))
    WHERE status = 'waiting';

-- How a claim ends, by how its run ended: the retry rule, written once for
-- every statement that ends claims (recording outcomes, taking back a dead
-- worker's or a lost host's jobs, giving claims up). kind: done; released
-- (never started: no try used, waits again); failed or timeout (uses a try:
-- waits again while tries remain, else errors out); refused (errors out at
-- once, its tries used up). A job of a cancelled posting that did not
-- succeed ends errored out as cancelled, whatever tries it has left.
-- A plain SQL expression, inlined into each statement: it costs no call.
CREATE TYPE pdoflowd.job_end AS (
    status text,
    tries_remaining integer,
    error text
);

CREATE FUNCTION pdoflowd.end_job(
    kind text, tries_remaining integer, posting_status text, error text)
RETURNS pdoflowd.job_end
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
SELECT ROW(
    CASE WHEN kind = 'done' THEN 'done'
         WHEN posting_status = 'cancelled' THEN 'errored_out'
         WHEN kind = 'released' THEN 'waiting'
         WHEN kind IN ('failed', 'timeout') AND tries_remaining > 1
             THEN 'waiting'
         ELSE 'errored_out' END,
    CASE WHEN kind IN ('failed', 'timeout')
             THEN greatest(tries_remaining - 1, 0)
         WHEN kind = 'refused' THEN 0
         ELSE tries_remaining END,
    CASE WHEN kind <> 'done' AND posting_status = 'cancelled'
             THEN 'cancelled'
         ELSE error END
)::pdoflowd.job_end
$$;

-- A job cancelled while claimed keeps its owner (and daemon) until that
-- claim's run is known to be over: its owner's outcome write, or the taking
-- back of the owner's jobs, ends it. Such claims are found here.
CREATE INDEX jobs_cancelled_claims ON pdoflowd.jobs (daemon_id, owner)
    WHERE status = 'errored_out' AND owner IS NOT NULL;

-- Finish or error out the executing postings among posting_ids whose jobs
-- allow it. The postings are locked first and their jobs counted after:
-- whoever made a job of one runnable again (a retry, under the same lock)
-- has committed by then, so a posting is never finished with a job left to
-- run. Locked in id order, so that concurrent settles cannot deadlock; a
-- posting another session holds is skipped, not waited for (a later settle,
-- or the daemons' maintenance sweep, comes back to it).
CREATE FUNCTION pdoflowd.settle_postings(
    posting_ids bigint[], error_threshold integer)
RETURNS TABLE (posting bigint, new_status text)
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    locked bigint[];
    ended bigint[] := '{}';
BEGIN
    SELECT coalesce(array_agg(l.id), '{}') INTO locked
    FROM (
        SELECT p.id FROM pdoflowd.postings AS p
        WHERE p.id = ANY(posting_ids) AND p.status = 'executing'
        ORDER BY p.id
        FOR NO KEY UPDATE OF p SKIP LOCKED
    ) AS l;
    FOR posting, new_status IN
        UPDATE pdoflowd.postings AS p
        SET status = CASE WHEN c.errored >= error_threshold
                          THEN 'errored_out' ELSE 'finished' END,
            finished_at = now()
        FROM (
            SELECT q.id,
                   EXISTS (
                       SELECT FROM pdoflowd.jobs AS j
                       WHERE j.posting_id = q.id
                         AND j.status IN ('held', 'waiting', 'executing'))
                       AS active,
                   (SELECT count(*) FROM pdoflowd.jobs AS j
                    WHERE j.posting_id = q.id
                      AND j.status = 'errored_out') AS errored
            FROM pdoflowd.postings AS q
            WHERE q.id = ANY(locked) AND q.status = 'executing'
        ) AS c
        WHERE p.id = c.id
          AND (c.errored >= error_threshold OR NOT c.active)
        RETURNING p.id, p.status
    LOOP
        ended := ended || posting;
        RETURN NEXT;
    END LOOP;
    -- Their dependents are decided in this transaction (and woken). One
    -- probe of an index first: most postings have none, and the call
    -- costs more than the probe.
    IF cardinality(ended) > 0 AND EXISTS (
        SELECT FROM pdoflowd.posting_dependencies AS d
        WHERE d.upstream_id = ANY(ended)) THEN
        PERFORM pdoflowd.follow_upstreams(ended);
    END IF;
END
$$;

-- How many executing jobs use each named resource, as a JSON object
-- (resources none uses are absent). Read from the executing jobs (as many
-- as the cluster runs and has claimed), not from the postings: a posting
-- that ended (errored out, cancelled) may still have jobs running.
CREATE FUNCTION pdoflowd.resources_in_use()
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
AS $$
BEGIN
    RETURN (
        SELECT coalesce(jsonb_object_agg(n.name, n.running), '{}')
        FROM (
            SELECT u.name, count(*) AS running
            FROM pdoflowd.jobs AS j
            JOIN pdoflowd.postings AS p ON p.id = j.posting_id,
                 unnest(p.uses) AS u(name)
            WHERE j.status = 'executing' AND p.uses <> '{}'
            GROUP BY u.name
        ) AS n);
END
$$;

-- The executing capped postings a daemon may claim from (their
-- requirements among `provides`, their poster among `posters` when given,
-- each resource they use among `limit_names`) that have a runnable job:
-- their best waiting job's priority, the resources they use, and the room
-- their caps leave (max_running less their executing jobs, each resource's
-- limit less `used`, as resources_in_use counts them).
CREATE FUNCTION pdoflowd.capped_candidates(
    provides text[], posters text[], limit_names text[],
    limit_values integer[], used jsonb)
RETURNS TABLE (id bigint, best integer, uses text[], room integer)
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT c.id, c.best, c.uses,
           least(
               coalesce(c.max_running - (
                   SELECT count(*) FROM pdoflowd.jobs AS j
                   WHERE j.posting_id = c.id AND j.status = 'executing'),
                   2147483647),
               coalesce((
                   SELECT min(limit_values[array_position(limit_names, u.name)]
                              - coalesce((used ->> u.name)::integer, 0))
                   FROM unnest(c.uses) AS u(name)), 2147483647))::integer
    FROM (
        SELECT p.id, p.max_running, p.uses,
               (SELECT j.priority FROM pdoflowd.jobs AS j
                WHERE j.posting_id = p.id AND j.status = 'waiting'
                  AND (j.run_after IS NULL OR j.run_after <= now())
                ORDER BY j.priority DESC, j.id
                LIMIT 1) AS best
        FROM pdoflowd.postings AS p
        WHERE p.status = 'executing'
          AND (p.max_running IS NOT NULL OR p.uses <> '{}')
          AND p.requires <@ provides
          AND p.uses <@ limit_names
          AND (cardinality(posters) = 0 OR p.poster = ANY(posters))
    ) AS c
    WHERE c.best IS NOT NULL;
END
$$;

-- Writes the outcomes given (a JSON array, as queue.record_outcomes sends
-- them; NULL: none) of the claim made under `finishing`, fenced by that
-- token and each job's attempt, then claims up to claim_limit runnable jobs
-- under `claim_owner`: one statement, one commit and one round trip per
-- batch where there were two. Rows with recorded = true are the outcomes
-- the database accepted (id, posting_id, kind, status); the others are the
-- jobs claimed (every column but kind and status). With claim_limit 0 it
-- only writes outcomes.
--
-- An outcome's posting is not read (a join per outcome on the hot path): a
-- job executing under a live claim never belongs to a cancelled posting, as
-- a cancel ends every claim of its posting in its own transaction, and a
-- claim it ended is no longer executing, so fenced off here.
--
-- The claim walks jobs_claim in its order and stops at the limit. Sorting is
-- off inside the function because with the statistics of a table that has
-- just grown by a large posting the planner expects few waiting jobs, and
-- prefers reading them all and sorting them: a cost paid by every claim
-- until the next ANALYZE. Plans are generic, made once per session: the
-- statement is the same on every call, and planning it cost two thirds
-- as much again as running it. A plan made once must hold however the table grows after it
-- was made (a generic plan is not made again as a custom one would be, from
-- the table's size at each call): sequential scans are off too, so every
-- step finds its rows by an index.
--
-- Capped postings (max_running, or uses: named resources a daemon's
-- jobs.limits bounds cluster-wide) are not in that walk: the candidate scan
-- skips them on the postings row it already reads. When any capped posting
-- is executing, and only then, the capped step below runs first: it
-- writes the outcomes on their own (so that the slots they free are seen),
-- takes a transaction-scoped advisory lock per capped posting and per
-- resource it may claim from, in one sorted order (no deadlocks), counts
-- their executing jobs after the locks (a fresh snapshot: the count is the
-- truth, so a slot is free as soon as its job is no longer executing,
-- whatever ended it), and claims up to the room left, best job first.
-- The uncapped walk fills what the batch has left. JIT is off: the locks
-- are taken in sorted order, and a sort's cost with sorting off made every
-- capped claim compile its plan (a tenth of a second, for a few rows).

CREATE FUNCTION pdoflowd.claim_jobs(
    finishing uuid, outcomes json, claim_owner uuid, daemon uuid,
    claim_limit integer, provides text[], posters text[],
    limit_names text[], limit_values integer[])
RETURNS TABLE (
    recorded boolean, id bigint, posting_id bigint, kind text, status text,
    uuid uuid, posting_uuid uuid, entry_point text, priority integer,
    attempt integer, tries_remaining integer, posargs text, kwargs text,
    timeout_s double precision, runnable_since double precision,
    store_result boolean)
LANGUAGE plpgsql
SET enable_sort = off
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    batch integer := claim_limit;
    used jsonb;
    locked bigint[];
    capped record;
    room integer;
    took integer;
    resource text;
BEGIN
    IF claim_limit > 0
       AND EXISTS (
           SELECT FROM pdoflowd.postings AS p
           WHERE p.status = 'executing'
             AND (p.max_running IS NOT NULL OR p.uses <> '{}'))
       AND NOT EXISTS (
           SELECT FROM pdoflowd.daemons AS d
           WHERE d.id = daemon AND d.stopped_at IS NOT NULL)
    THEN
        IF outcomes IS NOT NULL THEN
            claim_limit := 0;
        RETURN QUERY
        WITH written AS (
            UPDATE pdoflowd.jobs AS j
            SET status = (pdoflowd.end_job(o.kind, j.tries_remaining, NULL,
                              CASE WHEN o.kind = 'released' THEN j.error
                                   ELSE o.error END)).status,
                tries_remaining = (pdoflowd.end_job(o.kind, j.tries_remaining,
                              NULL, CASE WHEN o.kind = 'released' THEN j.error
                                         ELSE o.error END)).tries_remaining,
                error = (pdoflowd.end_job(o.kind, j.tries_remaining, NULL,
                              CASE WHEN o.kind = 'released' THEN j.error
                                   ELSE o.error END)).error,
                owner = CASE WHEN o.kind = 'done' THEN j.owner END,
                run_after = CASE WHEN o.kind IN ('failed', 'timeout')
                                 THEN now() + make_interval(secs => o.retry_delay)
                                 ELSE j.run_after END,
                work_started_at = coalesce(to_timestamp(o.started),
                                           j.work_started_at),
                completed_at = CASE WHEN o.kind = 'released' THEN j.completed_at
                                    ELSE to_timestamp(o.completed) END,
                exited_ok = CASE WHEN o.kind = 'released' THEN j.exited_ok
                                 ELSE o.kind = 'done' END,
                traceback = CASE WHEN o.kind = 'released' THEN j.traceback
                                 ELSE o.traceback END,
                result = CASE WHEN o.kind = 'released' THEN j.result
                              ELSE o.result::jsonb END
            FROM json_to_recordset(outcomes) AS o(
                id bigint, attempt integer, kind text, started float8,
                completed float8, error text, traceback text,
                retry_delay float8, result text)
            WHERE j.id = o.id
              AND j.attempt = o.attempt
              AND j.owner = finishing
              AND j.status = 'executing'
            RETURNING j.id, j.posting_id, o.kind, j.status
        ), candidate AS (
            SELECT j.id
            FROM pdoflowd.jobs AS j
            WHERE j.status = 'waiting'
              AND (j.run_after IS NULL OR j.run_after <= now())
              AND NOT EXISTS (
                  SELECT FROM pdoflowd.daemons AS d
                  WHERE d.id = daemon AND d.stopped_at IS NOT NULL)
              AND EXISTS (
                  SELECT FROM pdoflowd.postings AS p
                  WHERE p.id = j.posting_id AND p.status = 'executing'
                    AND p.requires <@ provides
                    AND p.max_running IS NULL AND p.uses = '{}'
                    AND (cardinality(posters) = 0 OR p.poster = ANY(posters))
                  OFFSET 0)
            ORDER BY j.priority DESC, j.id
            LIMIT claim_limit
            FOR UPDATE OF j SKIP LOCKED
        ), claimed AS (
            UPDATE pdoflowd.jobs AS j
            SET status = 'executing',
                owner = claim_owner,
                daemon_id = daemon,
                attempt = j.attempt + 1,
                claimed_at = now(),
                progress = NULL,
                progress_note = NULL,
                progress_at = NULL
            FROM pdoflowd.postings AS p
            WHERE j.id = ANY (ARRAY(SELECT c.id FROM candidate AS c))
              AND p.id = j.posting_id
            RETURNING j.id, j.uuid, j.posting_id, p.uuid AS posting_uuid,
                      p.entry_point, j.priority, j.attempt, j.tries_remaining,
                      j.posargs::text AS posargs, j.kwargs::text AS kwargs,
                      p.timeout_s,
                      extract(epoch FROM coalesce(j.run_after, j.created_at))
                          ::float8 AS runnable_since,
                      p.store_result
        )
        SELECT true, w.id, w.posting_id, w.kind, w.status, NULL::uuid,
               NULL::uuid, NULL::text, NULL::integer, NULL::integer,
               NULL::integer, NULL::text, NULL::text, NULL::double precision,
               NULL::double precision, NULL::boolean
        FROM written AS w
        UNION ALL
        SELECT false, c.id, c.posting_id, NULL::text, NULL::text, c.uuid,
               c.posting_uuid, c.entry_point, c.priority, c.attempt,
               c.tries_remaining, c.posargs, c.kwargs, c.timeout_s,
               c.runnable_since, c.store_result
        FROM claimed AS c;

            outcomes := NULL;
            claim_limit := batch;
        END IF;
        -- Unlocked counts first: a posting or resource already at its cap
        -- is not locked (a claim never waits for a cap it cannot use).
        used := pdoflowd.resources_in_use();
        SELECT coalesce(array_agg(c.id), '{}') INTO locked
        FROM pdoflowd.capped_candidates(provides, posters, limit_names,
                                        limit_values, used) AS c
        WHERE c.room > 0;
        IF cardinality(locked) > 0 THEN
            PERFORM pg_advisory_xact_lock(k.key)
            FROM (
                SELECT DISTINCT keys.key
                FROM (
                    SELECT hashtextextended(
                               'pdoflowd.max_running ' || p.id, 0) AS key
                    FROM pdoflowd.postings AS p
                    WHERE p.id = ANY(locked) AND p.max_running IS NOT NULL
                    UNION ALL
                    SELECT hashtextextended('pdoflowd.uses ' || u.name, 0)
                    FROM pdoflowd.postings AS p,
                         unnest(p.uses) AS u(name)
                    WHERE p.id = ANY(locked)
                ) AS keys
                ORDER BY keys.key
            ) AS k;
            -- Counted again under the locks, in this statement's snapshot:
            -- every claim that held them before has committed.
            used := pdoflowd.resources_in_use();
            FOR capped IN
                SELECT c.id, c.room, c.uses
                FROM pdoflowd.capped_candidates(provides, posters,
                         limit_names, limit_values, used) AS c
                WHERE c.id = ANY(locked) AND c.room > 0
                ORDER BY c.best DESC, c.id
            LOOP
                EXIT WHEN claim_limit <= 0;
                room := least(capped.room, claim_limit);
                -- Resources another posting of this claim has taken.
                FOREACH resource IN ARRAY capped.uses LOOP
                    room := least(room,
                        limit_values[array_position(limit_names, resource)]
                        - coalesce((used ->> resource)::integer, 0));
                END LOOP;
                CONTINUE WHEN room <= 0;
                RETURN QUERY
                WITH candidate AS (
                    SELECT j.id
                    FROM pdoflowd.jobs AS j
                    WHERE j.posting_id = capped.id AND j.status = 'waiting'
                      AND (j.run_after IS NULL OR j.run_after <= now())
                    ORDER BY j.priority DESC, j.id
                    LIMIT room
                    FOR UPDATE OF j SKIP LOCKED
                ), claimed AS (
                    UPDATE pdoflowd.jobs AS j
                    SET status = 'executing',
                        owner = claim_owner,
                        daemon_id = daemon,
                        attempt = j.attempt + 1,
                        claimed_at = now(),
                        progress = NULL,
                        progress_note = NULL,
                        progress_at = NULL
                    FROM pdoflowd.postings AS p
                    WHERE j.id = ANY (ARRAY(SELECT c.id FROM candidate AS c))
                      AND p.id = j.posting_id
                    RETURNING j.id, j.uuid, j.posting_id,
                              p.uuid AS posting_uuid, p.entry_point,
                              j.priority, j.attempt, j.tries_remaining,
                              j.posargs::text AS posargs,
                              j.kwargs::text AS kwargs, p.timeout_s,
                              extract(epoch FROM coalesce(j.run_after,
                                                          j.created_at))
                                  ::float8 AS runnable_since,
                              p.store_result
                )
                SELECT false, c.id, c.posting_id, NULL::text, NULL::text,
                       c.uuid, c.posting_uuid, c.entry_point, c.priority,
                       c.attempt, c.tries_remaining, c.posargs, c.kwargs,
                       c.timeout_s, c.runnable_since, c.store_result
                FROM claimed AS c;
                GET DIAGNOSTICS took = ROW_COUNT;
                claim_limit := claim_limit - took;
                FOREACH resource IN ARRAY capped.uses LOOP
                    used := jsonb_set(used, ARRAY[resource], to_jsonb(
                        coalesce((used ->> resource)::integer, 0) + took));
                END LOOP;
            END LOOP;
        END IF;
    END IF;
    RETURN QUERY
    WITH written AS (
        UPDATE pdoflowd.jobs AS j
        SET status = (pdoflowd.end_job(o.kind, j.tries_remaining, NULL,
                          CASE WHEN o.kind = 'released' THEN j.error
                               ELSE o.error END)).status,
            tries_remaining = (pdoflowd.end_job(o.kind, j.tries_remaining,
                          NULL, CASE WHEN o.kind = 'released' THEN j.error
                                     ELSE o.error END)).tries_remaining,
            error = (pdoflowd.end_job(o.kind, j.tries_remaining, NULL,
                          CASE WHEN o.kind = 'released' THEN j.error
                               ELSE o.error END)).error,
            owner = CASE WHEN o.kind = 'done' THEN j.owner END,
            run_after = CASE WHEN o.kind IN ('failed', 'timeout')
                             THEN now() + make_interval(secs => o.retry_delay)
                             ELSE j.run_after END,
            work_started_at = coalesce(to_timestamp(o.started),
                                       j.work_started_at),
            completed_at = CASE WHEN o.kind = 'released' THEN j.completed_at
                                ELSE to_timestamp(o.completed) END,
            exited_ok = CASE WHEN o.kind = 'released' THEN j.exited_ok
                             ELSE o.kind = 'done' END,
            traceback = CASE WHEN o.kind = 'released' THEN j.traceback
                             ELSE o.traceback END,
            result = CASE WHEN o.kind = 'released' THEN j.result
                          ELSE o.result::jsonb END
        FROM json_to_recordset(outcomes) AS o(
            id bigint, attempt integer, kind text, started float8,
            completed float8, error text, traceback text,
            retry_delay float8, result text)
        WHERE j.id = o.id
          AND j.attempt = o.attempt
          AND j.owner = finishing
          AND j.status = 'executing'
        RETURNING j.id, j.posting_id, o.kind, j.status
    ), candidate AS (
        SELECT j.id
        FROM pdoflowd.jobs AS j
        WHERE j.status = 'waiting'
          AND (j.run_after IS NULL OR j.run_after <= now())
          AND NOT EXISTS (
              SELECT FROM pdoflowd.daemons AS d
              WHERE d.id = daemon AND d.stopped_at IS NOT NULL)
          AND EXISTS (
              SELECT FROM pdoflowd.postings AS p
              WHERE p.id = j.posting_id AND p.status = 'executing'
                AND p.requires <@ provides
                AND p.max_running IS NULL AND p.uses = '{}'
                AND (cardinality(posters) = 0 OR p.poster = ANY(posters))
              OFFSET 0)
        ORDER BY j.priority DESC, j.id
        LIMIT claim_limit
        FOR UPDATE OF j SKIP LOCKED
    ), claimed AS (
        UPDATE pdoflowd.jobs AS j
        SET status = 'executing',
            owner = claim_owner,
            daemon_id = daemon,
            attempt = j.attempt + 1,
            claimed_at = now(),
            progress = NULL,
            progress_note = NULL,
            progress_at = NULL
        FROM pdoflowd.postings AS p
        WHERE j.id = ANY (ARRAY(SELECT c.id FROM candidate AS c))
          AND p.id = j.posting_id
        RETURNING j.id, j.uuid, j.posting_id, p.uuid AS posting_uuid,
                  p.entry_point, j.priority, j.attempt, j.tries_remaining,
                  j.posargs::text AS posargs, j.kwargs::text AS kwargs,
                  p.timeout_s,
                  extract(epoch FROM coalesce(j.run_after, j.created_at))
                      ::float8 AS runnable_since,
                  p.store_result
    )
    SELECT true, w.id, w.posting_id, w.kind, w.status, NULL::uuid,
           NULL::uuid, NULL::text, NULL::integer, NULL::integer,
           NULL::integer, NULL::text, NULL::text, NULL::double precision,
           NULL::double precision, NULL::boolean
    FROM written AS w
    UNION ALL
    SELECT false, c.id, c.posting_id, NULL::text, NULL::text, c.uuid,
           c.posting_uuid, c.entry_point, c.priority, c.attempt,
           c.tries_remaining, c.posargs, c.kwargs, c.timeout_s,
           c.runnable_since, c.store_result
    FROM claimed AS c;
END
$$;

-- Settling asks, per posting, whether any of its jobs is still waiting or
-- executing. With the statistics of a table analyzed while a large posting
-- waited, the planner takes every job for waiting and answers that by a
-- scan of the whole table (it expects to stop at the first row); after the
-- drain no row matches, and each settle read every job. A scan of the jobs
-- table is never what settling needs: the (posting_id, status) index is.
ALTER FUNCTION pdoflowd.settle_postings(bigint[], integer)
    SET enable_seqscan = off;

-- Pruning looks for postings that ended before a cutoff, oldest first: it
-- reads this index, never the postings still running nor the whole table.
CREATE INDEX postings_ended ON pdoflowd.postings (finished_at)
    WHERE status IN ('finished', 'errored_out', 'cancelled');

-- Schedules (periodic postings).

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

-- Posting dependencies: postings that wait for other postings.
--
-- A posting given upstream postings ("after") has its jobs held: status
-- 'held', outside the claim index, so they cost the claim nothing. When
-- every upstream has finished its jobs wait like any other's (released);
-- when one ends errored out or cancelled the posting is cancelled, naming
-- it, and its own dependents after it (unless posted with on_failure
-- 'run', which releases it once every upstream has ended, however).
-- Releasing happens in the transaction that ends an upstream (settling,
-- or a cancel); a dependent that transaction could not lock, or one posted
-- while its upstream was being settled, is found by the daemons'
-- maintenance (pdoflowd.review_holds), so none is held for ever.

-- The maintenance reviews the postings whose jobs are held, and only them.
CREATE INDEX postings_held ON pdoflowd.postings (id) WHERE held;

-- posting_id waits for upstream_id. A posting can only wait for one that
-- existed before it (a smaller id): a cycle cannot be written.
CREATE TABLE pdoflowd.posting_dependencies (
    posting_id bigint NOT NULL
        REFERENCES pdoflowd.postings (id) ON DELETE CASCADE,
    upstream_id bigint NOT NULL
        REFERENCES pdoflowd.postings (id) ON DELETE CASCADE,
    PRIMARY KEY (posting_id, upstream_id),
    CHECK (upstream_id < posting_id)
);
CREATE INDEX posting_dependencies_upstream
    ON pdoflowd.posting_dependencies (upstream_id);

ALTER TABLE pdoflowd.posting_dependencies ENABLE ROW LEVEL SECURITY;
CREATE POLICY posting_dependencies_of_visible_postings
    ON pdoflowd.posting_dependencies
    USING ((SELECT has_table_privilege('pdoflowd.jobs'::regclass, 'UPDATE'))
           OR EXISTS (SELECT FROM pdoflowd.postings AS p
                      WHERE p.id = posting_dependencies.posting_id));

-- How the upstream postings of `target` stand: how many have not ended,
-- and the first (by id) that ended errored out or cancelled, if any.
CREATE FUNCTION pdoflowd.upstream_state(
    target bigint, OUT pending bigint, OUT failed_uuid uuid,
    OUT failed_status text)
LANGUAGE sql STABLE
AS $$
SELECT count(*) FILTER (
           WHERE u.status NOT IN ('finished', 'errored_out', 'cancelled')),
       (array_agg(u.uuid ORDER BY u.id)
           FILTER (WHERE u.status IN ('errored_out', 'cancelled')))[1],
       (array_agg(u.status ORDER BY u.id)
           FILTER (WHERE u.status IN ('errored_out', 'cancelled')))[1]
FROM pdoflowd.posting_dependencies AS d
JOIN pdoflowd.postings AS u ON u.id = d.upstream_id
WHERE d.posting_id = target
$$;

-- Decide a held posting (the caller holds its row lock): 'released' (its
-- jobs wait now, and the daemons are woken), 'cancelled' (an upstream
-- failed), or 'held' (some upstream has not ended). 'free' when it is not
-- held.
CREATE FUNCTION pdoflowd.judge_hold(target bigint)
RETURNS text
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    dependent pdoflowd.postings%ROWTYPE;
    state record;
BEGIN
    SELECT * INTO dependent FROM pdoflowd.postings AS p WHERE p.id = target;
    IF NOT FOUND OR NOT dependent.held THEN
        RETURN 'free';
    END IF;
    SELECT * INTO state FROM pdoflowd.upstream_state(target);
    IF state.failed_uuid IS NOT NULL AND dependent.on_failure = 'cancel'
       AND dependent.status IN ('paused', 'executing') THEN
        UPDATE pdoflowd.postings
        SET status = 'cancelled', finished_at = now(), held = false,
            cancel_reason = format('upstream posting %s %s',
                                   state.failed_uuid,
                                   replace(state.failed_status, '_', ' '))
        WHERE id = target;
        UPDATE pdoflowd.jobs
        SET status = 'errored_out', error = 'cancelled', exited_ok = false,
            completed_at = now()
        WHERE posting_id = target AND status = 'held';
        RETURN 'cancelled';
    ELSIF state.pending = 0 THEN
        UPDATE pdoflowd.jobs SET status = 'waiting'
        WHERE posting_id = target AND status = 'held';
        UPDATE pdoflowd.postings SET held = false WHERE id = target;
        PERFORM pg_notify('pdoflowd_jobs', '');
        RETURN 'released';
    END IF;
    RETURN 'held';
END
$$;

-- After the postings `ended` ended: decide their held dependents, and the
-- dependents of those it cancels, and so on. A dependent another session
-- holds is skipped (the maintenance comes back to it), so this never waits
-- and never deadlocks against a control of that posting.
CREATE FUNCTION pdoflowd.follow_upstreams(ended bigint[])
RETURNS void
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    frontier bigint[] := ended;
    cancelled bigint[];
    dependent bigint;
BEGIN
    WHILE cardinality(frontier) > 0 LOOP
        cancelled := '{}';
        FOR dependent IN
            SELECT p.id FROM pdoflowd.postings AS p
            WHERE p.held
              AND p.id IN (SELECT d.posting_id
                           FROM pdoflowd.posting_dependencies AS d
                           WHERE d.upstream_id = ANY(frontier))
            ORDER BY p.id
            FOR NO KEY UPDATE OF p SKIP LOCKED
        LOOP
            IF pdoflowd.judge_hold(dependent) = 'cancelled' THEN
                cancelled := cancelled || dependent;
            END IF;
        END LOOP;
        frontier := cancelled;
    END LOOP;
END
$$;

-- The maintenance's pass over held postings (at most `batch` of them, the
-- ones no other session holds): repairs any release a race left undone.
-- Returns how many it released or cancelled.
CREATE FUNCTION pdoflowd.review_holds(batch integer)
RETURNS integer
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    dependent bigint;
    verdict text;
    cancelled bigint[] := '{}';
    decided integer := 0;
BEGIN
    FOR dependent IN
        SELECT p.id FROM pdoflowd.postings AS p
        WHERE p.held
        ORDER BY p.id
        LIMIT batch
        FOR NO KEY UPDATE OF p SKIP LOCKED
    LOOP
        verdict := pdoflowd.judge_hold(dependent);
        IF verdict = 'cancelled' THEN
            cancelled := cancelled || dependent;
        END IF;
        IF verdict IN ('cancelled', 'released') THEN
            decided := decided + 1;
        END IF;
    END LOOP;
    IF cardinality(cancelled) > 0 THEN
        PERFORM pdoflowd.follow_upstreams(cancelled);
    END IF;
    RETURN decided;
END
$$;

-- Make the posting `posting_uuid` (inserted in this transaction with its
-- jobs, by the client) wait for the postings `upstreams`: for its poster (or a daemon
-- role), and only for upstream postings that poster may see; anything
-- else is refused whole, naming what was not found. Returns the posting's
-- status and whether its jobs are held (an upstream that failed already
-- cancels it at once, as it would have a moment later).
CREATE FUNCTION pdoflowd.wait_for_postings(
    posting_uuid uuid, upstreams uuid[], failure_rule text)
RETURNS TABLE (new_status text, held boolean)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target pdoflowd.postings%ROWTYPE;
    privileged boolean := has_table_privilege(
        session_user, 'pdoflowd.jobs'::regclass, 'UPDATE');
    upstream uuid;
    upstream_row pdoflowd.postings%ROWTYPE;
BEGIN
    SELECT * INTO target FROM pdoflowd.postings AS p
    WHERE p.uuid = posting_uuid
    FOR UPDATE;
    IF NOT FOUND OR NOT (target.poster = session_user OR privileged) THEN
        RAISE EXCEPTION 'no posting %', posting_uuid
            USING ERRCODE = 'no_data_found';
    END IF;
    IF target.status NOT IN ('paused', 'executing') THEN
        RAISE EXCEPTION 'posting % is %; it has ended already',
            posting_uuid, target.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF failure_rule NOT IN ('cancel', 'run') THEN
        RAISE EXCEPTION 'on_failure must be cancel or run, got %',
            failure_rule USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH upstream IN ARRAY upstreams LOOP
        SELECT * INTO upstream_row FROM pdoflowd.postings AS p
        WHERE p.uuid = upstream;
        IF NOT FOUND OR upstream_row.id = target.id
           OR NOT (upstream_row.poster = target.poster OR privileged) THEN
            RAISE EXCEPTION 'no posting % to wait for', upstream
                USING ERRCODE = 'foreign_key_violation';
        END IF;
        INSERT INTO pdoflowd.posting_dependencies (posting_id, upstream_id)
        VALUES (target.id, upstream_row.id)
        ON CONFLICT DO NOTHING;
    END LOOP;
    UPDATE pdoflowd.postings SET on_failure = failure_rule
    WHERE id = target.id;
    IF (SELECT s.pending > 0 OR s.failed_uuid IS NOT NULL
        FROM pdoflowd.upstream_state(target.id) AS s) THEN
        UPDATE pdoflowd.jobs SET status = 'held'
        WHERE posting_id = target.id AND status = 'waiting';
        UPDATE pdoflowd.postings SET held = true WHERE id = target.id;
        PERFORM pdoflowd.judge_hold(target.id);
    END IF;
    RETURN QUERY
        SELECT p.status, p.held FROM pdoflowd.postings AS p
        WHERE p.id = target.id;
END
$$;
REVOKE ALL ON FUNCTION pdoflowd.wait_for_postings(uuid, uuid[], text)
    FROM PUBLIC;

