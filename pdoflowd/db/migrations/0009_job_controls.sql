-- pdoflowd schema, version 9: cancelling and retrying single jobs.

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
        IF target.status NOT IN ('waiting', 'executing') THEN
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
        -- As a posting's retry: a job cancelled while claimed, whose run
        -- may still be going, goes back to that claim.
        UPDATE pdoflowd.jobs
        SET status = CASE WHEN owner IS NULL THEN 'waiting'
                          ELSE 'executing' END,
            tries_remaining = coalesce(fresh_tries, parent.tries),
            run_after = NULL, completed_at = NULL, exited_ok = NULL
        WHERE id = target.id;
        UPDATE pdoflowd.postings
        SET status = CASE WHEN status = 'paused' THEN 'paused'
                          ELSE 'executing' END,
            finished_at = NULL
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
