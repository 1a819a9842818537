-- The pg_background launcher: runners are pg_background workers, and a child that must run at top
-- level runs in a nested worker of its own.

CREATE FUNCTION @schema@._start_top_level(p_sql text, p_child uuid, p_timeout interval)
RETURNS TABLE (pid int, cookie bigint)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_app text := current_setting('application_name');
    v_timeout text := current_setting('statement_timeout');
BEGIN
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
    PERFORM set_config('statement_timeout', v_timeout, false);
    RETURN NEXT;
END
$fn$;
COMMENT ON FUNCTION @schema@._start_top_level(text, uuid, interval) IS
    'Starts one statement as the top-level statement of a nested pg_background worker, so VACUUM, '
    'CONCURRENTLY and procedures that COMMIT work; waits for a free worker slot rather than failing.';

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
    'Result document of a finished nested worker; re-raises its error with SQLSTATE, detail and hint.';

CREATE PROCEDURE @schema@._runner(p_parent uuid, p_enqueue_xid xid8)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_ran boolean;
BEGIN
    CALL @schema@._work(p_parent, p_enqueue_xid, v_ran);
END
$fn$;
COMMENT ON PROCEDURE @schema@._runner(uuid, xid8) IS
    'Body of a pg_background runner worker (see _work()). Started by _launch_runners().';

CREATE FUNCTION @schema@._launch_runners(p_parent uuid, p_enqueue_xid xid8, p_count int)
RETURNS int
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_pid int;
    v_cookie bigint;
    v_started int := 0;
BEGIN
    FOR k IN 1..coalesce(p_count, 0) LOOP
        BEGIN
            SELECT h.pid, h.cookie INTO v_pid, v_cookie FROM @pgbg_ext@.pg_background_submit_v2(
                format('CALL @schema@._runner(%L::uuid, %L::xid8)', p_parent, p_enqueue_xid)) h;
            -- Detached handles do not count against pg_background.max_workers of this session.
            PERFORM @pgbg_ext@.pg_background_detach_v2(v_pid, v_cookie);
            v_started := v_started + 1;
        EXCEPTION WHEN insufficient_resources OR configuration_limit_exceeded THEN
            -- No worker slot in the server right now: the children stay queued for a later call.
            EXIT;
        END;
    END LOOP;
    RETURN v_started;
END
$fn$;
COMMENT ON FUNCTION @schema@._launch_runners(uuid, xid8, int) IS
    'Starts up to p_count runners for a batch; stops quietly when the server has no worker slot free.';
