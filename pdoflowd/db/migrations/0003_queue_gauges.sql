-- The oldest runnable waiting job, for the queue gauges, without a scan of
-- every waiting job: the age reads one end of this index.
CREATE INDEX jobs_waiting_since
    ON pdoflowd.jobs ((coalesce(run_after, created_at)))
    WHERE status = 'waiting';
