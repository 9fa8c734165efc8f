-- pdoflowd schema, version 12: postings that wait for other postings.
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

ALTER TABLE pdoflowd.jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE pdoflowd.jobs ADD CONSTRAINT jobs_status_check CHECK (status IN (
    'held', 'waiting', 'executing', 'done', 'errored_out'));

ALTER TABLE pdoflowd.postings
    ADD COLUMN on_failure text NOT NULL DEFAULT 'cancel'
        CHECK (on_failure IN ('cancel', 'run')),
    ADD COLUMN held boolean NOT NULL DEFAULT false,
    ADD COLUMN cancel_reason text;

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

-- Settling counts held jobs as jobs left to run, and decides the held
-- dependents of the postings it ends.
CREATE OR REPLACE FUNCTION pdoflowd.settle_postings(
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

-- Cancel releases a posting's held jobs too (as errored out, cancelled),
-- and cancels its dependents; retry holds the jobs again while an upstream
-- posting has not ended, and is refused while one that failed cancels it.
CREATE OR REPLACE FUNCTION pdoflowd.control_posting(
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

CREATE OR REPLACE FUNCTION pdoflowd.control_job(
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
