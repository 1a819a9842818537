-- The pg_background launcher: runners are pg_background workers, and a child that must run at top
-- level runs in a nested worker of its own.

CREATE FUNCTION @schema@._start_top_level(p_sql text, p_child uuid, p_timeout interval, p_settings jsonb)
RETURNS TABLE (pid int, cookie bigint)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_app text := current_setting('application_name');
BEGIN
    -- The nested worker starts with this session's settings: the batch's, for the launch alone.
    PERFORM @schema@._enter_batch_session(p_settings);
    -- statement_timeout is armed per top-level statement, so it works in the nested worker only.
    PERFORM set_config('statement_timeout', coalesce((extract(epoch FROM p_timeout) * 1000)::bigint::text, '0'), false);
    -- The nested worker inherits this session's settings: the name lets pg_background_stop() find it.
    PERFORM set_config('application_name', 'pgbg-child:' || p_child, false);
    -- No free worker slot is not a failure of the statement: wait for one.
    LOOP
        BEGIN
            SELECT h.pid, h.cookie INTO pid, cookie FROM @pgbg_ext@.pg_background_launch_v2(p_sql) h;
            EXIT;
        EXCEPTION WHEN insufficient_resources OR configuration_limit_exceeded THEN
            PERFORM pg_sleep(0.1);
        END;
    END LOOP;
    PERFORM set_config('application_name', v_app, false);
    PERFORM @schema@._leave_batch_session();
    RETURN NEXT;
END
$fn$;
COMMENT ON FUNCTION @schema@._start_top_level(text, uuid, interval, jsonb) IS
    'Starts one statement as the top-level statement of a nested pg_background worker with the batch''s '
    'settings, so VACUUM, CONCURRENTLY and procedures that COMMIT work; waits for a free worker slot rather '
    'than failing.';

CREATE FUNCTION @schema@._top_level_result(p_pid int, p_cookie bigint)
RETURNS jsonb
LANGUAGE plpgsql
-- Some pg_background functions are SQL wrappers that resolve their helpers through search_path,
-- while runners use the submitter's. Nothing here runs user SQL.
SET search_path = @pgbg_ext@, pg_catalog
AS $fn$
DECLARE
    o @pgbg_ext@.pg_background_outcome := @pgbg_ext@.pg_background_outcome_v2(p_pid, p_cookie);
    e @pgbg_ext@.pg_background_error;
BEGIN
    IF o.has_error THEN
        e := @pgbg_ext@.pg_background_error_info_v2(p_pid, p_cookie);
    END IF;
    PERFORM @pgbg_ext@.pg_background_detach_v2(p_pid, p_cookie);
    IF o.has_error THEN
        RAISE EXCEPTION USING ERRCODE = coalesce(e.sqlstate, o.sqlstate, 'XX000'),
            MESSAGE = coalesce(e.message, o.error_message, 'statement failed in its worker'),
            DETAIL = coalesce(e.detail, ''), HINT = coalesce(e.hint, '');
    ELSIF coalesce(o.command_tag, '') = '' THEN
        -- Every statement that ran has a tag: a cancel that reached the worker before its statement began
        -- ends it with neither tag nor error.
        RAISE EXCEPTION USING ERRCODE = 'query_canceled',
            MESSAGE = 'canceling statement due to user request (before it began in its worker)';
    END IF;
    RETURN jsonb_build_object(
        'command', CASE WHEN o.command_tag IN ('SELECT', 'UPDATE', 'DELETE', 'MERGE', 'COPY')
                        THEN o.command_tag || ' ' || coalesce(o.row_count, 0)
                        WHEN o.command_tag = 'INSERT' THEN 'INSERT 0 ' || coalesce(o.row_count, 0)
                        ELSE o.command_tag END,
        'rows', coalesce(o.row_count, 0));
END
$fn$;
COMMENT ON FUNCTION @schema@._top_level_result(int, bigint) IS
    'Result document of a finished nested worker; re-raises its error with SQLSTATE, detail and hint, and a cancel that ended it before its statement began as one.';

CREATE PROCEDURE @schema@._run_in_worker(p_sql text, p_child uuid, p_timeout interval, p_settings jsonb,
                                         INOUT p_outcome @schema@.child_outcome)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_pid int;
    v_cookie bigint;
    v_finished boolean;
BEGIN
    p_outcome := NULL;
    BEGIN
        SELECT h.pid, h.cookie INTO v_pid, v_cookie FROM @schema@._start_top_level(p_sql, p_child, p_timeout, p_settings) h;
    EXCEPTION
        WHEN query_canceled THEN
            p_outcome.sqlstate := '57014';  -- cut short before it started
            p_outcome.message := 'canceling statement due to user request';
            RETURN;
        WHEN OTHERS THEN
            -- A setting the role may no longer set (it rolled back with the block).
            GET STACKED DIAGNOSTICS p_outcome.sqlstate = RETURNED_SQLSTATE, p_outcome.message = MESSAGE_TEXT;
            RETURN;
    END;
    -- Wait in short statements with a COMMIT between them: CREATE INDEX CONCURRENTLY in the nested
    -- worker waits for every older snapshot, this runner's too.
    COMMIT;
    LOOP
        BEGIN
            v_finished := @pgbg_ext@.pg_background_wait_v2(v_pid, v_cookie, 250);
        EXCEPTION WHEN query_canceled THEN
            -- A stop, or this runner cancelled from outside: the statement goes down with it.
            PERFORM @pgbg_ext@.pg_background_cancel_v2(v_pid, v_cookie, 0);
        END;
        COMMIT;
        EXIT WHEN v_finished;
    END LOOP;
    BEGIN
        p_outcome.result := @schema@._top_level_result(v_pid, v_cookie);
    EXCEPTION WHEN query_canceled OR OTHERS THEN
        GET STACKED DIAGNOSTICS p_outcome.sqlstate = RETURNED_SQLSTATE, p_outcome.message = MESSAGE_TEXT,
                                p_outcome.detail = PG_EXCEPTION_DETAIL, p_outcome.hint = PG_EXCEPTION_HINT;
    END;
END
$fn$;
COMMENT ON PROCEDURE @schema@._run_in_worker(text, uuid, interval, jsonb, @schema@.child_outcome) IS
    'Runs a child at top level in a nested pg_background worker (with the batch''s settings and statement timeout) and '
    'returns how it ended; a cancel of the runner cancels the statement.';

CREATE FUNCTION @schema@._launch_runner(p_parent uuid, p_starter xid8, p_spawn int)
RETURNS boolean
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_pid int;
    v_cookie bigint;
BEGIN
    SELECT h.pid, h.cookie INTO v_pid, v_cookie FROM @pgbg_ext@.pg_background_submit_v2(
        format('CALL @schema@._runner(%L::uuid, %L::xid8, %s)', p_parent, p_starter, p_spawn)) h;
    -- Detached handles do not count against pg_background.max_workers of this session.
    PERFORM @pgbg_ext@.pg_background_detach_v2(v_pid, v_cookie);
    RETURN true;
EXCEPTION WHEN insufficient_resources OR configuration_limit_exceeded THEN
    -- No worker slot in the server right now: the children stay queued for a later call.
    RETURN false;
END
$fn$;
COMMENT ON FUNCTION @schema@._launch_runner(uuid, xid8, int) IS
    'Starts one runner worker for a batch, which starts p_spawn more (see _runner()); false when the server '
    'has no worker slot free.';

CREATE FUNCTION @schema@._lingerers()
RETURNS int
LANGUAGE sql STABLE
RETURN (SELECT count(*)::int FROM pg_stat_activity a
         WHERE a.application_name = 'pgbg:lingering' AND a.usename = current_user
           AND a.backend_type = 'pg_background' AND a.datname = current_database());
COMMENT ON FUNCTION @schema@._lingerers() IS
    'pg_background runners of the caller''s role that wait for its next batch (see _runner()).';

CREATE PROCEDURE @schema@._runner(p_parent uuid, p_starter xid8, p_spawn int DEFAULT 0)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_ran boolean := false;
    v_left boolean := false;
    v_woken boolean;
    v_linger interval;
    v_planned bigint := pg_relation_size('@schema@.log_background');
BEGIN
    -- The postmaster starts workers one at a time, about 4 ms each here: a launch that started all of a
    -- batch's runners would keep its transaction open, and the batch waiting, for as many. It starts one,
    -- and each runner starts two of the rest before it begins, so eight run after three rounds. Until they
    -- have, its name says how many it stands for (see _runners_of()).
    IF p_spawn > 0 THEN
        PERFORM set_config('application_name', format('pgbg:%s+%s', p_parent, p_spawn), false);
        IF @schema@._launch_runner(p_parent, p_starter, (p_spawn - 1) / 2) AND p_spawn > 1 THEN
            PERFORM @schema@._launch_runner(p_parent, p_starter, p_spawn - 1 - (p_spawn - 1) / 2);
        END IF;
        COMMIT;
    END IF;
    CALL @schema@._work(p_parent, p_starter, v_ran, v_left);
    COMMIT;
    v_linger := (SELECT s.linger FROM @schema@.settings s);
    LOOP
        -- A runner that has run stays for its role's next batch (see _linger()); one that found no slot
        -- leaves at once, or more would linger than ever ran. Ordered against a launch of the role, which
        -- counts the lingering runners it need not start (see _start_runners()).
        EXIT WHEN NOT v_ran OR v_left OR v_linger <= interval '0';
        PERFORM set_config('application_name', 'pgbg:lingering', false);
        CALL @schema@._linger(clock_timestamp() + v_linger, v_woken);
        IF v_woken THEN
            v_planned := @schema@._replan(v_planned);
            CALL @schema@._work_role(v_ran, v_left);
            COMMIT;
            -- Woken for a batch whose slots others took first: it leaves as one that was not woken.
            CONTINUE WHEN v_ran OR v_left;
        END IF;
        PERFORM @schema@._lock_role(0, true);
        PERFORM set_config('application_name', 'pgbg:exiting', false);
        v_woken := @schema@._role_has_queued() AND @schema@._role_slots_free();
        COMMIT;
        EXIT WHEN NOT v_woken;
        v_planned := @schema@._replan(v_planned);
        CALL @schema@._work_role(v_ran, v_left);
        COMMIT;
    END LOOP;
    PERFORM set_config('application_name', 'pgbg:exiting', false);
END
$fn$;
COMMENT ON PROCEDURE @schema@._runner(uuid, xid8, int) IS
    'Body of a pg_background runner worker: starts p_spawn more runners for the batch (two, passing the rest '
    'on), runs the batch (see _work()), then stays for settings.linger to run the next batch of its role.';

CREATE FUNCTION @schema@._launch_runners(p_parent uuid, p_count int)
RETURNS int
LANGUAGE plpgsql
AS $fn$
BEGIN
    -- Runners wait for this transaction to end: it may be queuing what they are started for.
    IF coalesce(p_count, 0) > 0 AND @schema@._launch_runner(p_parent, pg_current_xact_id(), p_count - 1) THEN
        RETURN p_count;
    END IF;
    RETURN 0;
END
$fn$;
COMMENT ON FUNCTION @schema@._launch_runners(uuid, int) IS
    'Starts p_count runners for a batch (one, which starts the others), which begin once the calling '
    'transaction has ended; returns p_count, or 0 when the server has no worker slot free.';
