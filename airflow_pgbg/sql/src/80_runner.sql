-- Runners: one loop for both launchers. A runner holds a global slot and a slot of its batch and
-- repeats: claim the next child (in the transaction that counts the one before), commit, run it
-- (inline here, in a nested worker, or in a pg_cron job), settle its outcome. _verdict() alone decides
-- how a child ended; _settle() records it.

CREATE FUNCTION @schema@._claim(p_parent uuid, p_shard int, p_backend_start timestamptz,
                               p_settled @schema@.child_status, p_claim boolean, p_after int)
RETURNS TABLE (id bigint, uuid_child uuid, query text, run_mode text, seq int)
LANGUAGE plpgsql
AS $fn$
#variable_conflict use_column
BEGIN
    -- PL/pgSQL, not SQL: its plan is cached for the runner's session, and this runs once per child.
    RETURN QUERY
    WITH c AS (
        UPDATE @schema@.log_background c
           SET status = 'running', pid = pg_backend_pid(), backend_start = p_backend_start,
               start_time_exec = clock_timestamp(), end_time_exec = NULL, attempt = c.attempt + 1,
               not_before = NULL, stop_requested = false, requeue_on_stop = false, result = NULL,
               sqlstate = NULL
         WHERE p_claim AND c.status = 'queued'
           AND c.id = (SELECT x.id FROM @schema@.log_background x
                        WHERE x.uuid_parent = p_parent AND x.status = 'queued' AND x.role_name = current_user
                          AND (x.not_before IS NULL OR x.not_before <= clock_timestamp())
                          AND x.seq > p_after
                        ORDER BY x.seq
                        LIMIT 1
                        FOR UPDATE SKIP LOCKED)
        RETURNING c.id, c.uuid_child, c.query, c.run_mode, c.seq),
    n AS (SELECT count(*) AS claimed FROM c),
    counted AS (
        INSERT INTO @schema@.batch_progress AS p (uuid_parent, shard, role_name, queued, running, done, failed,
                                                  stopped, lost, first_start, last_end)
        SELECT p_parent, p_shard, current_user,
               coalesce((p_settled = 'queued')::int, 0) - n.claimed,
               n.claimed - (p_settled IS NOT NULL)::int,
               coalesce((p_settled = 'done')::int, 0), coalesce((p_settled = 'failed')::int, 0),
               coalesce((p_settled = 'stopped')::int, 0), coalesce((p_settled = 'lost')::int, 0),
               CASE WHEN n.claimed > 0 THEN clock_timestamp() END,
               CASE WHEN p_settled IS NOT NULL THEN clock_timestamp() END
          FROM n
         WHERE n.claimed > 0 OR p_settled IS NOT NULL
        ON CONFLICT (uuid_parent, shard) DO UPDATE
           SET queued = p.queued + excluded.queued, running = p.running + excluded.running,
               done = p.done + excluded.done, failed = p.failed + excluded.failed,
               stopped = p.stopped + excluded.stopped, lost = p.lost + excluded.lost,
               first_start = least(p.first_start, excluded.first_start),
               last_end = greatest(p.last_end, excluded.last_end))
    SELECT c.id, c.uuid_child, c.query, c.run_mode, c.seq FROM c;
END
$fn$;
COMMENT ON FUNCTION @schema@._claim(uuid, int, timestamptz, @schema@.child_status, boolean, int) IS
    'One statement per child for a runner: counts the outcome of the child it just settled (p_settled) '
    'and, with p_claim, claims the next queued child that is due, in seq order after p_after. Starting '
    'after the runner''s previous claim skips the index entries of children already claimed, which stay '
    'until no snapshot can see them (a long poll holds one back).';

CREATE FUNCTION @schema@._claim_next(p_parent uuid, p_shard int, p_backend_start timestamptz,
                                    p_settled @schema@.child_status, p_claim boolean, p_after int)
RETURNS TABLE (id bigint, uuid_child uuid, query text, run_mode text, seq int)
LANGUAGE plpgsql
AS $fn$
BEGIN
    RETURN QUERY SELECT * FROM @schema@._claim(p_parent, p_shard, p_backend_start, p_settled, p_claim, p_after);
    IF NOT FOUND AND p_claim AND p_after > 0 THEN
        -- Children queued again behind this runner (retries, a takeover) come after the rest.
        RETURN QUERY SELECT * FROM @schema@._claim(p_parent, p_shard, p_backend_start, NULL, true, 0);
    END IF;
END
$fn$;
COMMENT ON FUNCTION @schema@._claim_next(uuid, int, timestamptz, @schema@.child_status, boolean, int) IS
    '_claim() after the runner''s previous child, then from the start of the queue.';

CREATE FUNCTION @schema@._verdict(p_outcome @schema@.child_outcome, p_gone boolean, p_child @schema@.log_background,
                                  p_batch @schema@.batch)
RETURNS text
LANGUAGE sql STABLE
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

CREATE FUNCTION @schema@._settle(p_id bigint, p_outcome @schema@.child_outcome, p_gone boolean DEFAULT false)
RETURNS TABLE (status @schema@.child_status, leave boolean)
LANGUAGE plpgsql
AS $fn$
#variable_conflict use_column
DECLARE
    c @schema@.log_background;
    b @schema@.batch;
    v text;
    v_failed boolean;
BEGIN
    -- The child's row first: a stop holds it while it marks it and signals the runner, and a stop of
    -- the whole batch marks the batch's row first; both are seen as they committed.
    SELECT * INTO c FROM @schema@.log_background x WHERE x.id = p_id FOR UPDATE;
    SELECT * INTO b FROM @schema@.batch x WHERE x.uuid_parent = c.uuid_parent;
    v := @schema@._verdict(p_outcome, p_gone, c, b);
    v_failed := v IN ('timed out', 'retry', 'failed');
    UPDATE @schema@.log_background x
       SET status = CASE v WHEN 'done' THEN 'done' WHEN 'stopped' THEN 'stopped' WHEN 'timed out' THEN 'failed'
                           WHEN 'failed' THEN 'failed' WHEN 'lost' THEN 'lost' ELSE 'queued' END::@schema@.child_status,
           result = p_outcome.result,
           sqlstate = p_outcome.sqlstate,
           error = CASE v
               WHEN 'requeued' THEN 'cut short and queued again: ' || coalesce(c.stopped_by, 'takeover')
               WHEN 'stopped' THEN 'stopped by pg_background_stop()'
               WHEN 'interrupted' THEN 'its runner was interrupted; rolled back and queued again: ' || p_outcome.message
               WHEN 'lost' THEN CASE WHEN c.run_mode = 'inline'
                                     THEN 'its runner was interrupted 3 times while running it (each time rolled back)'
                                     WHEN p_gone THEN 'worker process ended without recording an outcome '
                                                      '(terminated, crashed or server restarted)'
                                     ELSE 'worker process was cancelled or terminated from outside: ' || p_outcome.message END
               ELSE p_outcome.message END,
           error_detail = nullif(p_outcome.detail, ''),
           error_hint = nullif(p_outcome.hint, ''),
           error_context = nullif(p_outcome.context, ''),
           end_time_exec = clock_timestamp(),
           failures = c.failures + (v IN ('retry', 'retry lost') OR v = 'lost' AND c.run_mode <> 'inline'
                                    OR v = 'failed' AND @schema@._is_transient(p_outcome.sqlstate))::int,
           interruptions = c.interruptions + (v IN ('interrupted', 'lost') AND c.run_mode = 'inline')::int,
           not_before = CASE WHEN v IN ('retry', 'retry lost')
                             THEN @schema@._retry_at(b.retry_delay, b.retry_backoff, c.failures) END,
           errors = CASE WHEN v IN ('done', 'requeued', 'stopped') THEN c.errors
                         ELSE coalesce(c.errors, '[]') || @schema@._attempt_error(
                             c.attempt, CASE WHEN v_failed THEN 'failed' WHEN v = 'interrupted' THEN 'interrupted'
                                             ELSE 'lost' END,
                             p_outcome.sqlstate, coalesce(p_outcome.message, 'worker process ended without recording an outcome')) END
     WHERE x.id = p_id;
    -- A runner cancelled or terminated from outside leaves; others start where work remains.
    RETURN QUERY SELECT CASE v WHEN 'done' THEN 'done' WHEN 'stopped' THEN 'stopped' WHEN 'timed out' THEN 'failed'
                               WHEN 'failed' THEN 'failed' WHEN 'lost' THEN 'lost'
                               ELSE 'queued' END::@schema@.child_status,
                        v IN ('interrupted', 'retry lost', 'lost') AND NOT p_gone;
END
$fn$;
COMMENT ON FUNCTION @schema@._settle(bigint, @schema@.child_outcome, boolean) IS
    'Records how a running child ended (see _verdict()): its status, result or error, retries and '
    'interruptions used, and the attempt in errors. Returns the status, and whether its runner should '
    'leave. p_gone: its runner died; housekeeping settles it.';

CREATE FUNCTION @schema@._run_inline(p_sql text, p_settings @schema@.settings)
RETURNS @schema@.child_outcome
LANGUAGE plpgsql
AS $fn$
DECLARE
    o @schema@.child_outcome;
BEGIN
    o.result := @schema@._execute_inline(p_sql, p_settings.preview_rows, p_settings.preview_bytes);
    -- A child that wrote nothing has nothing to make durable but its log row, which a crash would
    -- only put back in the queue: its commit need not wait for a WAL flush.
    IF pg_current_xact_id_if_assigned() IS NULL THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    RETURN o;
EXCEPTION WHEN query_canceled OR OTHERS THEN
    GET STACKED DIAGNOSTICS o.sqlstate = RETURNED_SQLSTATE, o.message = MESSAGE_TEXT, o.detail = PG_EXCEPTION_DETAIL,
                            o.hint = PG_EXCEPTION_HINT, o.context = PG_EXCEPTION_CONTEXT;
    RETURN o;
END
$fn$;
COMMENT ON FUNCTION @schema@._run_inline(text, @schema@.settings) IS
    'Runs a child in the runner''s own transaction (its effects commit with its outcome, or roll back '
    'with its error) and returns how it ended.';

CREATE FUNCTION @schema@._await_starter(p_starter xid8)
RETURNS void
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_nap float8 := 0.002;
BEGIN
    -- Whoever starts a runner (a launch, a poll, a retry, housekeeping) may still be writing the work
    -- it started it for; what the runner looks for is visible once that transaction has ended.
    WHILE pg_xact_status(p_starter) = 'in progress' LOOP
        PERFORM pg_sleep(v_nap);
        v_nap := least(v_nap * 2, 0.1);
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
            PERFORM set_config('search_path', next.search_path, false);
            RETURN;
        END IF;
    END LOOP;
    next := NULL;
END
$fn$;
COMMENT ON FUNCTION @schema@._adopt(@schema@.batch, int) IS
    'Moves the runner to another batch of its role with queued children and a free slot (its batch '
    'slot swapped in p_slot); next is NULL when there is none.';

CREATE PROCEDURE @schema@._work(p_parent uuid, p_starter xid8, INOUT p_ran boolean DEFAULT false)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_batch @schema@.batch;
    v_settings @schema@.settings;
    v_slots record;
    v_backend_start timestamptz;
    c record;
    v_after int := 0;
    v_outcome @schema@.child_outcome;
    v_settled @schema@.child_status;
    v_leave boolean := false;
    v_fail_fast uuid;
    v_adopted record;
BEGIN
    PERFORM set_config('application_name', 'pgbg:' || p_parent, false);
    PERFORM @schema@._await_starter(p_starter);
    SELECT * INTO v_settings FROM @schema@.settings;
    SELECT * INTO v_batch FROM @schema@.batch WHERE uuid_parent = p_parent AND role_name = current_user;
    IF NOT FOUND THEN
        RETURN;  -- its starter rolled back
    END IF;
    v_slots := @schema@._take_slots(v_batch);
    IF v_slots.global_slot IS NULL THEN
        RETURN;  -- the caps are reached
    END IF;
    p_ran := true;
    SELECT backend_start INTO v_backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid();
    PERFORM set_config('search_path', v_batch.search_path, false);
    COMMIT;
    LOOP
        -- One transaction per child: the outcome of the one before (and an inline one's work), its count,
        -- and the claim of the next. A claim alone need not wait for a WAL flush: lost in a crash, it
        -- leaves a child that never ran queued.
        IF v_settled IS NULL THEN
            PERFORM set_config('synchronous_commit', 'off', true);
        END IF;
        SELECT * INTO c FROM @schema@._claim_next(v_batch.uuid_parent, v_slots.global_slot, v_backend_start,
                                                  v_settled, v_fail_fast IS NULL AND NOT v_leave, v_after);
        v_settled := NULL;
        IF v_fail_fast IS NOT NULL THEN
            COMMIT;  -- the failure is recorded: now take the rest of the batch down
            PERFORM @schema@._stop(v_batch.uuid_parent, format('stopped: fail_fast after child %s failed', v_fail_fast),
                                   false, NULL);
            COMMIT;
            v_fail_fast := NULL;
        ELSIF v_leave THEN
            COMMIT;
            EXIT;
        ELSIF c.id IS NULL AND @schema@._retry_due(v_batch.uuid_parent) IS NOT NULL THEN
            COMMIT;  -- children waiting for an automatic retry keep this runner on the batch
            PERFORM pg_sleep(least(greatest(extract(epoch FROM @schema@._retry_due(v_batch.uuid_parent) - clock_timestamp()),
                                            0.001), 0.2));
        ELSIF c.id IS NULL THEN
            COMMIT;  -- whoever commits the last outcome of a batch sees every other one: it tells the waiters
            PERFORM @schema@._notify_if_ended(ARRAY[v_batch.uuid_parent]);
            COMMIT;
            v_adopted := @schema@._adopt(v_batch, v_slots.batch_slot);
            COMMIT;
            EXIT WHEN v_adopted.next IS NULL;
            v_batch := v_adopted.next;
            v_slots.batch_slot := v_adopted.p_slot;
            v_after := 0;
        ELSE
            v_after := c.seq;
            COMMIT;
            IF c.run_mode = 'inline' THEN
                v_outcome := @schema@._run_inline(c.query, v_settings);
            ELSIF v_settings.launcher = 'pg_cron' THEN
                CALL @schema@._run_in_cron_job(c.query, c.uuid_child, v_batch.search_path, v_batch.statement_timeout,
                                               v_outcome);
            ELSE
                CALL @schema@._run_in_worker(c.query, c.uuid_child, v_batch.statement_timeout, v_outcome);
            END IF;
            SELECT s.status, s.leave INTO v_settled, v_leave FROM @schema@._settle(c.id, v_outcome) s;
            IF v_settled = 'failed' AND v_batch.fail_fast THEN
                v_fail_fast := c.uuid_child;  -- only a final failure; a retry is not one
            END IF;
        END IF;
    END LOOP;
    -- Leave the name first, so that nobody counts this process once its slots are free.
    PERFORM set_config('application_name', 'pgbg:exiting', false);
    PERFORM pg_advisory_unlock_all();
END
$fn$;
COMMENT ON PROCEDURE @schema@._work(uuid, xid8, boolean) IS
    'The runner''s loop: holds one global and one batch slot and runs queued children until none is left '
    '(waiting for children due for a retry, adopting other batches of the role), recording each outcome in '
    'the transaction of its work together with the claim of the next child. p_starter: the transaction '
    'that started the runner, awaited first. p_ran: it got its slots.';
