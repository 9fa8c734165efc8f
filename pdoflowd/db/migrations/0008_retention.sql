-- pdoflowd schema: retention (pruning ended postings).

-- Pruning looks for postings that ended before a cutoff, oldest first: it
-- reads this index, never the postings still running nor the whole table.
CREATE INDEX postings_ended ON pdoflowd.postings (finished_at)
    WHERE status IN ('finished', 'errored_out', 'cancelled');

-- Roles granted a daemon's privileges before this version may prune too
-- (migrate.DAEMON_GRANTS lists DELETE for roles granted from now on): a
-- daemon role is one with UPDATE on pdoflowd.jobs.
DO $$
DECLARE
    role_name text;
BEGIN
    FOR role_name IN
        SELECT DISTINCT g.grantee::regrole::text
        FROM pg_class AS c, aclexplode(c.relacl) AS g
        WHERE c.oid = 'pdoflowd.jobs'::regclass
          AND g.privilege_type = 'UPDATE'
          AND g.grantee <> 0
    LOOP
        EXECUTE format(
            'GRANT DELETE ON pdoflowd.postings, pdoflowd.jobs TO %s',
            role_name);
    END LOOP;
END
$$;
