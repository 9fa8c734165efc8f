-- pdoflowd schema, version 4: one rule for how a claim ends, postings
-- settled under their row lock, and cancels that know which runs may still
-- be going.

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
-- run. Locked in id order, so that concurrent settles cannot deadlock.
CREATE FUNCTION pdoflowd.settle_postings(
    posting_ids bigint[], error_threshold integer)
RETURNS TABLE (posting bigint, new_status text)
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM FROM pdoflowd.postings AS p
    WHERE p.id = ANY(posting_ids) AND p.status = 'executing'
    ORDER BY p.id
    FOR NO KEY UPDATE OF p;
    RETURN QUERY
    UPDATE pdoflowd.postings AS p
    SET status = CASE WHEN c.errored >= error_threshold THEN 'errored_out'
                      ELSE 'finished' END,
        finished_at = now()
    FROM (
        SELECT q.id,
               EXISTS (
                   SELECT FROM pdoflowd.jobs AS j
                   WHERE j.posting_id = q.id
                     AND j.status IN ('waiting', 'executing')) AS active,
               (SELECT count(*) FROM pdoflowd.jobs AS j
                WHERE j.posting_id = q.id
                  AND j.status = 'errored_out') AS errored
        FROM pdoflowd.postings AS q
        WHERE q.id = ANY(posting_ids) AND q.status = 'executing'
    ) AS c
    WHERE p.id = c.id
      AND (c.errored >= error_threshold OR NOT c.active)
    RETURNING p.id, p.status;
END
$$;

-- Cancel leaves the claims of claimed jobs to their runs (see
-- jobs_cancelled_claims) and tells the daemons at once; retry gives such a
-- job back to that claim instead of to the queue, so no second run starts
-- beside one that may still be going.
CREATE OR REPLACE FUNCTION pdoflowd.control_posting(
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
        -- Claimed jobs end here, so no outcome of their claim is recorded,
        -- but keep their owner: their run may still be going, or be about
        -- to start. The daemons hear of it at once, to stop both.
        UPDATE pdoflowd.jobs
        SET status = 'errored_out', error = 'cancelled', traceback = NULL,
            exited_ok = false, completed_at = now()
        WHERE posting_id = target.id AND status IN ('waiting', 'executing');
        GET DIAGNOSTICS changed = ROW_COUNT;
        PERFORM pg_notify('pdoflowd_cancel', target.id::text);
    ELSIF action = 'retry' THEN
        IF fresh_tries IS NOT NULL AND fresh_tries < 1 THEN
            RAISE EXCEPTION 'tries must be at least 1, got %', fresh_tries
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- A job cancelled while claimed, whose run may still be going, goes
        -- back to that claim: its outcome counts, and if its owner is gone
        -- it is taken back like any other job of that owner.
        UPDATE pdoflowd.jobs
        SET status = CASE WHEN owner IS NULL THEN 'waiting'
                          ELSE 'executing' END,
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
