-- pdoflowd schema, version 10: the output of each attempt of a job.

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

ALTER TABLE pdoflowd.job_output ENABLE ROW LEVEL SECURITY;
CREATE POLICY job_output_of_visible_jobs ON pdoflowd.job_output
    USING ((SELECT has_table_privilege('pdoflowd.jobs'::regclass, 'UPDATE'))
           OR EXISTS (SELECT FROM pdoflowd.jobs AS j
                      WHERE j.id = job_output.job_id));
