-- Runners: one loop for both launchers.

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
               not_before = NULL, stop_requested = false, requeue_on_stop = false
         WHERE p_claim
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

CREATE PROCEDURE @schema@._work(p_parent uuid, p_enqueue_xid xid8, INOUT p_ran boolean DEFAULT false)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_parent uuid := p_parent;
    v_batch @schema@.batch;
    v_settings @schema@.settings;
    v_xact text;
    v_nap float8 := 0.002;
    v_global_slot int;
    v_batch_slot int;
    v_slot int;
    v_backend_start timestamptz;
    v_id bigint;
    v_child uuid;
    v_cron boolean := @schema@._launcher() = 'pg_cron';
    v_pid int;
    v_cookie bigint;
    v_finished boolean;
    v_job bigint;
    v_run @schema@.cron_run;
    v_defused boolean;
    v_cancelled boolean;
    v_timed_out boolean;
    v_gone_since timestamptz;
    v_leave boolean := false;
    v_settled @schema@.child_status;
    v_fail_fast boolean := false;
    v_failed_child uuid;
    v_seq int;
    v_after int := 0;
    v_sql text;
    v_command text;
    v_mode text;
    v_result jsonb;
    v_state text;
    v_msg text;
    v_detail text;
    v_hint text;
    v_context text;
    v_next uuid;
    v_due timestamptz;
BEGIN
    PERFORM set_config('application_name', 'pgbg:' || v_parent, false);
    -- The batch becomes visible when the transaction that queued it commits; if it rolls back,
    -- there is nothing to run.
    LOOP
        v_xact := pg_xact_status(p_enqueue_xid);
        EXIT WHEN v_xact IS DISTINCT FROM 'in progress';
        PERFORM pg_sleep(v_nap);
        v_nap := least(v_nap * 2, 0.1);
    END LOOP;
    SELECT * INTO v_settings FROM @schema@.settings;
    SELECT * INTO v_batch FROM @schema@.batch WHERE uuid_parent = v_parent AND role_name = current_user;
    IF v_xact = 'aborted' OR NOT FOUND THEN
        RETURN;
    END IF;
    v_global_slot := @schema@._take_slot(@schema@._global_lock_key(), @schema@._global_cap());
    IF v_global_slot IS NULL THEN
        RETURN;
    END IF;
    v_batch_slot := @schema@._take_slot(@schema@._batch_lock_key(v_parent), v_batch.max_parallel);
    IF v_batch_slot IS NULL THEN
        PERFORM pg_advisory_unlock_all();
        RETURN;
    END IF;
    p_ran := true;
    SELECT backend_start INTO v_backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid();
    PERFORM set_config('search_path', v_batch.search_path, false);
    COMMIT;

    LOOP
        -- One transaction per child: the outcome of the previous one (its work too, for an inline
        -- child) and the claim of the next. Publishing a claim alone need not wait for a WAL flush:
        -- a claim lost in a crash leaves a child that never ran queued rather than lost.
        IF v_settled IS NULL THEN
            PERFORM set_config('synchronous_commit', 'off', true);
        END IF;
        SELECT c.id, c.uuid_child, c.query, c.run_mode, c.seq INTO v_id, v_child, v_sql, v_mode, v_seq
          FROM @schema@._claim(v_parent, v_global_slot, v_backend_start, v_settled, NOT (v_fail_fast OR v_leave),
                               v_after) c;
        v_settled := NULL;
        IF v_id IS NULL AND v_after > 0 AND NOT (v_fail_fast OR v_leave) THEN
            -- Children queued again behind us (retries, a takeover) come after the rest.
            v_after := 0;
            SELECT c.id, c.uuid_child, c.query, c.run_mode, c.seq INTO v_id, v_child, v_sql, v_mode, v_seq
              FROM @schema@._claim(v_parent, v_global_slot, v_backend_start, NULL, true, 0) c;
        END IF;
        v_after := coalesce(v_seq, v_after);
        IF v_fail_fast THEN
            -- The failure is recorded; now take the rest of the batch down.
            COMMIT;
            PERFORM @schema@._stop(v_parent, format('stopped: fail_fast after child %s failed', v_failed_child), false, NULL);
            COMMIT;
            v_fail_fast := false;
            CONTINUE;
        END IF;
        EXIT WHEN v_leave;

        IF v_id IS NULL THEN
            -- Children waiting for an automatic retry keep this runner on the batch.
            SELECT min(x.not_before) INTO v_due FROM @schema@.log_background x
             WHERE x.uuid_parent = v_parent AND x.status = 'queued' AND x.not_before > clock_timestamp();
            IF v_due IS NOT NULL THEN
                COMMIT;
                PERFORM pg_sleep(least(greatest(extract(epoch FROM v_due - clock_timestamp()), 0.001), 0.2));
                CONTINUE;
            END IF;
            COMMIT;
            -- Whoever commits the last outcome of a batch sees every other one: it tells the waiters.
            PERFORM @schema@._notify_if_ended(ARRAY[v_parent]);
            COMMIT;
            -- This batch has nothing left to start. Keep the global slot busy with another batch
            -- of the same role that is short of runners, instead of leaving it to the next poll.
            v_next := NULL;
            FOR v_batch IN
                SELECT b.* FROM @schema@.batch b
                 WHERE b.role_name = current_user AND b.stop_requested_at IS NULL
                   AND b.uuid_parent <> v_parent
                   AND EXISTS (SELECT 1 FROM @schema@.log_background x
                                WHERE x.uuid_parent = b.uuid_parent AND x.status = 'queued')
                 ORDER BY b.created_at
                 LIMIT 20
            LOOP
                v_slot := @schema@._take_slot(@schema@._batch_lock_key(v_batch.uuid_parent), v_batch.max_parallel);
                IF v_slot IS NOT NULL THEN
                    PERFORM pg_advisory_unlock(@schema@._batch_lock_key(v_parent), v_batch_slot);
                    v_batch_slot := v_slot;
                    v_next := v_batch.uuid_parent;
                    EXIT;
                END IF;
            END LOOP;
            EXIT WHEN v_next IS NULL;
            v_parent := v_next;
            v_after := 0;
            PERFORM set_config('application_name', 'pgbg:' || v_parent, false);
            PERFORM set_config('search_path', v_batch.search_path, false);
            COMMIT;
            CONTINUE;
        END IF;
        COMMIT;

        v_pid := NULL;
        v_job := NULL;
        v_run := NULL;
        IF v_mode = 'worker' AND NOT v_cron THEN
            -- Launch, then wait in short statements with a COMMIT between them: CREATE INDEX
            -- CONCURRENTLY in the nested worker waits for every older snapshot, this runner's too.
            BEGIN
                SELECT h.pid, h.cookie INTO v_pid, v_cookie
                  FROM @schema@._start_top_level(v_sql, v_child, v_batch.statement_timeout) h;
            EXCEPTION WHEN query_canceled THEN
                NULL;  -- stopped before it started; recorded below
            END;
            COMMIT;
            v_finished := v_pid IS NULL;
            WHILE NOT v_finished LOOP
                BEGIN
                    v_finished := @pgbg_ext@.pg_background_wait_v2(v_pid, v_cookie, 250);
                EXCEPTION WHEN query_canceled THEN
                    PERFORM @pgbg_ext@.pg_background_cancel_v2(v_pid, v_cookie, 0);
                END;
                COMMIT;
            END LOOP;
        ELSIF v_mode = 'worker' THEN
            -- pg_cron: the statement is the command of a job of its own, which runs it at top level
            -- at the next second. Unscheduling a job ends its run, so the job stays until the run has
            -- ended; once the run has begun (pg_cron has copied the command by then) the command
            -- becomes a no-op for any rerun the schedule starts meanwhile. This runner enforces the
            -- statement timeout and passes a stop on to the run.
            v_defused := false;
            v_cancelled := false;
            v_timed_out := false;
            v_gone_since := NULL;
            v_command := @schema@._cron_job_command(v_sql, v_batch.search_path);
            BEGIN
                IF v_command IS NOT NULL THEN
                    v_job := @schema@._cron_child_start(v_command, v_child);
                END IF;
            EXCEPTION WHEN query_canceled THEN
                NULL;  -- stopped before it was scheduled; recorded below
            END;
            COMMIT;
            WHILE v_job IS NOT NULL LOOP
                BEGIN
                    v_run := @schema@._cron_run(v_job);
                    IF v_run.status IS NOT NULL AND NOT v_defused AND NOT v_cancelled THEN
                        -- Same name, same job (cron.alter_job is for administrators).
                        PERFORM cron.schedule('pgbg_child:' || v_child, '1 seconds', 'SELECT ''pgbg: this child has run''');
                        v_defused := true;
                    END IF;
                    EXIT WHEN v_run.status IN ('succeeded', 'failed');
                    -- Stopped before its run began: give pg_cron a moment to start one it had picked.
                    EXIT WHEN v_cancelled AND v_run.status IS NULL AND clock_timestamp() > v_gone_since + interval '1.5 s';
                    -- The job's own clock: pg_cron's start_time is when it began to start the job,
                    -- and it learns of the end a moment late; the backend knows when it began.
                    IF v_batch.statement_timeout IS NOT NULL AND NOT v_timed_out AND v_run.job_pid IS NOT NULL
                       AND EXISTS (SELECT 1 FROM pg_stat_activity a
                                    WHERE a.pid = v_run.job_pid AND a.state = 'active'
                                      AND clock_timestamp() > a.query_start + v_batch.statement_timeout) THEN
                        PERFORM pg_cancel_backend(v_run.job_pid);
                        v_timed_out := true;
                    END IF;
                    PERFORM pg_sleep(0.01);
                EXCEPTION WHEN query_canceled THEN
                    -- A stop reached this runner: take the child's run down with it (unscheduled, a
                    -- job's run is ended by pg_cron).
                    v_cancelled := true;
                    v_gone_since := coalesce(v_gone_since, clock_timestamp());
                    PERFORM cron.unschedule(j.jobid) FROM cron.job j WHERE j.jobid = v_job;
                    IF v_run.job_pid IS NOT NULL THEN
                        PERFORM pg_cancel_backend(v_run.job_pid);
                    END IF;
                END;
                COMMIT;
            END LOOP;
            PERFORM cron.unschedule(j.jobid) FROM cron.job j WHERE j.jobid = v_job;
        END IF;

        BEGIN
            IF v_mode = 'inline' THEN
                v_result := @schema@._execute_inline(v_sql, v_settings.preview_rows, v_settings.preview_bytes);
                -- A child that wrote nothing has nothing to make durable but its log row, which a crash
                -- would turn into 'lost': its commit need not wait for a WAL flush either.
                IF pg_current_xact_id_if_assigned() IS NULL THEN
                    PERFORM set_config('synchronous_commit', 'off', true);
                END IF;
            ELSIF v_cron AND v_command IS NULL THEN
                PERFORM @schema@._cron_refuse_search_path(v_sql, v_batch.search_path);
            ELSIF v_cron THEN
                v_result := @schema@._cron_child_result(v_job, v_run, v_cancelled, v_timed_out);
            ELSIF v_pid IS NULL THEN
                RAISE EXCEPTION 'canceling statement due to user request' USING ERRCODE = 'query_canceled';
            ELSE
                v_result := @schema@._top_level_result(v_pid, v_cookie);
            END IF;
            UPDATE @schema@.log_background
               SET status = 'done', result = v_result, end_time_exec = clock_timestamp(), sqlstate = NULL,
                   error = NULL, error_detail = NULL, error_hint = NULL, error_context = NULL
             WHERE id = v_id;
            v_settled := 'done';
        EXCEPTION
            WHEN query_canceled OR admin_shutdown THEN
                -- pg_background_stop() sets stop_requested under a row lock before it signals, so
                -- the flag tells a stop from a statement_timeout and from pg_cancel_backend() or
                -- pg_terminate_backend() sent by someone else (pg_background turns SIGTERM into a
                -- cancel): such a worker is treated as gone, its child lost, and the runner leaves.
                GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
                UPDATE @schema@.log_background c
                   SET status = CASE WHEN c.stop_requested AND c.requeue_on_stop THEN 'queued'
                                     WHEN c.stop_requested THEN 'stopped'
                                     WHEN v_msg LIKE '%statement timeout%' THEN 'failed'
                                     WHEN v_batch.retry_lost AND c.failures < v_batch.retries THEN 'queued'
                                     ELSE 'lost' END::@schema@.child_status,
                       sqlstate = v_state,
                       error = CASE WHEN c.stop_requested AND c.requeue_on_stop
                                    THEN 'cut short and queued again: ' || coalesce(c.stopped_by, 'takeover')
                                    WHEN c.stop_requested THEN 'stopped by pg_background_stop()'
                                    WHEN v_msg LIKE '%statement timeout%' THEN v_msg
                                    ELSE 'worker process was cancelled or terminated from outside: ' || v_msg END,
                       end_time_exec = clock_timestamp(),
                       failures = c.failures + (NOT c.stop_requested AND v_msg NOT LIKE '%statement timeout%')::int,
                       not_before = CASE WHEN NOT c.stop_requested AND v_msg NOT LIKE '%statement timeout%'
                                              AND v_batch.retry_lost AND c.failures < v_batch.retries
                                         THEN @schema@._retry_at(v_batch.retry_delay, v_batch.retry_backoff, c.failures) END,
                       errors = CASE WHEN c.stop_requested THEN c.errors
                                     ELSE coalesce(c.errors, '[]') || @schema@._attempt_error(
                                         c.attempt, CASE WHEN v_msg LIKE '%statement timeout%' THEN 'failed' ELSE 'lost' END,
                                         v_state, v_msg) END
                 WHERE id = v_id
                RETURNING status, NOT stop_requested AND v_msg NOT LIKE '%statement timeout%'
                     INTO v_settled, v_leave;
            WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT,
                                        v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                                        v_context = PG_EXCEPTION_CONTEXT;
                UPDATE @schema@.log_background c
                   SET status = CASE WHEN @schema@._is_transient(v_state) AND c.failures < v_batch.retries
                                     THEN 'queued' ELSE 'failed' END::@schema@.child_status,
                       not_before = CASE WHEN @schema@._is_transient(v_state) AND c.failures < v_batch.retries
                                         THEN @schema@._retry_at(v_batch.retry_delay, v_batch.retry_backoff, c.failures) END,
                       failures = c.failures + @schema@._is_transient(v_state)::int,
                       sqlstate = v_state, error = v_msg,
                       error_detail = nullif(v_detail, ''), error_hint = nullif(v_hint, ''),
                       error_context = nullif(v_context, ''), end_time_exec = clock_timestamp(),
                       errors = coalesce(c.errors, '[]') || @schema@._attempt_error(c.attempt, 'failed', v_state, v_msg)
                 WHERE id = v_id
                RETURNING status INTO v_settled;
                -- Only a final failure stops a fail_fast batch; a retry is not one.
                v_fail_fast := v_batch.fail_fast AND v_settled = 'failed';
                v_failed_child := v_child;
        END;
        v_id := NULL;
    END LOOP;
    -- Leave the name first so that nobody counts this process once its slots are free.
    PERFORM set_config('application_name', 'pgbg:exiting', false);
    PERFORM pg_advisory_unlock_all();
END
$fn$;
COMMENT ON PROCEDURE @schema@._work(uuid, xid8, boolean) IS
    'The runner''s loop: holds one global and one batch slot and executes queued children until none is '
    'left (waiting for children due for a retry, adopting other batches of the role), recording each '
    'outcome in the transaction of its work together with the claim of the next child. p_ran: it got '
    'its slots.';
