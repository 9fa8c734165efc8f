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
