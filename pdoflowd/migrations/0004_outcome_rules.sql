-- pdoflowd schema, version 4: postings settled under their row lock.

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
