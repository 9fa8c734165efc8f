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

-- Roles granted before this version get what the grants give from now on
-- (migrate.SUBMITTER_GRANTS and DAEMON_GRANTS).
DO $$
DECLARE
    role_name text;
BEGIN
    FOR role_name IN
        SELECT DISTINCT g.grantee::regrole::text
        FROM pg_attribute AS a, aclexplode(a.attacl) AS g
        WHERE a.attrelid = 'pdoflowd.postings'::regclass
          AND a.attname = 'uuid'
          AND g.privilege_type = 'INSERT'
          AND g.grantee <> 0
    LOOP
        EXECUTE format(
            'GRANT SELECT ON pdoflowd.job_output TO %s', role_name);
    END LOOP;
    FOR role_name IN
        SELECT DISTINCT g.grantee::regrole::text
        FROM pg_class AS c, aclexplode(c.relacl) AS g
        WHERE c.oid = 'pdoflowd.jobs'::regclass
          AND g.privilege_type = 'UPDATE'
          AND g.grantee <> 0
          AND g.grantee <> c.relowner
    LOOP
        EXECUTE format(
            'GRANT SELECT, INSERT, UPDATE ON pdoflowd.job_output TO %s',
            role_name);
    END LOOP;
END
$$;
