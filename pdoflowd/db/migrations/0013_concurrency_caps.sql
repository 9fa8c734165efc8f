-- pdoflowd schema: concurrency caps. A posting's max_running bounds its
-- executing jobs across all hosts; the resources it uses are bounded
-- cluster-wide by the daemons' jobs.limits. Enforced inside the claim.

ALTER TABLE pdoflowd.postings
    ADD COLUMN max_running integer CHECK (max_running >= 1),
    ADD COLUMN uses text[] NOT NULL DEFAULT '{}';

-- The jobs.limits each daemon claims under (name -> limit), published with
-- its heartbeat, so that daemons whose limits differ can tell.
ALTER TABLE pdoflowd.daemons
    ADD COLUMN limits jsonb NOT NULL DEFAULT '{}';

-- The capped postings running now: the claim asks whether there are any
-- on every call, and finds them here.
CREATE INDEX postings_capped ON pdoflowd.postings (id)
    WHERE status = 'executing' AND (max_running IS NOT NULL OR uses <> '{}');

-- A capped posting's waiting jobs, best first: its claim walks this range
-- (its executing jobs are counted through jobs_posting_status). Partial,
-- so a job leaves it when claimed; widening jobs_posting_status instead
-- cost the uncapped claim a quarter more, its entries no longer
-- deduplicated.
CREATE INDEX jobs_capped_claim
    ON pdoflowd.jobs (posting_id, priority DESC, id)
    WHERE status = 'waiting';

DROP FUNCTION pdoflowd.claim_jobs(
    uuid, json, uuid, uuid, integer, text[], text[]);

-- How many executing jobs use each named resource, as a JSON object
-- (resources none uses are absent). Read from the executing jobs (as many
-- as the cluster runs and has claimed), not from the postings: a posting
-- that ended (errored out, cancelled) may still have jobs running.
CREATE FUNCTION pdoflowd.resources_in_use()
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
AS $$
BEGIN
    RETURN (
        SELECT coalesce(jsonb_object_agg(n.name, n.running), '{}')
        FROM (
            SELECT u.name, count(*) AS running
            FROM pdoflowd.jobs AS j
            JOIN pdoflowd.postings AS p ON p.id = j.posting_id,
                 unnest(p.uses) AS u(name)
            WHERE j.status = 'executing' AND p.uses <> '{}'
            GROUP BY u.name
        ) AS n);
END
$$;

-- The executing capped postings a daemon may claim from (their
-- requirements among `provides`, their poster among `posters` when given,
-- each resource they use among `limit_names`) that have a runnable job:
-- their best waiting job's priority, the resources they use, and the room
-- their caps leave (max_running less their executing jobs, each resource's
-- limit less `used`, as resources_in_use counts them).
CREATE FUNCTION pdoflowd.capped_candidates(
    provides text[], posters text[], limit_names text[],
    limit_values integer[], used jsonb)
RETURNS TABLE (id bigint, best integer, uses text[], room integer)
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT c.id, c.best, c.uses,
           least(
               coalesce(c.max_running - (
                   SELECT count(*) FROM pdoflowd.jobs AS j
                   WHERE j.posting_id = c.id AND j.status = 'executing'),
                   2147483647),
               coalesce((
                   SELECT min(limit_values[array_position(limit_names, u.name)]
                              - coalesce((used ->> u.name)::integer, 0))
                   FROM unnest(c.uses) AS u(name)), 2147483647))::integer
    FROM (
        SELECT p.id, p.max_running, p.uses,
               (SELECT j.priority FROM pdoflowd.jobs AS j
                WHERE j.posting_id = p.id AND j.status = 'waiting'
                  AND (j.run_after IS NULL OR j.run_after <= now())
                ORDER BY j.priority DESC, j.id
                LIMIT 1) AS best
        FROM pdoflowd.postings AS p
        WHERE p.status = 'executing'
          AND (p.max_running IS NOT NULL OR p.uses <> '{}')
          AND p.requires <@ provides
          AND p.uses <@ limit_names
          AND (cardinality(posters) = 0 OR p.poster = ANY(posters))
    ) AS c
    WHERE c.best IS NOT NULL;
END
$$;

-- Writes the outcomes given (a JSON array, as queue.record_outcomes sends
-- them; NULL: none) of the claim made under `finishing`, fenced by that
-- token and each job's attempt, then claims up to claim_limit runnable jobs
-- under `claim_owner`: one statement, one commit and one round trip per
-- batch where there were two. Rows with recorded = true are the outcomes
-- the database accepted (id, posting_id, kind, status); the others are the
-- jobs claimed (every column but kind and status). With claim_limit 0 it
-- only writes outcomes.
--
-- An outcome's posting is not read (a join per outcome on the hot path): a
-- job executing under a live claim never belongs to a cancelled posting, as
-- a cancel ends every claim of its posting in its own transaction, and a
-- claim it ended is no longer executing, so fenced off here.
--
-- The claim walks jobs_claim in its order and stops at the limit. Sorting is
-- off inside the function because with the statistics of a table that has
-- just grown by a large posting the planner expects few waiting jobs, and
-- prefers reading them all and sorting them: a cost paid by every claim
-- until the next ANALYZE. Plans are generic, made once per session: the
-- statement is the same on every call, and planning it cost two thirds
-- as much again as running it. A plan made once must hold however the table grows after it
-- was made (a generic plan is not made again as a custom one would be, from
-- the table's size at each call): sequential scans are off too, so every
-- step finds its rows by an index.
--
-- Capped postings (max_running, or uses: named resources a daemon's
-- jobs.limits bounds cluster-wide) are not in that walk: the candidate scan
-- skips them on the postings row it already reads. When any capped posting
-- is executing, and only then, the capped step below runs first: it
-- writes the outcomes on their own (so that the slots they free are seen),
-- takes a transaction-scoped advisory lock per capped posting and per
-- resource it may claim from, in one sorted order (no deadlocks), counts
-- their executing jobs after the locks (a fresh snapshot: the count is the
-- truth, so a slot is free as soon as its job is no longer executing,
-- whatever ended it), and claims up to the room left, best job first.
-- The uncapped walk fills what the batch has left. JIT is off: the locks
-- are taken in sorted order, and a sort's cost with sorting off made every
-- capped claim compile its plan (a tenth of a second, for a few rows).

CREATE FUNCTION pdoflowd.claim_jobs(
    finishing uuid, outcomes json, claim_owner uuid, daemon uuid,
    claim_limit integer, provides text[], posters text[],
    limit_names text[], limit_values integer[])
RETURNS TABLE (
    recorded boolean, id bigint, posting_id bigint, kind text, status text,
    uuid uuid, posting_uuid uuid, entry_point text, priority integer,
    attempt integer, tries_remaining integer, posargs text, kwargs text,
    timeout_s double precision, runnable_since double precision,
    store_result boolean)
LANGUAGE plpgsql
SET enable_sort = off
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    batch integer := claim_limit;
    used jsonb;
    locked bigint[];
    capped record;
    room integer;
    took integer;
    resource text;
BEGIN
    IF claim_limit > 0
       AND EXISTS (
           SELECT FROM pdoflowd.postings AS p
           WHERE p.status = 'executing'
             AND (p.max_running IS NOT NULL OR p.uses <> '{}'))
       AND NOT EXISTS (
           SELECT FROM pdoflowd.daemons AS d
           WHERE d.id = daemon AND d.stopped_at IS NOT NULL)
    THEN
        IF outcomes IS NOT NULL THEN
            claim_limit := 0;
        RETURN QUERY
        WITH written AS (
            UPDATE pdoflowd.jobs AS j
            SET status = (pdoflowd.end_job(o.kind, j.tries_remaining, NULL,
                              CASE WHEN o.kind = 'released' THEN j.error
                                   ELSE o.error END)).status,
                tries_remaining = (pdoflowd.end_job(o.kind, j.tries_remaining,
                              NULL, CASE WHEN o.kind = 'released' THEN j.error
                                         ELSE o.error END)).tries_remaining,
                error = (pdoflowd.end_job(o.kind, j.tries_remaining, NULL,
                              CASE WHEN o.kind = 'released' THEN j.error
                                   ELSE o.error END)).error,
                owner = CASE WHEN o.kind = 'done' THEN j.owner END,
                run_after = CASE WHEN o.kind IN ('failed', 'timeout')
                                 THEN now() + make_interval(secs => o.retry_delay)
                                 ELSE j.run_after END,
                work_started_at = coalesce(to_timestamp(o.started),
                                           j.work_started_at),
                completed_at = CASE WHEN o.kind = 'released' THEN j.completed_at
                                    ELSE to_timestamp(o.completed) END,
                exited_ok = CASE WHEN o.kind = 'released' THEN j.exited_ok
                                 ELSE o.kind = 'done' END,
                traceback = CASE WHEN o.kind = 'released' THEN j.traceback
                                 ELSE o.traceback END,
                result = CASE WHEN o.kind = 'released' THEN j.result
                              ELSE o.result::jsonb END
            FROM json_to_recordset(outcomes) AS o(
                id bigint, attempt integer, kind text, started float8,
                completed float8, error text, traceback text,
                retry_delay float8, result text)
            WHERE j.id = o.id
              AND j.attempt = o.attempt
              AND j.owner = finishing
              AND j.status = 'executing'
            RETURNING j.id, j.posting_id, o.kind, j.status
        ), candidate AS (
            SELECT j.id
            FROM pdoflowd.jobs AS j
            WHERE j.status = 'waiting'
              AND (j.run_after IS NULL OR j.run_after <= now())
              AND NOT EXISTS (
                  SELECT FROM pdoflowd.daemons AS d
                  WHERE d.id = daemon AND d.stopped_at IS NOT NULL)
              AND EXISTS (
                  SELECT FROM pdoflowd.postings AS p
                  WHERE p.id = j.posting_id AND p.status = 'executing'
                    AND p.requires <@ provides
                    AND p.max_running IS NULL AND p.uses = '{}'
                    AND (cardinality(posters) = 0 OR p.poster = ANY(posters))
                  OFFSET 0)
            ORDER BY j.priority DESC, j.id
            LIMIT claim_limit
            FOR UPDATE OF j SKIP LOCKED
        ), claimed AS (
            UPDATE pdoflowd.jobs AS j
            SET status = 'executing',
                owner = claim_owner,
                daemon_id = daemon,
                attempt = j.attempt + 1,
                claimed_at = now(),
                progress = NULL,
                progress_note = NULL,
                progress_at = NULL
            FROM pdoflowd.postings AS p
            WHERE j.id = ANY (ARRAY(SELECT c.id FROM candidate AS c))
              AND p.id = j.posting_id
            RETURNING j.id, j.uuid, j.posting_id, p.uuid AS posting_uuid,
                      p.entry_point, j.priority, j.attempt, j.tries_remaining,
                      j.posargs::text AS posargs, j.kwargs::text AS kwargs,
                      p.timeout_s,
                      extract(epoch FROM coalesce(j.run_after, j.created_at))
                          ::float8 AS runnable_since,
                      p.store_result
        )
        SELECT true, w.id, w.posting_id, w.kind, w.status, NULL::uuid,
               NULL::uuid, NULL::text, NULL::integer, NULL::integer,
               NULL::integer, NULL::text, NULL::text, NULL::double precision,
               NULL::double precision, NULL::boolean
        FROM written AS w
        UNION ALL
        SELECT false, c.id, c.posting_id, NULL::text, NULL::text, c.uuid,
               c.posting_uuid, c.entry_point, c.priority, c.attempt,
               c.tries_remaining, c.posargs, c.kwargs, c.timeout_s,
               c.runnable_since, c.store_result
        FROM claimed AS c;

            outcomes := NULL;
            claim_limit := batch;
        END IF;
        -- Unlocked counts first: a posting or resource already at its cap
        -- is not locked (a claim never waits for a cap it cannot use).
        used := pdoflowd.resources_in_use();
        SELECT coalesce(array_agg(c.id), '{}') INTO locked
        FROM pdoflowd.capped_candidates(provides, posters, limit_names,
                                        limit_values, used) AS c
        WHERE c.room > 0;
        IF cardinality(locked) > 0 THEN
            PERFORM pg_advisory_xact_lock(k.key)
            FROM (
                SELECT DISTINCT keys.key
                FROM (
                    SELECT hashtextextended(
                               'pdoflowd.max_running ' || p.id, 0) AS key
                    FROM pdoflowd.postings AS p
                    WHERE p.id = ANY(locked) AND p.max_running IS NOT NULL
                    UNION ALL
                    SELECT hashtextextended('pdoflowd.uses ' || u.name, 0)
                    FROM pdoflowd.postings AS p,
                         unnest(p.uses) AS u(name)
                    WHERE p.id = ANY(locked)
                ) AS keys
                ORDER BY keys.key
            ) AS k;
            -- Counted again under the locks, in this statement's snapshot:
            -- every claim that held them before has committed.
            used := pdoflowd.resources_in_use();
            FOR capped IN
                SELECT c.id, c.room, c.uses
                FROM pdoflowd.capped_candidates(provides, posters,
                         limit_names, limit_values, used) AS c
                WHERE c.id = ANY(locked) AND c.room > 0
                ORDER BY c.best DESC, c.id
            LOOP
                EXIT WHEN claim_limit <= 0;
                room := least(capped.room, claim_limit);
                -- Resources another posting of this claim has taken.
                FOREACH resource IN ARRAY capped.uses LOOP
                    room := least(room,
                        limit_values[array_position(limit_names, resource)]
                        - coalesce((used ->> resource)::integer, 0));
                END LOOP;
                CONTINUE WHEN room <= 0;
                RETURN QUERY
                WITH candidate AS (
                    SELECT j.id
                    FROM pdoflowd.jobs AS j
                    WHERE j.posting_id = capped.id AND j.status = 'waiting'
                      AND (j.run_after IS NULL OR j.run_after <= now())
                    ORDER BY j.priority DESC, j.id
                    LIMIT room
                    FOR UPDATE OF j SKIP LOCKED
                ), claimed AS (
                    UPDATE pdoflowd.jobs AS j
                    SET status = 'executing',
                        owner = claim_owner,
                        daemon_id = daemon,
                        attempt = j.attempt + 1,
                        claimed_at = now(),
                        progress = NULL,
                        progress_note = NULL,
                        progress_at = NULL
                    FROM pdoflowd.postings AS p
                    WHERE j.id = ANY (ARRAY(SELECT c.id FROM candidate AS c))
                      AND p.id = j.posting_id
                    RETURNING j.id, j.uuid, j.posting_id,
                              p.uuid AS posting_uuid, p.entry_point,
                              j.priority, j.attempt, j.tries_remaining,
                              j.posargs::text AS posargs,
                              j.kwargs::text AS kwargs, p.timeout_s,
                              extract(epoch FROM coalesce(j.run_after,
                                                          j.created_at))
                                  ::float8 AS runnable_since,
                              p.store_result
                )
                SELECT false, c.id, c.posting_id, NULL::text, NULL::text,
                       c.uuid, c.posting_uuid, c.entry_point, c.priority,
                       c.attempt, c.tries_remaining, c.posargs, c.kwargs,
                       c.timeout_s, c.runnable_since, c.store_result
                FROM claimed AS c;
                GET DIAGNOSTICS took = ROW_COUNT;
                claim_limit := claim_limit - took;
                FOREACH resource IN ARRAY capped.uses LOOP
                    used := jsonb_set(used, ARRAY[resource], to_jsonb(
                        coalesce((used ->> resource)::integer, 0) + took));
                END LOOP;
            END LOOP;
        END IF;
    END IF;
    RETURN QUERY
    WITH written AS (
        UPDATE pdoflowd.jobs AS j
        SET status = (pdoflowd.end_job(o.kind, j.tries_remaining, NULL,
                          CASE WHEN o.kind = 'released' THEN j.error
                               ELSE o.error END)).status,
            tries_remaining = (pdoflowd.end_job(o.kind, j.tries_remaining,
                          NULL, CASE WHEN o.kind = 'released' THEN j.error
                                     ELSE o.error END)).tries_remaining,
            error = (pdoflowd.end_job(o.kind, j.tries_remaining, NULL,
                          CASE WHEN o.kind = 'released' THEN j.error
                               ELSE o.error END)).error,
            owner = CASE WHEN o.kind = 'done' THEN j.owner END,
            run_after = CASE WHEN o.kind IN ('failed', 'timeout')
                             THEN now() + make_interval(secs => o.retry_delay)
                             ELSE j.run_after END,
            work_started_at = coalesce(to_timestamp(o.started),
                                       j.work_started_at),
            completed_at = CASE WHEN o.kind = 'released' THEN j.completed_at
                                ELSE to_timestamp(o.completed) END,
            exited_ok = CASE WHEN o.kind = 'released' THEN j.exited_ok
                             ELSE o.kind = 'done' END,
            traceback = CASE WHEN o.kind = 'released' THEN j.traceback
                             ELSE o.traceback END,
            result = CASE WHEN o.kind = 'released' THEN j.result
                          ELSE o.result::jsonb END
        FROM json_to_recordset(outcomes) AS o(
            id bigint, attempt integer, kind text, started float8,
            completed float8, error text, traceback text,
            retry_delay float8, result text)
        WHERE j.id = o.id
          AND j.attempt = o.attempt
          AND j.owner = finishing
          AND j.status = 'executing'
        RETURNING j.id, j.posting_id, o.kind, j.status
    ), candidate AS (
        SELECT j.id
        FROM pdoflowd.jobs AS j
        WHERE j.status = 'waiting'
          AND (j.run_after IS NULL OR j.run_after <= now())
          AND NOT EXISTS (
              SELECT FROM pdoflowd.daemons AS d
              WHERE d.id = daemon AND d.stopped_at IS NOT NULL)
          AND EXISTS (
              SELECT FROM pdoflowd.postings AS p
              WHERE p.id = j.posting_id AND p.status = 'executing'
                AND p.requires <@ provides
                AND p.max_running IS NULL AND p.uses = '{}'
                AND (cardinality(posters) = 0 OR p.poster = ANY(posters))
              OFFSET 0)
        ORDER BY j.priority DESC, j.id
        LIMIT claim_limit
        FOR UPDATE OF j SKIP LOCKED
    ), claimed AS (
        UPDATE pdoflowd.jobs AS j
        SET status = 'executing',
            owner = claim_owner,
            daemon_id = daemon,
            attempt = j.attempt + 1,
            claimed_at = now(),
            progress = NULL,
            progress_note = NULL,
            progress_at = NULL
        FROM pdoflowd.postings AS p
        WHERE j.id = ANY (ARRAY(SELECT c.id FROM candidate AS c))
          AND p.id = j.posting_id
        RETURNING j.id, j.uuid, j.posting_id, p.uuid AS posting_uuid,
                  p.entry_point, j.priority, j.attempt, j.tries_remaining,
                  j.posargs::text AS posargs, j.kwargs::text AS kwargs,
                  p.timeout_s,
                  extract(epoch FROM coalesce(j.run_after, j.created_at))
                      ::float8 AS runnable_since,
                  p.store_result
    )
    SELECT true, w.id, w.posting_id, w.kind, w.status, NULL::uuid,
           NULL::uuid, NULL::text, NULL::integer, NULL::integer,
           NULL::integer, NULL::text, NULL::text, NULL::double precision,
           NULL::double precision, NULL::boolean
    FROM written AS w
    UNION ALL
    SELECT false, c.id, c.posting_id, NULL::text, NULL::text, c.uuid,
           c.posting_uuid, c.entry_point, c.priority, c.attempt,
           c.tries_remaining, c.posargs, c.kwargs, c.timeout_s,
           c.runnable_since, c.store_result
    FROM claimed AS c;
END
$$;
