-- pdoflowd schema, version 6: a worker's claim, with the outcomes of its
-- last claim written in the same statement; settling that never reads the
-- whole jobs table.

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
CREATE FUNCTION pdoflowd.claim_jobs(
    finishing uuid, outcomes json, claim_owner uuid, daemon uuid,
    claim_limit integer, provides text[], posters text[])
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
AS $$
#variable_conflict use_column
BEGIN
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
