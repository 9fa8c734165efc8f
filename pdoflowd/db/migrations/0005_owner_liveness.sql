-- pdoflowd schema, version 5: every executing job has a live owner, and
-- settling never waits for a posting another session holds.

-- Each daemon declares in its heartbeat the lease others must wait before
-- declaring it lost, and the owner tokens its live workers hold; the time
-- of its previous heartbeat tells which claims those tokens must cover. A
-- job executing under a token no live daemon lists (a claim whose reply
-- was lost, one that committed after its worker was taken back, one a
-- failover restored) is taken back (see queries.take_back_ownerless_jobs).
ALTER TABLE pdoflowd.daemons
    ADD COLUMN lease_s double precision NOT NULL DEFAULT 30,
    ADD COLUMN live_owners uuid[] NOT NULL DEFAULT '{}',
    ADD COLUMN previous_heartbeat_at timestamptz;

-- As in version 4, but a posting another session holds (a poster's open
-- transaction, a concurrent settle or control) is skipped, not waited
-- for: whoever holds it decides, or a later settle (the daemons'
-- maintenance sweeps executing postings with nothing left to run) does.
CREATE OR REPLACE FUNCTION pdoflowd.settle_postings(
    posting_ids bigint[], error_threshold integer)
RETURNS TABLE (posting bigint, new_status text)
LANGUAGE plpgsql
AS $$
DECLARE
    locked bigint[];
BEGIN
    SELECT coalesce(array_agg(l.id), '{}') INTO locked
    FROM (
        SELECT p.id FROM pdoflowd.postings AS p
        WHERE p.id = ANY(posting_ids) AND p.status = 'executing'
        ORDER BY p.id
        FOR NO KEY UPDATE OF p SKIP LOCKED
    ) AS l;
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
        WHERE q.id = ANY(locked) AND q.status = 'executing'
    ) AS c
    WHERE p.id = c.id
      AND (c.errored >= error_threshold OR NOT c.active)
    RETURNING p.id, p.status;
END
$$;
