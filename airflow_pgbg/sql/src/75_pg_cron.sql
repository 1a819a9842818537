-- The pg_cron launcher (managed services): runners are pg_cron jobs of the submitting role, and a
-- child that must run at top level runs as the command of a job of its own.
--
-- Routines that name the cron schema are PL/pgSQL: a server using pg_background may not have that
-- schema, and PL/pgSQL bodies are not checked against it when they are created.

CREATE FUNCTION @schema@._cron_runner_job(p_n int DEFAULT NULL)
RETURNS text
LANGUAGE sql STABLE
RETURN 'pgbg_runner:' || current_database() || ':@schema@:' || coalesce(p_n::text, '');
COMMENT ON FUNCTION @schema@._cron_runner_job(int) IS
    'Name of runner job n of the caller (job names are per role); without n, the prefix of them all.';

CREATE FUNCTION @schema@._cron_ensure_runners(p_wanted int)
RETURNS int
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_have int;
    v_added int := 0;
BEGIN
    IF coalesce(p_wanted, 0) <= 0 THEN
        RETURN 0;
    END IF;
    SELECT count(*) INTO v_have FROM cron.job
     WHERE starts_with(jobname, @schema@._cron_runner_job()) AND schedule = '1 seconds';
    FOR n IN 1..p_wanted LOOP
        EXIT WHEN v_have + v_added >= p_wanted;
        IF NOT EXISTS (SELECT 1 FROM cron.job WHERE jobname = @schema@._cron_runner_job(n) AND schedule = '1 seconds') THEN
            -- Every second while it works; pg_cron never starts a job again while its run goes on,
            -- so each job is one slot. The same name reactivates a job its last run parked (see
            -- _cron_runner()): pg_cron starts a job it knows as soon as it rereads cron.job (within a
            -- second), a new one only a second after that.
            PERFORM cron.schedule(@schema@._cron_runner_job(n), '1 seconds', 'CALL @schema@._cron_runner()');
            v_added := v_added + 1;
        END IF;
    END LOOP;
    RETURN v_added;
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_ensure_runners(int) IS
    'Schedules runner jobs of the caller''s role until it has p_wanted of them; returns how many it added.';

CREATE FUNCTION @schema@._cron_child_start(p_sql text, p_child uuid)
RETURNS bigint
LANGUAGE plpgsql
AS $fn$
BEGIN
    RETURN cron.schedule('pgbg_child:' || p_child, '1 seconds', p_sql);
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_child_start(text, uuid) IS
    'Schedules the job that runs one child at top level; its runner unschedules it once its run has ended.';

CREATE FUNCTION @schema@._cron_job_command(p_sql text, p_search_path text)
RETURNS text
LANGUAGE sql STABLE
-- A pg_cron job starts a new session of the role, with the role's default search_path (the one
-- RESET restores here: runners are such sessions too). A statement that only needs a timeout is
-- preceded by the batch's search_path; one that must be a top-level statement of its own cannot
-- be, since a second statement in the command puts it in a transaction block.
RETURN CASE
    WHEN p_search_path = (SELECT s.reset_val FROM pg_catalog.pg_settings s WHERE s.name = 'search_path') THEN p_sql
    WHEN NOT @schema@._needs_own_worker(p_sql)
        THEN format('SELECT pg_catalog.set_config(''search_path'', %L, false); %s', p_search_path, p_sql)
END;
COMMENT ON FUNCTION @schema@._cron_job_command(text, text) IS
    'Command of the pg_cron job that runs a child with the batch''s search_path; NULL when that cannot be done.';

CREATE FUNCTION @schema@._cron_refuse_search_path(p_sql text, p_search_path text)
RETURNS void
LANGUAGE plpgsql STABLE
AS $fn$
BEGIN
    RAISE EXCEPTION 'under pg_cron, % runs as a job of its own with the role''s default search_path (%), not the batch''s (%)',
        split_part(@schema@._statement_head(p_sql), ' ', 1),
        (SELECT s.reset_val FROM pg_catalog.pg_settings s WHERE s.name = 'search_path'), p_search_path
        USING ERRCODE = 'feature_not_supported',
              DETAIL = 'It must be a top-level statement of its own, so the job cannot set search_path before it.',
              HINT = 'Schema-qualify the names it uses and launch with the default search_path, or make the '
                     'batch''s search_path the role''s default (ALTER ROLE ... SET search_path).';
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_refuse_search_path(text, text) IS
    'Raises the error of a child _cron_job_command() cannot run: at launch, or in the runner for a child '
    'whose role''s default differs from the launching session''s.';

CREATE FUNCTION @schema@._cron_run(p_job bigint)
RETURNS @schema@.cron_run
LANGUAGE plpgsql STABLE
AS $fn$
DECLARE
    r @schema@.cron_run;
BEGIN
    SELECT d.status, d.job_pid, d.start_time, d.return_message INTO r
      FROM cron.job_run_details d WHERE d.jobid = p_job ORDER BY d.runid LIMIT 1;
    RETURN r;
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_run(bigint) IS 'The (first) run of a child''s job; NULL fields before it starts.';

CREATE FUNCTION @schema@._cron_child_result(p_job bigint, p_run @schema@.cron_run, p_cancelled boolean,
                                           p_timed_out boolean)
RETURNS jsonb
LANGUAGE plpgsql
AS $fn$
DECLARE
    -- pg_cron's return_message: 'ERROR:  message', then DETAIL:, HINT: and CONTEXT: lines if any.
    v_text text := regexp_replace(coalesce(p_run.return_message, ''), '^(ERROR|FATAL):\s*', '');
    v_message text := (regexp_match(v_text, '^(.*?)(\n(DETAIL|HINT|CONTEXT): |$)'))[1];
    v_detail text := (regexp_match(v_text, '\nDETAIL: (.*?)(\n(HINT|CONTEXT): |$)'))[1];
    v_hint text := (regexp_match(v_text, '\nHINT: (.*?)(\nCONTEXT: |$)'))[1];
    v_state text;
BEGIN
    DELETE FROM cron.job_run_details WHERE jobid = p_job;
    IF p_run.status = 'succeeded' THEN
        -- Even when a stop or the timeout came too late to cut it short: it did its work.
        RETURN jsonb_build_object('command', p_run.return_message,
                                  'rows', coalesce(substring(p_run.return_message FROM '(\d+)$')::bigint, 0));
    ELSIF p_timed_out THEN
        RAISE EXCEPTION 'canceling statement due to statement timeout' USING ERRCODE = 'query_canceled';
    ELSIF p_cancelled OR p_run.status IS NULL THEN
        RAISE EXCEPTION 'canceling statement due to user request' USING ERRCODE = 'query_canceled';
    END IF;
    -- pg_cron keeps the text, not the SQLSTATE: name the common ones by their message (the
    -- transient ones first, so that automatic retries work here too), XX000 for the rest, as
    -- PostgreSQL does for an error raised without a code.
    v_state := CASE
        WHEN v_message LIKE 'deadlock detected%' THEN '40P01'
        WHEN v_message LIKE 'could not serialize access%' THEN '40001'
        WHEN v_message LIKE 'canceling statement due to lock timeout%' THEN '55P03'
        WHEN v_message LIKE 'could not obtain lock%' THEN '55P03'
        WHEN v_message LIKE 'canceling statement due to statement timeout%' THEN '57014'
        WHEN v_message LIKE 'canceling statement due to user request%' OR v_message = 'job canceled' THEN '57014'
        WHEN v_message LIKE 'permission denied%' OR v_message LIKE 'must be owner of%'
          OR v_message LIKE 'must be superuser%' OR v_message LIKE 'must be a member of%' THEN '42501'
        WHEN v_message ~ '^(relation|table) ".*" does not exist' THEN '42P01'
        WHEN v_message ~ '^index ".*" does not exist' THEN '42704'
        WHEN v_message ~ '^(function|procedure) .* does not exist' THEN '42883'
        WHEN v_message ~ '^column ".*" does not exist' THEN '42703'
        WHEN v_message ~ '^(relation|index) ".*" already exists' THEN '42P07'
        WHEN v_message LIKE 'syntax error%' THEN '42601'
        WHEN v_message LIKE 'could not create unique index%' THEN '23505'
        WHEN v_message LIKE 'division by zero%' THEN '22012'
        WHEN v_message LIKE '% cannot run inside a transaction block' THEN '25001'
        ELSE 'XX000' END;
    RAISE EXCEPTION USING MESSAGE = v_message, ERRCODE = v_state,
        DETAIL = coalesce(v_detail, 'Run at top level by a pg_cron job, which records the error''s text but '
                                    'not its SQLSTATE' || CASE WHEN v_state = 'XX000' THEN '.'
                                    ELSE ': this one is named from the message.' END),
        HINT = coalesce(v_hint, '');
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_child_result(bigint, @schema@.cron_run, boolean, boolean) IS
    'Result document of a child run by a job of its own, or its error re-raised (pg_cron records the '
    'text without the SQLSTATE: common ones are named by their message, XX000 otherwise); forgets the run.';

CREATE FUNCTION @schema@._cron_own_job()
RETURNS bigint
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_job bigint;
    v_deadline timestamptz := clock_timestamp() + interval '2 s';
BEGIN
    -- pg_cron records the pid of a run from its own loop, after the run has begun: a run that
    -- parks at once may get here first.
    LOOP
        SELECT d.jobid INTO v_job FROM cron.job_run_details d
         WHERE d.job_pid = pg_backend_pid() AND d.status IN ('starting', 'running');
        EXIT WHEN v_job IS NOT NULL OR clock_timestamp() > v_deadline;
        PERFORM pg_sleep(0.01);
    END LOOP;
    RETURN v_job;
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_own_job() IS
    'The pg_cron job this session is a run of (NULL if pg_cron has not said so within 2 s).';

CREATE FUNCTION @schema@._cron_park(p_job bigint)
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    -- Parked rather than removed: '@reboot' runs it only when pg_cron starts (after a server
    -- restart, when it resumes the role's queued work), and the job keeps its id for a fast
    -- next start. A role has at most as many as its largest cap.
    PERFORM cron.schedule(j.jobname, '@reboot', j.command) FROM cron.job j WHERE j.jobid = p_job;
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_park(bigint) IS
    'Parks a pg_cron runner job (schedule @reboot), for the next batch of its role to wake.';

CREATE PROCEDURE @schema@._cron_runner()
LANGUAGE plpgsql
AS $fn$
DECLARE
    b record;
    v_ran boolean;
    v_parents uuid[];
    v_settled boolean := false;
    v_idle_since timestamptz := clock_timestamp();
    v_linger interval := (SELECT s.cron_linger FROM @schema@.settings s);
    v_woken boolean;
    v_job bigint;
BEGIN
    PERFORM set_config('application_name', 'pgbg:cron', false);
    -- The finished runs of this role's runner jobs (job_run_details would grow every second otherwise).
    DELETE FROM cron.job_run_details
     WHERE command = 'CALL @schema@._cron_runner()' AND status IN ('succeeded', 'failed');
    COMMIT;
    LOOP
        v_ran := false;
        FOR b IN
            SELECT bt.uuid_parent, bt.enqueue_xid FROM @schema@.batch bt
             WHERE bt.role_name = current_user AND bt.stop_requested_at IS NULL
               AND EXISTS (SELECT 1 FROM @schema@.log_background x
                            WHERE x.uuid_parent = bt.uuid_parent AND x.status = 'queued')
             ORDER BY bt.created_at
             LIMIT 20
        LOOP
            -- The runner's loop, as in a pg_background worker: it adopts other batches of the role
            -- until none needs a runner.
            CALL @schema@._work(b.uuid_parent, b.enqueue_xid, v_ran);
            EXIT WHEN v_ran;
        END LOOP;
        PERFORM set_config('application_name', 'pgbg:cron', false);
        IF v_ran THEN
            v_settled := false;
            v_idle_since := clock_timestamp();
        END IF;
        -- A runner of this role killed mid-child (its job runs again a second later: this may be it)
        -- left that child 'running'. Settle it here, lost or queued again: a poll could, but a
        -- pg_background_wait() would schedule the runner job only when its own statement ends.
        v_parents := ARRAY(SELECT DISTINCT x.uuid_parent FROM @schema@.log_background x
                             JOIN @schema@.batch bt USING (uuid_parent)
                            WHERE x.status = 'running' AND bt.role_name = current_user
                              AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                                               WHERE a.pid = x.pid AND a.backend_start = x.backend_start));
        IF cardinality(v_parents) > 0 AND NOT v_settled THEN
            PERFORM @schema@._housekeep(v_parents);
            COMMIT;
            v_settled := true;  -- once per idle turn: rows locked by another session stay theirs
            CONTINUE;
        END IF;
        IF NOT v_ran AND EXISTS (SELECT 1 FROM @schema@.log_background x JOIN @schema@.batch bt USING (uuid_parent)
                                  WHERE x.status = 'queued' AND bt.role_name = current_user
                                    AND bt.stop_requested_at IS NULL) THEN
            -- Work, but no free slot. When every batch with queued children has all its slots taken,
            -- the runners holding them run the rest: park, rather than run again every second for as
            -- long as that lasts, as lingering runners woken by a batch with a smaller cap would.
            -- Short of a global slot only, this job runs again in a second.
            IF NOT EXISTS (
                SELECT 1 FROM @schema@.batch bt
                 WHERE bt.role_name = current_user AND bt.stop_requested_at IS NULL
                   AND EXISTS (SELECT 1 FROM @schema@.log_background x
                                WHERE x.uuid_parent = bt.uuid_parent AND x.status = 'queued')
                   AND (SELECT count(*) FROM pg_locks l
                         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                           AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
                           AND l.classid = @schema@._batch_lock_key(bt.uuid_parent)::oid) < bt.max_parallel) THEN
                v_job := @schema@._cron_own_job();
                PERFORM pg_advisory_xact_lock(@schema@._role_key());
                PERFORM @schema@._cron_park(v_job);
                COMMIT;
            END IF;
            RETURN;
        END IF;
        -- Idle: stay a moment (settings.cron_linger) before parking. The role's next batch often
        -- follows soon (a script's next launch, a DAG's next task): a runner still here takes it
        -- within 20 ms, where a parked job starts only after pg_cron has seen this run end (up to
        -- 2 s). The probe reads the small index of queued children. A run of a parked job does not
        -- linger: pg_cron started it for a tick that came while the last run lingered, or at its own
        -- start, and nothing is about to be launched for it.
        v_woken := false;
        IF clock_timestamp() < v_idle_since + v_linger THEN
            v_job := @schema@._cron_own_job();
            IF NOT EXISTS (SELECT 1 FROM cron.job j WHERE j.jobid = v_job AND j.schedule = '@reboot') THEN
                WHILE NOT v_woken AND clock_timestamp() < v_idle_since + v_linger LOOP
                    COMMIT;
                    PERFORM pg_sleep(0.02);
                    v_woken := EXISTS (SELECT 1 FROM @schema@.log_background x JOIN @schema@.batch bt USING (uuid_parent)
                                        WHERE x.status = 'queued' AND bt.role_name = current_user
                                          AND bt.stop_requested_at IS NULL);
                END LOOP;
            END IF;
        END IF;
        CONTINUE WHEN v_woken;
        -- Nothing left: leave for good, unless work was queued meanwhile (which waits for this lock,
        -- then schedules a job if none is left).
        v_job := @schema@._cron_own_job();
        PERFORM pg_advisory_xact_lock(@schema@._role_key());
        IF NOT EXISTS (SELECT 1 FROM @schema@.log_background x JOIN @schema@.batch bt USING (uuid_parent)
                        WHERE x.status = 'queued' AND bt.role_name = current_user AND bt.stop_requested_at IS NULL) THEN
            PERFORM @schema@._cron_park(v_job);
            COMMIT;
            RETURN;
        END IF;
        COMMIT;
    END LOOP;
END
$fn$;
COMMENT ON PROCEDURE @schema@._cron_runner() IS
    'Body of a pg_cron runner job: runs the batches of its role like a pg_background runner, then '
    'parks its job (schedule @reboot) once the role has had no queued work for settings.cron_linger.';

CREATE FUNCTION @schema@._cron_child_pid(p_child uuid)
RETURNS int
LANGUAGE plpgsql STABLE
AS $fn$
DECLARE
    v_pid int;
BEGIN
    IF @schema@._launcher() <> 'pg_cron' THEN
        RETURN NULL;  -- and schema cron may not exist: this body is parsed only when it gets here
    END IF;
    SELECT d.job_pid INTO v_pid FROM cron.job j JOIN cron.job_run_details d USING (jobid)
     WHERE j.jobname = 'pgbg_child:' || p_child AND d.status = 'running' LIMIT 1;
    RETURN v_pid;
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_child_pid(uuid) IS
    'The backend of the pg_cron job that runs a child at top level, while it runs; NULL otherwise.';
