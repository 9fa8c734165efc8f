-- pdoflowd schema, version 7: idempotent postings.

-- A posting may carry a key its poster chose. While a posting with the key
-- has not ended (paused or executing), another posting of the same poster
-- with that key cannot be inserted: a second post returns the first. With
-- key_scope 'forever' the key stays taken for as long as the row exists.
-- The index is per poster, so a key never tells one poster of another's
-- postings.
ALTER TABLE pdoflowd.postings
    ADD COLUMN idempotency_key text
        CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    ADD COLUMN key_scope text NOT NULL DEFAULT 'active'
        CHECK (key_scope IN ('active', 'forever'));

CREATE UNIQUE INDEX postings_idempotency_key
    ON pdoflowd.postings (poster, idempotency_key)
    WHERE idempotency_key IS NOT NULL
          AND (key_scope = 'forever' OR status IN ('paused', 'executing'));

-- Roles granted a submitter's INSERT on postings before this version may
-- set the new columns too (migrate.SUBMITTER_GRANTS lists them for roles
-- granted from now on).
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
            'GRANT INSERT (idempotency_key, key_scope)'
            ' ON pdoflowd.postings TO %s', role_name);
    END LOOP;
END
$$;
