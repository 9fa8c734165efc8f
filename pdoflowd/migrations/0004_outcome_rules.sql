-- pdoflowd schema, version 4: one rule for how a claim ends, and postings
-- settled under their row lock.

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
