-- The batch console: pages of children and figures that cost the same at any batch size.

CREATE FUNCTION @schema@._console_sorts()
RETURNS text[]
LANGUAGE sql IMMUTABLE
RETURN ARRAY['seq', 'status', 'start', 'duration', 'queue_wait'];
COMMENT ON FUNCTION @schema@._console_sorts() IS 'The orders pg_background_children_page() accepts.';

CREATE FUNCTION @schema@.pg_background_children_page(
    p_parent uuid,
    p_statuses text[] DEFAULT NULL,
    p_text text DEFAULT NULL,
    p_sqlstate text DEFAULT NULL,
    p_sort text DEFAULT 'seq',
    p_descending boolean DEFAULT false,
    p_limit int DEFAULT 100,
    p_offset int DEFAULT 0)
RETURNS TABLE (
    matching bigint, seq int, uuid_child uuid, status text, attempt int, query text, query_length int,
    command text, row_count bigint, has_preview boolean, sqlstate text, error text, error_detail text,
    error_hint text, stopped_by text, queued_time timestamptz, start_time_exec timestamptz,
    end_time_exec timestamptz, queue_seconds float8, run_seconds float8)
LANGUAGE plpgsql STABLE
AS $fn$
DECLARE
    v_matching bigint;
    v_now timestamptz := clock_timestamp();
BEGIN
    IF p_sort IS NULL OR NOT p_sort = ANY (@schema@._console_sorts()) THEN
        RAISE EXCEPTION 'unknown sort %', coalesce(quote_literal(p_sort), 'NULL') USING ERRCODE = 'invalid_parameter_value',
            HINT = 'One of ' || array_to_string(@schema@._console_sorts(), ', ') || '.';
    END IF;
    IF p_statuses IS NOT NULL AND EXISTS (
            SELECT 1 FROM unnest(p_statuses) s
             WHERE s IS NULL OR NOT s = ANY (enum_range(NULL::@schema@.child_status)::text[])) THEN
        RAISE EXCEPTION 'unknown status in %', p_statuses USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Statuses are ' || array_to_string(enum_range(NULL::@schema@.child_status)::text[], ', ') || '.';
    END IF;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 OR p_offset IS NULL OR p_offset < 0 THEN
        RAISE EXCEPTION 'a page is 1 to 1000 children from offset 0 or more, not % from %', p_limit, p_offset
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Text filters are bound values (LIKE metacharacters in them match themselves), never SQL. The
    -- count and the sort read narrow columns, and the sort keeps only the rows up to the page's end
    -- (top-N); only the page's own rows are read whole.
    SELECT count(*) INTO v_matching
      FROM @schema@.log_background c
     WHERE c.uuid_parent = p_parent
       AND (p_statuses IS NULL OR c.status::text = ANY (p_statuses))
       AND (p_sqlstate IS NULL OR c.sqlstate = upper(p_sqlstate))
       AND (p_text IS NULL OR strpos(lower(c.query), lower(p_text)) > 0);
    RETURN QUERY
    WITH page AS (
        SELECT h.id, h.waited, h.ran, row_number() OVER () AS position
          FROM (SELECT c.id, c.seq, c.status,
                       extract(epoch FROM c.start_time_exec - c.queued_time)::float8 AS waited,
                       extract(epoch FROM coalesce(c.end_time_exec, v_now) - c.start_time_exec)::float8 AS ran,
                       c.start_time_exec AS started
                  FROM @schema@.log_background c
                 WHERE c.uuid_parent = p_parent
                   AND (p_statuses IS NULL OR c.status::text = ANY (p_statuses))
                   AND (p_sqlstate IS NULL OR c.sqlstate = upper(p_sqlstate))
                   AND (p_text IS NULL OR strpos(lower(c.query), lower(p_text)) > 0)
                 -- An enum sorts in the order it declares its values: queued, running, done, failed, ...
                 ORDER BY
                   CASE WHEN p_sort = 'status' AND NOT p_descending THEN c.status END ASC,
                   CASE WHEN p_sort = 'status' AND p_descending THEN c.status END DESC,
                   CASE WHEN p_sort = 'start' AND NOT p_descending THEN c.start_time_exec END ASC NULLS LAST,
                   CASE WHEN p_sort = 'start' AND p_descending THEN c.start_time_exec END DESC NULLS LAST,
                   CASE WHEN NOT p_descending THEN
                       CASE p_sort WHEN 'duration' THEN coalesce(c.end_time_exec, v_now) - c.start_time_exec
                                   WHEN 'queue_wait' THEN c.start_time_exec - c.queued_time END END ASC NULLS LAST,
                   CASE WHEN p_descending THEN
                       CASE p_sort WHEN 'duration' THEN coalesce(c.end_time_exec, v_now) - c.start_time_exec
                                   WHEN 'queue_wait' THEN c.start_time_exec - c.queued_time END END DESC NULLS LAST,
                   CASE WHEN p_descending AND p_sort = 'seq' THEN c.seq END DESC,
                   c.seq
                 LIMIT p_limit OFFSET p_offset) h
    )
    SELECT v_matching, c.seq, c.uuid_child, c.status::text, c.attempt, left(c.query, 300), length(c.query),
           c.result->>'command', (c.result->>'rows')::bigint, coalesce(c.result ? 'preview', false),
           c.sqlstate, left(c.error, 2000), left(c.error_detail, 2000), left(c.error_hint, 2000), c.stopped_by,
           c.queued_time, c.start_time_exec, c.end_time_exec, p.waited, p.ran
      FROM page p
      JOIN @schema@.log_background c ON c.id = p.id
     ORDER BY p.position;
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_children_page(uuid, text[], text, text, text, boolean, int, int) IS
    'One page of a batch''s children for a console: filtered by status, by text in the query (case-insensitive, '
    'literal) and by SQLSTATE; sorted by seq, status, start, duration or queue_wait; without result previews '
    '(pg_background_child() has one child''s). matching counts the children that pass the filters. Unknown '
    'sorts or statuses and pages outside 1..1000 are errors (22023).';

CREATE FUNCTION @schema@.pg_background_child(p_child uuid)
RETURNS TABLE (uuid_parent uuid, seq int, status text, attempt int, query text, result jsonb, sqlstate text,
               error text, error_detail text, error_hint text, error_context text, errors jsonb, stopped_by text,
               pid int, queued_time timestamptz, start_time_exec timestamptz, end_time_exec timestamptz)
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT c.uuid_parent, c.seq, c.status::text, c.attempt, c.query, c.result, c.sqlstate, c.error, c.error_detail,
           c.error_hint, c.error_context, c.errors, c.stopped_by, c.pid, c.queued_time, c.start_time_exec,
           c.end_time_exec
      FROM @schema@.log_background c WHERE c.uuid_child = p_child;
END;
COMMENT ON FUNCTION @schema@.pg_background_child(uuid) IS
    'Everything about one child, with its result preview and every failed attempt (what a console loads on demand).';

CREATE FUNCTION @schema@.pg_background_figures(p_parent uuid, p_bins int DEFAULT 60)
RETURNS jsonb
LANGUAGE plpgsql STABLE
AS $fn$
DECLARE
    v_first timestamptz;
    v_last timestamptz;
    v_now timestamptz := clock_timestamp();
    v_width float8;
    v_out jsonb;
BEGIN
    IF p_bins IS NULL OR p_bins NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'bins must be 1 to 1000, not %', p_bins USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT min(c.start_time_exec), max(coalesce(c.end_time_exec, v_now)) INTO v_first, v_last
      FROM @schema@.log_background c WHERE c.uuid_parent = p_parent AND c.start_time_exec IS NOT NULL;
    IF v_first IS NULL THEN
        RETURN jsonb_build_object('started', false, 'bins', '[]'::jsonb);
    END IF;
    v_width := greatest(extract(epoch FROM v_last - v_first)::float8, 0.001) / p_bins;
    -- Running children at the end of each bin: starts so far minus ends so far (one pass, O(children)).
    WITH c AS (
        SELECT extract(epoch FROM x.start_time_exec - v_first)::float8 AS s,
               extract(epoch FROM x.end_time_exec - v_first)::float8 AS e,
               extract(epoch FROM x.start_time_exec - x.queued_time)::float8 AS waited,
               x.status
          FROM @schema@.log_background x
         WHERE x.uuid_parent = p_parent AND x.start_time_exec IS NOT NULL
    ), starts AS (
        SELECT least(floor(s / v_width)::int, p_bins - 1) AS b, count(*) AS n FROM c GROUP BY 1
    ), ends AS (
        SELECT least(floor(e / v_width)::int, p_bins - 1) AS b, count(*) AS n FROM c WHERE e IS NOT NULL GROUP BY 1
    ), series AS (
        SELECT g.b,
               sum(coalesce(st.n, 0)) OVER (ORDER BY g.b) - sum(coalesce(en.n, 0)) OVER (ORDER BY g.b) AS running,
               coalesce(en.n, 0) AS ended
          FROM generate_series(0, p_bins - 1) AS g(b)
          LEFT JOIN starts st ON st.b = g.b LEFT JOIN ends en ON en.b = g.b
    )
    SELECT jsonb_build_object(
               'started', true,
               'first_start', v_first,
               'span_seconds', extract(epoch FROM v_last - v_first)::float8,
               'bin_seconds', v_width,
               'bins', (SELECT jsonb_agg(jsonb_build_array(s.running, s.ended) ORDER BY s.b) FROM series s),
               'run_p50', (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY e - s) FROM c WHERE e IS NOT NULL),
               'run_p95', (SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY e - s) FROM c WHERE e IS NOT NULL),
               'queue_wait_p50', (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY waited) FROM c),
               'queue_wait_p95', (SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY waited) FROM c),
               'ended', (SELECT count(*) FROM c WHERE e IS NOT NULL),
               'per_second', (SELECT count(*) FROM c WHERE e IS NOT NULL)
                             / greatest(extract(epoch FROM v_last - v_first)::float8, 0.001))
      INTO v_out;
    RETURN v_out;
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_figures(uuid, int) IS
    'A batch''s figures for a console, in one pass over its started children: running children at the end of '
    'each of p_bins time bins and children ended in it (the timeline at any size), p50/p95 run time and queue '
    'wait, and throughput (ended children per second since the first start).';

CREATE FUNCTION @schema@.pg_background_progress(p_parent uuid)
RETURNS TABLE (uuid_child uuid, pid int, command text, phase text, percent numeric)
LANGUAGE plpgsql STABLE
AS $fn$
BEGIN
    -- The backends of a batch's running children: the runner that runs a child itself, the nested
    -- worker that runs it at top level (named after the child), or on pg_cron the child's own job.
    -- Only processes of the batch's role are considered, and what the views show depends on the
    -- caller's rights, as for any reader of pg_stat_progress_*.
    RETURN QUERY
    WITH running AS (
        SELECT c.uuid_child, c.pid, c.backend_start, c.role_name, @schema@._cron_child_pid(c.uuid_child) AS cron_pid
          FROM @schema@.log_background c
         WHERE c.uuid_parent = p_parent AND c.status = 'running'
    ), backends AS (
        SELECT r.uuid_child, a.pid
          FROM running r
          JOIN pg_stat_activity a
            ON a.usename = r.role_name
           AND ((a.pid = r.pid AND a.backend_start = r.backend_start)
                OR a.application_name = 'pgbg-child:' || r.uuid_child
                OR a.pid = r.cron_pid)
    ), progress AS (
        SELECT p.pid, 'VACUUM'::text AS command, p.phase::text AS phase,
               round(100.0 * p.heap_blks_scanned / nullif(p.heap_blks_total, 0), 1) AS percent
          FROM pg_stat_progress_vacuum p
        UNION ALL
        SELECT p.pid, p.command, p.phase,
               round(100.0 * coalesce(nullif(p.blocks_done, 0)::numeric / nullif(p.blocks_total, 0),
                                      p.tuples_done::numeric / nullif(p.tuples_total, 0)), 1)
          FROM pg_stat_progress_create_index p
        UNION ALL
        SELECT p.pid, p.command, p.phase, round(100.0 * p.heap_blks_scanned / nullif(p.heap_blks_total, 0), 1)
          FROM pg_stat_progress_cluster p
        UNION ALL
        SELECT p.pid, 'COPY ' || p.type, p.command, round(100.0 * p.bytes_processed / nullif(p.bytes_total, 0), 1)
          FROM pg_stat_progress_copy p
        UNION ALL
        SELECT p.pid, 'ANALYZE', p.phase, round(100.0 * p.sample_blks_scanned / nullif(p.sample_blks_total, 0), 1)
          FROM pg_stat_progress_analyze p
    )
    SELECT DISTINCT ON (b.uuid_child) b.uuid_child, b.pid, g.command, g.phase, g.percent
      FROM backends b JOIN progress g ON g.pid = b.pid
     ORDER BY b.uuid_child, g.percent DESC NULLS LAST;
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_progress(uuid) IS
    'Phase and percent of the running children of a batch that PostgreSQL reports progress for (VACUUM, '
    'CREATE INDEX incl. CONCURRENTLY, CLUSTER / VACUUM FULL, COPY, ANALYZE), from pg_stat_progress_*; one row '
    'per such child, none for the others. Bounded by the batch''s cap.';
