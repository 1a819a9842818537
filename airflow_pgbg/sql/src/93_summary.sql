-- Summaries: the outcome of a batch as one bounded document.

CREATE FUNCTION @schema@._summary_row(c @schema@.log_background)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
RETURN jsonb_build_object(
    'seq', c.seq, 'uuid_child', c.uuid_child, 'status', c.status, 'attempt', c.attempt,
    'query', left(c.query, 500), 'command', c.result ->> 'command', 'sqlstate', c.sqlstate,
    'error', left(c.error, 500),
    'seconds', extract(epoch FROM c.end_time_exec - c.start_time_exec)::float8,
    'failed_attempts', coalesce(jsonb_array_length(c.errors), 0));
COMMENT ON FUNCTION @schema@._summary_row(@schema@.log_background) IS 'One child in a summary, texts cut to 500 characters.';

CREATE FUNCTION @schema@.pg_background_summary(uuid_father uuid, p_rows int DEFAULT 20, p_problems int DEFAULT 5)
RETURNS jsonb
LANGUAGE sql STABLE
AS $fn$
    SELECT jsonb_build_object(
        'uuid_parent', b.uuid_parent,
        'status', b.status,
        'children', b.children,
        'counts', jsonb_build_object('queued', b.queued, 'running', b.running, 'done', b.done,
                                     'failed', b.failed, 'stopped', b.stopped, 'lost', b.lost),
        'wall_seconds', extract(epoch FROM b.ended_at - b.started_at)::float8,
        'settings', b.session_settings,
        'retried', (SELECT count(*) FROM @schema@.log_background c
                     WHERE c.uuid_parent = b.uuid_parent AND c.errors IS NOT NULL),
        'rows_included', least(p_rows, b.children),
        'rows', (SELECT coalesce(jsonb_agg(@schema@._summary_row(c) ORDER BY c.seq), '[]'::jsonb)
                   FROM (SELECT * FROM @schema@.log_background c
                          WHERE c.uuid_parent = b.uuid_parent ORDER BY c.seq LIMIT p_rows) c),
        'problems', (SELECT coalesce(jsonb_agg(@schema@._summary_row(c) ORDER BY c.seq), '[]'::jsonb)
                       FROM (SELECT * FROM @schema@.log_background c
                              WHERE c.uuid_parent = b.uuid_parent AND c.status IN ('failed', 'lost', 'stopped')
                              ORDER BY c.seq LIMIT p_problems) c))
      FROM @schema@.batches b
     WHERE b.uuid_parent = uuid_father
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_summary(uuid, int, int) IS
    'The outcome of a batch as JSON: status, counts, wall time, its first p_rows children and its first '
    'p_problems failed, lost or stopped ones (texts cut to 500 characters), so its size does not grow with '
    'the batch. NULL for a batch the caller cannot see.';

CREATE FUNCTION @schema@.pg_background_take_outcome(uuid_father uuid, p_claimed_by text, p_rows int DEFAULT 20,
                                                    p_problems int DEFAULT 5)
RETURNS jsonb
LANGUAGE plpgsql
AS $fn$
BEGIN
    -- Only the claim that holds an ended batch takes its outcome: a late call of an earlier try
    -- (a zombie worker) records nothing.
    UPDATE @schema@.batch b
       SET outcome_taken_by = p_claimed_by, outcome_taken_at = clock_timestamp()
     WHERE b.uuid_parent = uuid_father AND b.claimed_by = p_claimed_by
       AND b.outcome_taken_by IS DISTINCT FROM p_claimed_by
       AND @schema@.batch_status(uuid_father) NOT IN ('queued', 'running');
    RETURN @schema@.pg_background_summary(uuid_father, p_rows, p_problems);
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_take_outcome(uuid, text, int, int) IS
    'pg_background_summary() of an ended batch, recording that p_claimed_by took its outcome: what a waiter '
    'calls as it ends its task. pg_background_submit() launches a succeeded batch anew only once a claim '
    'took its success (the task completed); a success nobody took (its waiter died first) is taken by the '
    'next claim instead.';

CREATE FUNCTION @schema@.pg_background_summaries(uuid_fathers uuid[], p_rows int DEFAULT 20, p_problems int DEFAULT 5)
RETURNS TABLE (uuid_parent uuid, summary jsonb)
LANGUAGE sql STABLE
AS $fn$
    SELECT u, x.summary
      FROM unnest(uuid_fathers) AS u
     CROSS JOIN LATERAL (SELECT @schema@.pg_background_summary(u, p_rows, p_problems) AS summary) x
     WHERE x.summary IS NOT NULL
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_summaries(uuid[], int, int) IS
    'pg_background_summary() of several batches in one round trip (a watcher''s batches that just ended).';
