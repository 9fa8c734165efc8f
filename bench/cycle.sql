-- PostgreSQL's own limit for a SKIP LOCKED queue on pdoflowd.jobs, for
-- pgbench: claim :batch waiting jobs, best first, then complete them, in two
-- transactions, as one worker's cycle without the Python in between.
-- Run: pgbench -n -c C -j C -t T -D batch=B -f cycle.sql DSN
WITH c AS (
    SELECT id FROM pdoflowd.jobs
    WHERE status = 'waiting'
    ORDER BY priority DESC, id
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
)
UPDATE pdoflowd.jobs AS j
SET status = 'executing',
    owner = ('00000000-0000-4000-8000-' || lpad((:client_id)::text, 12, '0'))::uuid,
    daemon_id = '00000000-0000-4000-8000-00000000bec0',
    attempt = j.attempt + 1,
    claimed_at = now()
FROM c
WHERE j.id = c.id;
UPDATE pdoflowd.jobs
SET status = 'done',
    work_started_at = now(),
    completed_at = now(),
    exited_ok = true
WHERE status = 'executing'
  AND daemon_id = '00000000-0000-4000-8000-00000000bec0'
  AND owner = ('00000000-0000-4000-8000-' || lpad((:client_id)::text, 12, '0'))::uuid;
