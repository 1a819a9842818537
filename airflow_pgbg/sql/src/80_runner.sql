-- Runners: one loop for both launchers. A runner holds a global slot and a slot of its batch and
-- repeats: claim the next child (in the transaction that counts the one before), commit, run it
-- (inline here, in a nested worker, or in a pg_cron job), settle its outcome. _verdict() alone decides
-- how a child ended; _settle() records it.

CREATE FUNCTION @schema@._claim(p_parent uuid, p_shard int, p_backend_start timestamptz,
                               p_settled @schema@.child_status, p_claim boolean, p_after int,
                               p_done_id bigint, p_done_attempt int, p_done @schema@.child_outcome,
                               p_done_at timestamptz)
RETURNS TABLE (id bigint, uuid_child uuid, query text, run_mode text, seq int, attempt int, settled boolean)
LANGUAGE plpgsql
AS $fn$
#variable_conflict use_column
DECLARE
    v_done int := 0;
BEGIN
    IF p_done_id IS NOT NULL THEN
        -- A child that ended with a result is done whatever else its row says (see _verdict()): it is
        -- recorded here, as _settle_many() records a done child. Before the claim, in a statement of its
        -- own: a stop holds the rows it marks (this child's among them) while it stops the queued ones, and
        -- a runner that had locked the next queued child first would wait for it as it waits for the runner.
        UPDATE @schema@.log_background d
           SET status = 'done', result = (p_done).result, sqlstate = (p_done).sqlstate, error = (p_done).message,
               error_detail = nullif((p_done).detail, ''), error_hint = nullif((p_done).hint, ''),
               error_context = nullif((p_done).context, ''), end_time_exec = p_done_at, not_before = NULL
         WHERE d.uuid_parent = p_parent AND d.id = p_done_id AND d.status = 'running' AND d.attempt = p_done_attempt;
        v_done := CASE WHEN FOUND THEN 1 ELSE 0 END;
    END IF;
    -- PL/pgSQL, not SQL: its plan is cached for the runner's session, and this runs once per child.
    -- Each row is named by the leading columns of every partial index its status matches: a partial
    -- index is a cheap plan wherever statistics show few rows of that status (a queue analyzed empty),
    -- and one scanned whole, filtered by id, read every queued child of the role for each claim.
    RETURN QUERY
    WITH c AS (
        UPDATE @schema@.log_background c
           SET status = 'running', pid = pg_backend_pid(), backend_start = p_backend_start,
               start_time_exec = clock_timestamp(), end_time_exec = NULL, attempt = c.attempt + 1,
               not_before = NULL, stop_requested = false, requeue_on_stop = false, result = NULL,
               sqlstate = NULL
         WHERE p_claim AND c.status = 'queued' AND c.role_name = current_user AND c.uuid_parent = p_parent
           AND c.seq = (SELECT x.seq FROM @schema@.log_background x
                        WHERE x.uuid_parent = p_parent AND x.status = 'queued' AND x.role_name = current_user
                          AND (x.not_before IS NULL OR x.not_before <= clock_timestamp())
                          AND x.seq > p_after
                        ORDER BY x.seq
                        LIMIT 1
                        FOR UPDATE SKIP LOCKED)
        RETURNING c.id, c.uuid_child, c.query, c.run_mode, c.seq, c.attempt),
    n AS (SELECT count(*) AS claimed FROM c),
    counted AS (
        INSERT INTO @schema@.batch_progress AS p (uuid_parent, shard, role_name, queued, running, done, failed,
                                                  stopped, lost, first_start, last_end)
        SELECT p_parent, p_shard, current_user,
               coalesce((p_settled = 'queued')::int, 0) - n.claimed,
               n.claimed - (p_settled IS NOT NULL)::int - v_done,
               coalesce((p_settled = 'done')::int, 0) + v_done, coalesce((p_settled = 'failed')::int, 0),
               coalesce((p_settled = 'stopped')::int, 0), coalesce((p_settled = 'lost')::int, 0),
               CASE WHEN n.claimed > 0 THEN clock_timestamp() END,
               CASE WHEN p_settled IS NOT NULL OR v_done > 0 THEN clock_timestamp() END
          FROM n
         WHERE n.claimed > 0 OR p_settled IS NOT NULL OR v_done > 0
        ON CONFLICT (uuid_parent, shard) DO UPDATE
           SET queued = p.queued + excluded.queued, running = p.running + excluded.running,
               done = p.done + excluded.done, failed = p.failed + excluded.failed,
               stopped = p.stopped + excluded.stopped, lost = p.lost + excluded.lost,
               first_start = least(p.first_start, excluded.first_start),
               last_end = greatest(p.last_end, excluded.last_end))
    SELECT c.id, c.uuid_child, c.query, c.run_mode, c.seq, c.attempt, v_done > 0 FROM n LEFT JOIN c ON true;
END
$fn$;
COMMENT ON FUNCTION @schema@._claim(uuid, int, timestamptz, @schema@.child_status, boolean, int, bigint, int,
                                    @schema@.child_outcome, timestamptz) IS
    'Once per child for a runner: records the child it just ran as done at p_done_at (p_done_id, claimed as '
    'attempt p_done_attempt, when p_done has a result) or counts one it settled otherwise (p_settled), and, '
    'with p_claim, claims the next queued child that is due, in seq order after p_after. One row: the '
    'child claimed (NULLs for none), and settled: whether p_done_id''s claim still held and it is done. '
    'Starting after the runner''s previous claim skips the index entries of children already claimed, '
    'which stay until no snapshot can see them (a long poll holds one back).';

CREATE FUNCTION @schema@._claim_next(p_parent uuid, p_shard int, p_backend_start timestamptz,
                                    p_settled @schema@.child_status, p_claim boolean, p_after int,
                                    p_done_id bigint DEFAULT NULL, p_done_attempt int DEFAULT NULL,
                                    p_done @schema@.child_outcome DEFAULT NULL, p_done_at timestamptz DEFAULT NULL,
                                    OUT id bigint,
                                    OUT uuid_child uuid, OUT query text, OUT run_mode text, OUT seq int,
                                    OUT attempt int, OUT settled boolean)
LANGUAGE plpgsql
AS $fn$
DECLARE
    c record;
BEGIN
    SELECT * INTO c FROM @schema@._claim(p_parent, p_shard, p_backend_start, p_settled, p_claim, p_after,
                                         p_done_id, p_done_attempt, p_done, p_done_at);
    settled := c.settled;
    IF c.id IS NULL AND p_claim AND p_after > 0 AND (p_done_id IS NULL OR c.settled) THEN
        -- Children queued again behind this runner (retries, a takeover) come after the rest.
        SELECT * INTO c FROM @schema@._claim(p_parent, p_shard, p_backend_start, NULL, true, 0, NULL, NULL, NULL, NULL);
    END IF;
    SELECT c.id, c.uuid_child, c.query, c.run_mode, c.seq, c.attempt INTO id, uuid_child, query, run_mode, seq, attempt;
END
$fn$;
COMMENT ON FUNCTION @schema@._claim_next(uuid, int, timestamptz, @schema@.child_status, boolean, int, bigint, int,
                                         @schema@.child_outcome, timestamptz) IS
    '_claim() after the runner''s previous child, then from the start of the queue.';

CREATE FUNCTION @schema@._verdict(p_outcome @schema@.child_outcome, p_gone boolean, p_child @schema@.log_background,
                                  p_batch @schema@.batch)
RETURNS text
LANGUAGE sql VOLATILE
-- VOLATILE, as clock_timestamp() is: declared STABLE it would never be inlined into the settle, where
-- it runs once per child (5 µs a call instead of 1).
-- Decided from SQLSTATEs and the engine's own state, never from an error's text: 57014 is a cancel
-- (pg_background turns a terminate into one too), 57P01/57P02 a shutdown.
RETURN CASE
    WHEN (p_outcome).result IS NOT NULL THEN 'done'
    WHEN (p_child).stop_requested AND (p_child).requeue_on_stop THEN 'requeued'
    WHEN (p_child).stop_requested THEN 'stopped'
    WHEN (p_outcome).sqlstate = '57014' AND (p_batch).statement_timeout IS NOT NULL
         AND clock_timestamp() - (p_child).start_time_exec >= (p_batch).statement_timeout THEN 'timed out'
    WHEN NOT (p_gone OR (p_outcome).sqlstate IN ('57014', '57P01', '57P02')) THEN
        CASE WHEN @schema@._is_transient((p_outcome).sqlstate) AND (p_child).failures < (p_batch).retries
             THEN 'retry' ELSE 'failed' END
    -- Cut short from outside the engine, or its runner died. A stop of the whole batch is under way; or
    -- an inline child rolled back with its runner's transaction (it never happened: it runs again,
    -- unless it keeps taking its runner down); or the work may have committed in its own worker.
    WHEN (p_batch).stop_requested_at IS NOT NULL THEN 'stopped'
    WHEN (p_child).run_mode = 'inline' AND (p_child).interruptions + 1 < 3 THEN 'interrupted'
    WHEN (p_child).run_mode = 'inline' THEN 'lost'
    WHEN (p_batch).retry_lost AND (p_child).failures < (p_batch).retries THEN 'retry lost'
    ELSE 'lost'
END;
COMMENT ON FUNCTION @schema@._verdict(@schema@.child_outcome, boolean, @schema@.log_background, @schema@.batch) IS
    'How a running child ended: done, requeued (a takeover cut it short), stopped, timed out, retry (a '
    'transient failure with retries left), failed, interrupted (an inline child whose runner was '
    'cancelled, terminated or died: it rolled back and is queued again, 3 times at most), retry lost, or '
    'lost (it may have committed in a worker of its own, or its runner died under it 3 times). p_gone: '
    'its runner died without an outcome.';

CREATE FUNCTION @schema@._status_of_verdict(p_verdict text)
RETURNS @schema@.child_status
LANGUAGE sql IMMUTABLE
-- Each branch a constant of the enum: a cast of text to it (enum_in) is not immutable, and would keep
-- this from being inlined into the settle.
RETURN CASE p_verdict WHEN 'done' THEN 'done'::@schema@.child_status WHEN 'stopped' THEN 'stopped'::@schema@.child_status
                      WHEN 'timed out' THEN 'failed'::@schema@.child_status WHEN 'failed' THEN 'failed'::@schema@.child_status
                      WHEN 'lost' THEN 'lost'::@schema@.child_status ELSE 'queued'::@schema@.child_status END;
COMMENT ON FUNCTION @schema@._status_of_verdict(text) IS 'The status a verdict of _verdict() gives a child.';

CREATE FUNCTION @schema@._settle_many(p_ids bigint[], p_attempts int[], p_outcomes @schema@.child_outcome[],
                                      p_started timestamptz[], p_gone boolean, p_backend_start timestamptz)
RETURNS TABLE (id bigint, uuid_child uuid, status @schema@.child_status, verdict text)
LANGUAGE plpgsql
-- One plan for every call: given the arrays, the planner found custom plans cheaper and planned this
-- statement afresh for each lone child (0.3-0.6 ms, more than running it); the generic plan reaches each
-- row by its key, for one child as for a burst of 2,000.
SET plan_cache_mode = force_generic_plan
AS $fn$
#variable_conflict use_column
BEGIN
    -- A child claimed and committed as running is settled while that claim (its attempt) still holds. A
    -- child of a burst (p_started) was claimed by its row lock alone: still queued, it is settled from
    -- there, as the attempt after its last. The rows first: a stop holds a row while it marks it and
    -- signals the runner, and a stop of the whole batch marks the batch's row first; both are seen as they
    -- committed.
    RETURN QUERY
    WITH d AS (
        -- Each row by its primary key (the arrays side by side), never a scan of the table.
        SELECT c.id, p_outcomes[u.k] AS o, u.started, @schema@._verdict(p_outcomes[u.k], p_gone, c, b) AS v,
               c.failures, c.interruptions, c.errors, c.run_mode, c.stopped_by,
               c.attempt + (u.started IS NOT NULL)::int AS attempt, b.retry_delay, b.retry_backoff
          FROM unnest(p_ids, p_attempts, p_started) WITH ORDINALITY AS u(id, attempt, started, k)
          JOIN @schema@.log_background c ON c.id = u.id
          JOIN @schema@.batch b ON b.uuid_parent = c.uuid_parent
         WHERE c.id = ANY (p_ids)
           AND CASE WHEN u.started IS NULL THEN c.status = 'running' AND c.attempt = u.attempt
                    ELSE c.status = 'queued' END
           FOR UPDATE OF c)
    UPDATE @schema@.log_background x
       SET status = @schema@._status_of_verdict(d.v),
           attempt = d.attempt,
           pid = CASE WHEN d.started IS NOT NULL THEN pg_backend_pid() ELSE x.pid END,
           backend_start = coalesce(p_backend_start, x.backend_start),
           start_time_exec = coalesce(d.started, x.start_time_exec),
           result = (d.o).result,
           sqlstate = (d.o).sqlstate,
           error = CASE d.v
               WHEN 'requeued' THEN 'cut short and queued again: ' || coalesce(d.stopped_by, 'takeover')
               WHEN 'stopped' THEN 'stopped by pg_background_stop()'
               WHEN 'interrupted' THEN 'its runner was interrupted; rolled back and queued again: ' || (d.o).message
               WHEN 'lost' THEN CASE WHEN d.run_mode = 'inline'
                                     THEN 'its runner was interrupted 3 times while running it (each time rolled back)'
                                     WHEN p_gone THEN 'worker process ended without recording an outcome '
                                                      '(terminated, crashed or server restarted)'
                                     ELSE 'worker process was cancelled or terminated from outside: ' || (d.o).message END
               ELSE (d.o).message END,
           error_detail = nullif((d.o).detail, ''),
           error_hint = nullif((d.o).hint, ''),
           error_context = nullif((d.o).context, ''),
           end_time_exec = clock_timestamp(),
           failures = d.failures + (d.v IN ('retry', 'retry lost') OR d.v = 'lost' AND d.run_mode <> 'inline'
                                    OR d.v = 'failed' AND @schema@._is_transient((d.o).sqlstate))::int,
           interruptions = d.interruptions + (d.v IN ('interrupted', 'lost') AND d.run_mode = 'inline')::int,
           not_before = CASE WHEN d.v IN ('retry', 'retry lost')
                             THEN @schema@._retry_at(d.retry_delay, d.retry_backoff, d.failures) END,
           errors = CASE WHEN d.v IN ('done', 'requeued', 'stopped') THEN d.errors
                         ELSE coalesce(d.errors, '[]') || @schema@._attempt_error(
                             d.attempt, CASE WHEN d.v IN ('timed out', 'retry', 'failed') THEN 'failed'
                                             WHEN d.v = 'interrupted' THEN 'interrupted' ELSE 'lost' END,
                             (d.o).sqlstate, coalesce((d.o).message, 'worker process ended without recording an outcome'))
                    END
      FROM d
     WHERE x.id = d.id
    RETURNING x.id, x.uuid_child, x.status, d.v;
END
$fn$;
COMMENT ON FUNCTION @schema@._settle_many(bigint[], int[], @schema@.child_outcome[], timestamptz[], boolean, timestamptz) IS
    'Records how children ended (see _verdict()): status, result or error, retries and interruptions used, '
    'and the attempt in errors; a child whose claim (attempt) no longer holds is left alone, and not '
    'returned. p_started: children of a burst, claimed by their row lock alone and still queued. p_gone: '
    'their runner died; housekeeping settles them.';

CREATE FUNCTION @schema@._settle(p_id bigint, p_attempt int, p_outcome @schema@.child_outcome,
                                 p_gone boolean DEFAULT false)
RETURNS TABLE (status @schema@.child_status, leave boolean)
LANGUAGE plpgsql
AS $fn$
#variable_conflict use_column
DECLARE
    v text;
BEGIN
    SELECT s.verdict INTO v FROM @schema@._settle_many(ARRAY[p_id], ARRAY[p_attempt], ARRAY[p_outcome],
                                                       ARRAY[NULL::timestamptz], p_gone, NULL) s;
    -- A runner cancelled or terminated from outside leaves; others start where work remains. NULL: not
    -- this claim's to record any more (settled meanwhile, or claimed again).
    RETURN QUERY SELECT CASE WHEN v IS NOT NULL THEN @schema@._status_of_verdict(v) END,
                        coalesce(v IN ('interrupted', 'retry lost', 'lost') AND NOT p_gone, false);
END
$fn$;
COMMENT ON FUNCTION @schema@._settle(bigint, int, @schema@.child_outcome, boolean) IS
    '_settle_many() of one child claimed as running (attempt p_attempt): its status, NULL when that claim no '
    'longer holds, and whether its runner should leave.';

CREATE FUNCTION @schema@._run_inline(p_sql text, p_settings @schema@.settings, p_session jsonb DEFAULT NULL)
RETURNS @schema@.child_outcome
LANGUAGE plpgsql
AS $fn$
DECLARE
    o @schema@.child_outcome;
BEGIN
    -- Here, so that a setting the role may no longer set fails the child, not its runner.
    PERFORM set_config(s.key, s.value, false) FROM jsonb_each_text(p_session) s;
    o.result := @schema@._execute_inline(p_sql, p_settings.preview_rows, p_settings.preview_bytes);
    RETURN o;
EXCEPTION WHEN query_canceled OR OTHERS THEN
    -- A cancel (a terminate, in pg_background) can land after the statement, before this block ends: its
    -- work rolled back with the subtransaction, and a result kept here would settle it done without it.
    o.result := NULL;
    GET STACKED DIAGNOSTICS o.sqlstate = RETURNED_SQLSTATE, o.message = MESSAGE_TEXT, o.detail = PG_EXCEPTION_DETAIL,
                            o.hint = PG_EXCEPTION_HINT, o.context = PG_EXCEPTION_CONTEXT;
    RETURN o;
END
$fn$;
COMMENT ON FUNCTION @schema@._run_inline(text, @schema@.settings, jsonb) IS
    'Runs a child in the runner''s own transaction (its effects commit with its outcome, or roll back '
    'with its error) with the batch''s settings (p_session; _leave_batch_session() undoes them, and says '
    'whether the commit needs a WAL flush), and returns how it ended.';

CREATE FUNCTION @schema@._shape(p_sql text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
-- Literals out: one statement per tenant, per id or per day has one shape.
RETURN regexp_replace(p_sql, $re$'(''|[^'])*'|\m[0-9]+(\.[0-9]+)?\M$re$, '?', 'g');
COMMENT ON FUNCTION @schema@._shape(text) IS 'A statement without its string and number literals.';

CREATE FUNCTION @schema@._burst(p_batch @schema@.batch, p_shard int, p_backend_start timestamptz, p_after int,
                               p_settings @schema@.settings, p_like text, OUT after int, OUT cut boolean,
                               OUT failed uuid)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_shape text := @schema@._shape(p_like);
    v_last text := p_like;  -- the same text has the same shape: the regular expression only for another
    v_app text := current_setting('application_name');
    -- None may wait for a lock, whatever the batch's lock_timeout.
    v_session jsonb := p_batch.session_settings || '{"lock_timeout": "1ms"}';
    x record;
    v_ids bigint[] := '{}';
    v_attempts int[] := '{}';
    v_outcomes @schema@.child_outcome[] := '{}';
    v_started timestamptz[] := '{}';
    v_t0 timestamptz;
    v_deadline timestamptz := clock_timestamp() + interval '20 ms';
    o @schema@.child_outcome;
    s record;
BEGIN
    -- Short inline children, one after the other in the runner's transaction, each in a subtransaction of
    -- its own, claimed by their row lock alone and settled together: one commit for them all. Bounded to
    -- 20 ms, so that monitors stay current, and to 40 subtransactions that wrote: those keep an XID that
    -- every snapshot on the server must track, in a cache of 64 per transaction, and one that overflows
    -- it slows them all down (one that only read has none: a burst of reads is bounded by time alone).
    -- Nothing of them is committed before they all are: a runner that dies here leaves them queued, as if
    -- none had run. A child of a burst shows queued while it runs: only statements of the shape of one
    -- that has just taken under a millisecond join it (literals aside), none may wait for a lock, and the
    -- burst ends at a child of another shape, of its own worker, or one that took a millisecond.
    after := p_after;
    cut := false;
    FOR x IN SELECT c.id, c.query, c.run_mode, c.seq, c.attempt FROM @schema@.log_background c
              WHERE c.uuid_parent = p_batch.uuid_parent AND c.status = 'queued' AND c.role_name = current_user
                AND (c.not_before IS NULL OR c.not_before <= clock_timestamp()) AND c.seq > p_after
              ORDER BY c.seq
              LIMIT 2000
                FOR UPDATE SKIP LOCKED
    LOOP
        EXIT WHEN x.run_mode <> 'inline' OR clock_timestamp() >= v_deadline
               OR x.query IS DISTINCT FROM v_last AND @schema@._shape(x.query) <> v_shape
               -- Looked at every 8 children (26 µs a look): at most 47 when it stops, if each wrote once.
               OR cardinality(v_ids) % 8 = 7 AND @schema@._subxact_xids() >= 40;
        v_t0 := clock_timestamp();
        v_last := x.query;
        o := @schema@._run_inline(x.query, p_settings, v_session);
        -- _leave_batch_session() without its commit rule: the runner decides that once for the burst.
        RESET ALL;
        PERFORM set_config('application_name', v_app, false);
        IF o.sqlstate IN ('57014', '57P01', '57P02') THEN
            cut := true;  -- a stop or a terminate: it rolled back and stays queued, for the stop to find
            EXIT;
        ELSIF o.sqlstate = '55P03' THEN
            EXIT;  -- it would wait for a lock: it rolled back, and runs next on its own, with the role's timeout
        END IF;
        v_ids := v_ids || x.id;
        v_attempts := v_attempts || x.attempt;
        v_outcomes := v_outcomes || o;
        v_started := v_started || v_t0;
        after := x.seq;
        EXIT WHEN clock_timestamp() - v_t0 >= interval '1 ms';
    END LOOP;
    IF cardinality(v_ids) = 0 THEN
        RETURN;
    END IF;
    SELECT count(*) FILTER (WHERE m.status = 'queued') AS queued, count(*) FILTER (WHERE m.status = 'done') AS done,
           count(*) FILTER (WHERE m.status = 'failed') AS failed, count(*) AS n,
           (array_agg(m.uuid_child) FILTER (WHERE m.status = 'failed'))[1] AS first_failed
      INTO s FROM @schema@._settle_many(v_ids, v_attempts, v_outcomes, v_started, false, p_backend_start) m;
    PERFORM @schema@._count(p_batch.uuid_parent, current_user, p_shard, s.queued - s.n, 0, s.done, s.failed, 0, 0,
                            v_started[1], clock_timestamp());
    failed := CASE WHEN p_batch.fail_fast THEN s.first_failed END;
END
$fn$;
COMMENT ON FUNCTION @schema@._burst(@schema@.batch, int, timestamptz, int, @schema@.settings, text) IS
    'Runs the next short inline children of the batch of p_like''s shape in the runner''s transaction and '
    'settles them in one statement; after: the seq of the last it ran; cut: a stop or terminate cut it short; failed: the first '
    'that failed for good, when the batch fails fast.';

CREATE FUNCTION @schema@._await_starter(p_starter xid8)
RETURNS void
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_since timestamptz := clock_timestamp();
BEGIN
    -- Whoever starts a runner (a launch, a poll, a retry, housekeeping) may still be writing the work
    -- it started it for; what the runner looks for is visible once that transaction has ended. A launch
    -- ends within milliseconds: look every millisecond for a while (the check costs microseconds).
    WHILE pg_xact_status(p_starter) = 'in progress' LOOP
        PERFORM pg_sleep(CASE WHEN clock_timestamp() - v_since < interval '200 ms' THEN 0.001 ELSE 0.05 END);
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION @schema@._await_starter(xid8) IS
    'Waits until the transaction that started this runner has ended, so that the runner sees its work.';

CREATE FUNCTION @schema@._retry_due(p_parent uuid)
RETURNS timestamptz
LANGUAGE sql STABLE
RETURN (SELECT min(x.not_before) FROM @schema@.log_background x
         WHERE x.uuid_parent = p_parent AND x.status = 'queued' AND x.not_before > clock_timestamp());
COMMENT ON FUNCTION @schema@._retry_due(uuid) IS 'When the next child of the batch waiting for a retry is due; NULL if none waits.';

CREATE FUNCTION @schema@._take_slots(p_batch @schema@.batch, OUT global_slot int, OUT batch_slot int)
LANGUAGE plpgsql
AS $fn$
BEGIN
    global_slot := @schema@._take_slot(@schema@._global_lock_key(), @schema@._global_cap(), NULL);
    IF global_slot IS NOT NULL THEN
        batch_slot := @schema@._take_slot(@schema@._batch_lock_key(p_batch.uuid_parent), p_batch.max_parallel,
                                          p_batch.role_name);
        IF batch_slot IS NULL THEN
            PERFORM pg_advisory_unlock(@schema@._global_lock_key(), global_slot);
            global_slot := NULL;
        END IF;
    END IF;
END
$fn$;
COMMENT ON FUNCTION @schema@._take_slots(@schema@.batch) IS
    'A global slot and a slot of the batch for this runner, or neither (NULLs) when either cap is reached.';

CREATE FUNCTION @schema@._adopt(p_batch @schema@.batch, INOUT p_slot int, OUT next @schema@.batch)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_slot int;
BEGIN
    -- The batch has nothing left to start: keep the global slot busy with another batch of the role
    -- that is short of runners, rather than leave it to the next poll.
    FOR next IN
        SELECT b.* FROM @schema@.batch b
         WHERE b.role_name = current_user AND b.stop_requested_at IS NULL AND b.uuid_parent <> p_batch.uuid_parent
           AND EXISTS (SELECT 1 FROM @schema@.log_background x WHERE x.uuid_parent = b.uuid_parent AND x.status = 'queued')
         ORDER BY b.created_at
         LIMIT 20
    LOOP
        v_slot := @schema@._take_slot(@schema@._batch_lock_key(next.uuid_parent), next.max_parallel, next.role_name);
        IF v_slot IS NOT NULL THEN
            PERFORM pg_advisory_unlock(@schema@._batch_lock_key(p_batch.uuid_parent), p_slot);
            p_slot := v_slot;
            PERFORM set_config('application_name', 'pgbg:' || next.uuid_parent, false);
            RETURN;
        END IF;
    END LOOP;
    next := NULL;
END
$fn$;
COMMENT ON FUNCTION @schema@._adopt(@schema@.batch, int) IS
    'Moves the runner to another batch of its role with queued children and a free slot (its batch '
    'slot swapped in p_slot); next is NULL when there is none.';

CREATE FUNCTION @schema@._start(p_parent uuid, p_starter xid8, OUT batch @schema@.batch, OUT global_slot int,
                               OUT batch_slot int, OUT backend_start timestamptz)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_slots record;
BEGIN
    PERFORM set_config('application_name', 'pgbg:' || p_parent, false);
    -- A pg_background worker starts with its starter's settings: the role's defaults instead.
    PERFORM @schema@._leave_batch_session();
    PERFORM @schema@._await_starter(p_starter);
    SELECT * INTO batch FROM @schema@.batch b WHERE b.uuid_parent = p_parent AND b.role_name = current_user;
    IF FOUND THEN  -- else its starter rolled back
        v_slots := @schema@._take_slots(batch);
        global_slot := v_slots.global_slot;
        batch_slot := v_slots.batch_slot;
        -- This backend's row alone: pg_stat_activity reads every backend's (3 ms of a runner's start).
        SELECT a.backend_start INTO backend_start FROM pg_stat_get_activity(pg_backend_pid()) a;
    END IF;
END
$fn$;
COMMENT ON FUNCTION @schema@._start(uuid, xid8) IS
    'A runner''s start: once its starter has ended, its batch and its slots (global_slot NULL when it got none).';

CREATE FUNCTION @schema@._subxact_xids()
RETURNS int
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_xids int;
BEGIN
    -- Each inline child runs in a subtransaction of its own, which gets an XID only if it writes, and keeps
    -- it in this backend's cache of subtransaction XIDs until the transaction ends (a child that failed
    -- rolled its subtransaction back, and left it). The engine's own writes are made outside them.
    PERFORM pg_stat_clear_snapshot();
    SELECT CASE WHEN s.subxact_overflowed THEN 65 ELSE s.subxact_count END INTO v_xids
      FROM pg_stat_get_backend_idset() b(id), pg_stat_get_backend_subxact(b.id) s
     WHERE pg_stat_get_backend_pid(b.id) = pg_backend_pid();
    RETURN coalesce(v_xids, 65);
END
$fn$;
COMMENT ON FUNCTION @schema@._subxact_xids() IS
    'How many subtransactions of this transaction that have not rolled back hold an XID (they wrote); 65 '
    'once PostgreSQL''s cache of 64 has overflowed.';

CREATE FUNCTION @schema@._children_wrote()
RETURNS boolean
LANGUAGE sql VOLATILE
RETURN @schema@._subxact_xids() > 0;
COMMENT ON FUNCTION @schema@._children_wrote() IS
    'Whether an inline child that ran in this transaction (and did not roll back) wrote: one of its '
    'subtransactions has an XID.';

CREATE PROCEDURE @schema@._run(p_query text, p_child uuid, p_mode text, p_batch @schema@.batch,
                               p_settings @schema@.settings, INOUT p_outcome @schema@.child_outcome)
LANGUAGE plpgsql
AS $fn$
BEGIN
    IF p_mode = 'inline' THEN
        p_outcome := @schema@._run_inline(p_query, p_settings, p_batch.session_settings);
        PERFORM @schema@._leave_batch_session();
    ELSIF p_settings.launcher = 'pg_cron' THEN
        CALL @schema@._run_in_cron_job(p_query, p_child, p_batch.session_settings, p_batch.statement_timeout, p_outcome);
    ELSE
        CALL @schema@._run_in_worker(p_query, p_child, p_batch.statement_timeout, p_batch.session_settings, p_outcome);
    END IF;
END
$fn$;
COMMENT ON PROCEDURE @schema@._run(text, uuid, text, @schema@.batch, @schema@.settings, @schema@.child_outcome) IS
    'Runs one claimed child where its run mode and the launcher say, with its batch''s settings, and returns '
    'how it ended.';

CREATE FUNCTION @schema@._role_has_queued()
RETURNS boolean
LANGUAGE sql STABLE
-- Through the role's own queued children (their index by role), never every role's: a lingering runner
-- asks every 2 ms, and read another role's queue of 50,000 for 400 ms each time, eight runners at once.
-- The batch by its key, once per child looked at: most often the first is the answer.
RETURN EXISTS (SELECT 1 FROM @schema@.log_background x
                WHERE x.role_name = current_user AND x.status = 'queued'
                  AND (SELECT bt.stop_requested_at IS NULL FROM @schema@.batch bt WHERE bt.uuid_parent = x.uuid_parent));
COMMENT ON FUNCTION @schema@._role_has_queued() IS 'Whether a batch of the caller''s role, not stopped, has queued children.';

CREATE FUNCTION @schema@._role_slots_free()
RETURNS boolean
LANGUAGE sql VOLATILE
-- The batches with queued children first, behind a fence: a condition on the batch alone is checked as
-- the batch table is read, so the slot holders were counted for every batch the role had ever run (a
-- look at pg_locks each: 20 ms for a role with 26 batches, at each wake of each lingering runner).
RETURN EXISTS (
    WITH waiting AS MATERIALIZED (
        SELECT bt.uuid_parent, bt.max_parallel FROM @schema@.batch bt
         WHERE bt.role_name = current_user AND bt.stop_requested_at IS NULL
           AND EXISTS (SELECT 1 FROM @schema@.log_background x
                        WHERE x.uuid_parent = bt.uuid_parent AND x.status = 'queued'))
    SELECT 1 FROM waiting w
     WHERE @schema@._slot_holders(@schema@._batch_lock_key(w.uuid_parent), current_user) < w.max_parallel);
COMMENT ON FUNCTION @schema@._role_slots_free() IS
    'Whether a batch of the caller''s role with queued children has a batch slot no runner holds.';

CREATE FUNCTION @schema@._replan(p_planned bigint)
RETURNS bigint
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_size bigint := pg_relation_size('@schema@.log_background');
BEGIN
    -- A runner's cached plans were made for the children's table as it was then (p_planned: its size in
    -- bytes): a seq scan chosen on a queue of 400 children would run once per child on one of 100,000 (a
    -- lingering runner took W2 at 600 children/s instead of 20,000). Planned afresh once the table has
    -- doubled, not at every batch: re-planning cost each of W1's eight lingering runners a few ms of CPU
    -- at its start, two cores for all eight, and the last one started 20 ms after the first.
    IF v_size > 2 * greatest(p_planned, 8192) THEN
        DISCARD PLANS;
        RETURN v_size;
    END IF;
    RETURN p_planned;
END
$fn$;
COMMENT ON FUNCTION @schema@._replan(bigint) IS
    'Discards this session''s cached plans if the children''s table has more than doubled since they were '
    'made (p_planned: its size then, in bytes); returns the size they are made for from now on.';

CREATE PROCEDURE @schema@._linger(p_until timestamptz, INOUT p_woken boolean)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_since timestamptz := clock_timestamp();
    -- Work the role had queued as this runner began to wait is work it found no slot for.
    v_full boolean := @schema@._role_has_queued();
BEGIN
    -- The role's next batch often follows soon (a script's next launch, a DAG's next task): a runner still
    -- here takes it within 20 ms, where a new one waits for the server to start it and compiles the
    -- engine's routines first; one launched right after the last batch ended (a script's loop) within
    -- 2 ms. It holds no slot meanwhile; the probe reads the small index of queued children. Only where the
    -- role had work queued already does it count the slots' holders too (pg_locks, 0.15-0.5 ms a look):
    -- a runner that woke for a batch whose slots are all taken would find none, and leave without the
    -- order against a launch that _runner() keeps, which may have counted on it. A batch queued since
    -- has its slots free, or the launch that started runners for it counted this one out; counted at
    -- each wake of each of W1's eight runners, two cores for all, the last started 3 ms later.
    p_woken := false;
    WHILE NOT p_woken AND clock_timestamp() < p_until LOOP
        COMMIT;
        PERFORM pg_sleep(CASE WHEN clock_timestamp() - v_since < interval '200 ms' THEN 0.002 ELSE 0.02 END);
        p_woken := @schema@._role_has_queued() AND (NOT v_full OR @schema@._role_slots_free());
    END LOOP;
END
$fn$;
COMMENT ON PROCEDURE @schema@._linger(timestamptz, boolean) IS
    'A runner with nothing left stays until p_until for its role''s next batch (looking every 2 ms for the '
    'first 200 ms, then every 20 ms); p_woken when one came (with a batch slot free, where the role had '
    'work queued already as it began to wait).';

CREATE PROCEDURE @schema@._work_role(INOUT p_ran boolean DEFAULT false, INOUT p_left boolean DEFAULT false)
LANGUAGE plpgsql
AS $fn$
DECLARE
    b record;
BEGIN
    p_ran := false;
    p_left := false;
    FOR b IN SELECT bt.uuid_parent, bt.enqueue_xid FROM @schema@.batch bt
              WHERE bt.role_name = current_user AND bt.stop_requested_at IS NULL
                AND EXISTS (SELECT 1 FROM @schema@.log_background x
                             WHERE x.uuid_parent = bt.uuid_parent AND x.status = 'queued')
              ORDER BY bt.created_at LIMIT 20
    LOOP
        -- It adopts other batches of the role from there, until none needs a runner.
        CALL @schema@._work(b.uuid_parent, b.enqueue_xid, p_ran, p_left);
        EXIT WHEN p_ran;
    END LOOP;
END
$fn$;
COMMENT ON PROCEDURE @schema@._work_role(boolean, boolean) IS
    'Runs the batches of the caller''s role that have queued children (_work()); p_ran: it got slots for one; '
    'p_left: it was cancelled or terminated from outside, and must go.';

CREATE PROCEDURE @schema@._work(p_parent uuid, p_starter xid8, INOUT p_ran boolean DEFAULT false,
                                INOUT p_left boolean DEFAULT false)
LANGUAGE plpgsql
AS $fn$
DECLARE
    r record := @schema@._start(p_parent, p_starter);
    v_batch @schema@.batch := r.batch;
    v_settings @schema@.settings := (SELECT s FROM @schema@.settings s);
    c record;
    v_after int := 0;
    v_outcome @schema@.child_outcome;
    v_settled @schema@.child_status;
    v_leave boolean := false;
    v_fail_fast uuid;
    v_adopted record;
    v_t0 timestamptz;
    v_ended timestamptz;
    v_quiet boolean := false;
    v_next boolean := false;
BEGIN
    p_ran := false;
    p_left := false;
    IF r.global_slot IS NULL THEN
        RETURN;  -- its starter rolled back, or the caps are reached
    END IF;
    p_ran := true;
    COMMIT;
    LOOP
        -- One transaction per child (or burst of inline children): the outcome of the one before (and an
        -- inline one's work), its count, and the claim of the next. Unless a child's work is in it (or it
        -- may end the batch, below), it need not wait for a WAL flush: lost in a crash, it leaves children
        -- that never ran (or did nothing) queued, to run again. The RESET ALL after each child undid any
        -- earlier SET LOCAL of it.
        IF NOT v_next THEN
            IF v_settled IS NULL OR v_quiet THEN
                PERFORM set_config('synchronous_commit', 'off', true);
            END IF;
            v_quiet := false;
            SELECT * INTO c FROM @schema@._claim_next(v_batch.uuid_parent, r.global_slot, r.backend_start, v_settled,
                                                      v_fail_fast IS NULL AND NOT v_leave, v_after);
            v_settled := NULL;
        END IF;
        v_next := false;
        IF v_fail_fast IS NOT NULL THEN
            RESET synchronous_commit;  -- the failure may be the batch's last child: its end (see below)
            COMMIT;  -- the failure is recorded: now take the rest of the batch down
            PERFORM @schema@._stop(v_batch.uuid_parent, format('stopped: fail_fast after child %s failed', v_fail_fast),
                                   false, NULL);
            COMMIT;
            v_fail_fast := NULL;
        ELSIF v_leave THEN
            -- pg_background turns a terminate into a cancel: a server shutting down waits for this process.
            COMMIT;
            p_left := true;
            EXIT;
        ELSIF c.id IS NULL AND @schema@._retry_due(v_batch.uuid_parent) IS NOT NULL THEN
            COMMIT;  -- children waiting for an automatic retry keep this runner on the batch
            PERFORM pg_sleep(least(greatest(extract(epoch FROM @schema@._retry_due(v_batch.uuid_parent) - clock_timestamp()),
                                            0.001), 0.2));
        ELSIF c.id IS NULL THEN
            -- This commit may end the batch, and a waiter that sees the end ends its task: it waits for
            -- its WAL flush (and so for every commit before it) even where no child wrote, or a crash
            -- could put children of a batch that Airflow took for ended back in the queue. Once a
            -- runner per batch: W2's two runners and W1's eight add a flush each.
            RESET synchronous_commit;
            COMMIT;  -- whoever commits the last outcome of a batch sees every other one: it tells the waiters
            PERFORM @schema@._notify_if_ended(ARRAY[v_batch.uuid_parent]);
            COMMIT;
            v_adopted := @schema@._adopt(v_batch, r.batch_slot);
            COMMIT;
            EXIT WHEN v_adopted.next IS NULL;
            DISCARD PLANS;  -- see _replan(): rare enough not to bother
            v_batch := v_adopted.next;
            r.batch_slot := v_adopted.p_slot;
            v_after := 0;
        ELSE
            v_after := c.seq;
            COMMIT;
            v_t0 := clock_timestamp();
            CALL @schema@._run(c.query, c.uuid_child, c.run_mode, v_batch, v_settings, v_outcome);
            v_ended := clock_timestamp();
            IF (v_outcome).result IS NOT NULL AND (c.run_mode <> 'inline' OR v_ended - v_t0 >= interval '1 ms') THEN
                -- Done, and too long to start a burst: recorded with the claim of the next, in one statement.
                SELECT * INTO c FROM @schema@._claim_next(v_batch.uuid_parent, r.global_slot, r.backend_start, NULL,
                                                          true, v_after, c.id, c.attempt, v_outcome, v_ended);
                IF NOT c.settled THEN
                    ROLLBACK;  -- housekeeping took this runner for dead and queued the child again: its work goes
                ELSE
                    v_next := true;
                END IF;
                CONTINUE;
            END IF;
            SELECT s.status, s.leave INTO v_settled, v_leave FROM @schema@._settle(c.id, c.attempt, v_outcome) s;
            IF v_settled IS NULL THEN
                ROLLBACK;  -- housekeeping took this runner for dead and queued the child again: its work goes
            ELSIF v_settled = 'failed' AND v_batch.fail_fast THEN
                v_fail_fast := c.uuid_child;  -- only a final failure; a retry is not one
            ELSIF c.run_mode = 'inline' AND NOT v_leave AND clock_timestamp() - v_t0 < interval '1 ms' THEN
                -- Short: the next ones in a burst, in this transaction.
                SELECT b.after, b.cut, b.failed INTO v_after, v_leave, v_fail_fast
                  FROM @schema@._burst(v_batch, r.global_slot, r.backend_start, v_after, v_settings, c.query) b;
            END IF;
            -- A lone child's _leave_batch_session() has decided already; a burst's RESET ALL undid that.
            IF v_settled IS NOT NULL AND c.run_mode = 'inline' AND current_setting('synchronous_commit') <> 'off' THEN
                v_quiet := NOT @schema@._children_wrote();
            END IF;
        END IF;
    END LOOP;
    -- Leave the name first, so that nobody counts this process once its slots are free.
    PERFORM set_config('application_name', 'pgbg:exiting', false);
    PERFORM pg_advisory_unlock_all();
END
$fn$;
COMMENT ON PROCEDURE @schema@._work(uuid, xid8, boolean, boolean) IS
    'The runner''s loop: holds one global and one batch slot and runs queued children until none is left '
    '(waiting for children due for a retry, adopting other batches of the role), recording each outcome in '
    'the transaction of its work together with the claim of the next child. p_starter: the transaction '
    'that started the runner, awaited first. p_ran: it got its slots. p_left: a cancel or terminate from '
    'outside the engine cut its child short: the runner goes (its child is queued again).';
