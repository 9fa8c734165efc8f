-- pdoflowd schema: retention (pruning ended postings).

-- Pruning looks for postings that ended before a cutoff, oldest first: it
-- reads this index, never the postings still running nor the whole table.
CREATE INDEX postings_ended ON pdoflowd.postings (finished_at)
    WHERE status IN ('finished', 'errored_out', 'cancelled');
