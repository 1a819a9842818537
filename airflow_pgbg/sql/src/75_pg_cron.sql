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

CREATE FUNCTION @schema@._cron_spent_command()
RETURNS text
LANGUAGE sql IMMUTABLE
RETURN 'SELECT ''pgbg: this child has run''';
COMMENT ON FUNCTION @schema@._cron_spent_command() IS
    'The command of a child''s job once its run has begun: pg_cron starts the job again every second until '
    'its runner unschedules it, and those runs must do nothing (nor count as the child running).';

CREATE FUNCTION @schema@._cron_exec_child(p_child uuid, p_settings jsonb, p_sql text)
RETURNS void
LANGUAGE plpgsql
AS $fn$
DECLARE
    o @schema@.child_outcome;
BEGIN
    -- pg_cron runs a job again every second until its runner unschedules it: a run of an attempt that
    -- already ran (a runner that died before it could) does nothing.
    PERFORM 1 FROM @schema@.log_background c
     WHERE c.uuid_child = p_child AND c.status = 'running' AND c.result IS NULL AND c.sqlstate IS NULL;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- The job's session has the role's defaults: the batch's settings for its child.
    o := @schema@._run_inline(p_sql, (SELECT s FROM @schema@.settings s), p_settings);
    PERFORM @schema@._leave_batch_session();
    -- The outcome, with its real SQLSTATE and a preview of its rows, commits with its work.
    UPDATE @schema@.log_background
       SET result = o.result, sqlstate = o.sqlstate, error = o.message, error_detail = o.detail,
           error_hint = o.hint, error_context = o.context
     WHERE uuid_child = p_child;
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_exec_child(uuid, jsonb, text) IS
    'What the pg_cron job of a child that needs no top level runs, as one statement (pg_cron reports a '
    'command as succeeded after its first statement): the child''s statement with the batch''s settings, '
    'its outcome recorded with its work, once per attempt.';

CREATE FUNCTION @schema@._cron_recorded(p_child uuid)
RETURNS @schema@.child_outcome
LANGUAGE sql STABLE
RETURN (SELECT CASE WHEN c.result IS NOT NULL OR c.sqlstate IS NOT NULL
                    THEN ROW(c.result, c.sqlstate, c.error, c.error_detail, c.error_hint, c.error_context)::@schema@.child_outcome
               END
          FROM @schema@.log_background c WHERE c.uuid_child = p_child);
COMMENT ON FUNCTION @schema@._cron_recorded(uuid) IS 'The outcome _cron_exec() recorded for a child, if it ran.';

CREATE FUNCTION @schema@._cron_job_command(p_sql text, p_child uuid, p_settings jsonb)
RETURNS text
LANGUAGE sql VOLATILE
-- A pg_cron job starts a new session of the role, with the role's defaults (those RESET restores here:
-- runners are such sessions too). A statement that must be a top-level statement of its own runs as it
-- is, and can only with those defaults (anything before it would put it in a transaction block); any
-- other runs through _cron_exec_child(), with the batch's settings.
RETURN CASE
    WHEN NOT @schema@._needs_own_worker(p_sql)
        THEN format('SELECT @schema@._cron_exec_child(%L::uuid, %L::jsonb, %L)', p_child, p_settings, p_sql)
    WHEN @schema@._non_default_settings(p_settings) IS NULL THEN p_sql
END;
COMMENT ON FUNCTION @schema@._cron_job_command(text, uuid, jsonb) IS
    'Command of the pg_cron job that runs a child with the batch''s settings; NULL when that cannot be done.';

CREATE FUNCTION @schema@._cron_refuse_settings(p_sql text, p_settings jsonb)
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    RAISE EXCEPTION 'under pg_cron, % runs as a job of its own with the role''s default settings, not the batch''s (%)',
        split_part(@schema@._statement_head(p_sql), ' ', 1), @schema@._non_default_settings(p_settings)
        USING ERRCODE = 'feature_not_supported',
              DETAIL = 'It must be a top-level statement of its own, so the job cannot set anything before it.',
              HINT = 'Schema-qualify the names it uses and launch without those settings, run it in a batch of its '
                     'own without them, or make them the role''s defaults (ALTER ROLE ... SET).';
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_refuse_settings(text, jsonb) IS
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
        -- What pg_cron records of a run the server's restart cut short, and of one terminated from outside.
        WHEN v_message = 'server restarted' THEN '57P02'
        WHEN v_message ~ '^terminating (background worker|connection) .*due to administrator command' THEN '57P01'
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

CREATE PROCEDURE @schema@._run_in_cron_job(p_sql text, p_child uuid, p_settings jsonb, p_timeout interval,
                                           INOUT p_outcome @schema@.child_outcome)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_command text := @schema@._cron_job_command(p_sql, p_child, p_settings);
    v_job bigint;
    v_run @schema@.cron_run;
    v_defused boolean := false;
    v_cancelled boolean := false;
    v_cancelled_pid int;
    v_timed_out boolean := false;
    v_gone_since timestamptz;
BEGIN
    -- The statement is the command of a job of its own, which runs it at top level at the next second.
    -- Unscheduling a job ends its run, so the job stays until the run has ended; once the run has begun
    -- (pg_cron has copied the command by then) the command becomes a no-op for any rerun the schedule
    -- starts meanwhile. This runner enforces the statement timeout and passes a stop on to the run.
    p_outcome := NULL;
    BEGIN
        IF v_command IS NULL THEN
            PERFORM @schema@._cron_refuse_settings(p_sql, p_settings);
        END IF;
        v_job := @schema@._cron_child_start(v_command, p_child);
    EXCEPTION WHEN query_canceled OR OTHERS THEN
        GET STACKED DIAGNOSTICS p_outcome.sqlstate = RETURNED_SQLSTATE, p_outcome.message = MESSAGE_TEXT,
                                p_outcome.detail = PG_EXCEPTION_DETAIL, p_outcome.hint = PG_EXCEPTION_HINT;
        RETURN;  -- refused, or stopped before it was scheduled
    END;
    COMMIT;
    LOOP
        BEGIN
            v_run := @schema@._cron_run(v_job);
            IF v_run.status IS NOT NULL AND NOT v_defused AND NOT v_cancelled THEN
                -- Same name, same job (cron.alter_job is for administrators).
                PERFORM cron.schedule('pgbg_child:' || p_child, '1 seconds', @schema@._cron_spent_command());
                v_defused := true;
            END IF;
            EXIT WHEN v_run.status IN ('succeeded', 'failed');
            -- Stopped before its run began: give pg_cron a moment to start one it had picked.
            EXIT WHEN v_cancelled AND v_run.status IS NULL AND clock_timestamp() > v_gone_since + interval '1.5 s';
            -- The job's own clock: pg_cron's start_time is when it began to start the job, and it learns
            -- of the end a moment late; the backend knows when it began.
            -- A stop that came before pg_cron had started the run, or before it told which backend runs it.
            IF v_cancelled AND v_run.job_pid IS DISTINCT FROM v_cancelled_pid AND v_run.job_pid IS NOT NULL THEN
                PERFORM pg_cancel_backend(v_run.job_pid);
                v_cancelled_pid := v_run.job_pid;
            END IF;
            IF p_timeout IS NOT NULL AND NOT v_timed_out AND v_run.job_pid IS NOT NULL
               AND EXISTS (SELECT 1 FROM pg_stat_activity a
                            WHERE a.pid = v_run.job_pid AND a.state = 'active'
                              AND clock_timestamp() > a.query_start + p_timeout) THEN
                PERFORM pg_cancel_backend(v_run.job_pid);
                v_timed_out := true;
            END IF;
            PERFORM pg_sleep(0.01);
        EXCEPTION WHEN query_canceled THEN
            -- A stop reached this runner: take the child's run down with it (unscheduled, a job's run is
            -- ended by pg_cron).
            v_cancelled := true;
            v_gone_since := coalesce(v_gone_since, clock_timestamp());
            PERFORM cron.unschedule(j.jobid) FROM cron.job j WHERE j.jobid = v_job;
            IF v_run.job_pid IS NOT NULL THEN
                PERFORM pg_cancel_backend(v_run.job_pid);
                v_cancelled_pid := v_run.job_pid;
            END IF;
        END;
        COMMIT;
    END LOOP;
    PERFORM cron.unschedule(j.jobid) FROM cron.job j WHERE j.jobid = v_job;
    BEGIN
        p_outcome.result := @schema@._cron_child_result(v_job, v_run, v_cancelled, v_timed_out);
    EXCEPTION WHEN query_canceled OR OTHERS THEN
        GET STACKED DIAGNOSTICS p_outcome.sqlstate = RETURNED_SQLSTATE, p_outcome.message = MESSAGE_TEXT,
                                p_outcome.detail = PG_EXCEPTION_DETAIL, p_outcome.hint = PG_EXCEPTION_HINT;
    END;
    -- What _cron_exec() recorded, when it ran the statement, rather than what pg_cron makes of it; the
    -- cancel that enforced the timeout was this runner's, so it says so.
    p_outcome := coalesce(@schema@._cron_recorded(p_child), p_outcome);
    IF v_timed_out AND p_outcome.sqlstate = '57014' THEN
        p_outcome.message := 'canceling statement due to statement timeout';
    END IF;
END
$fn$;
COMMENT ON PROCEDURE @schema@._run_in_cron_job(text, uuid, jsonb, interval, @schema@.child_outcome) IS
    'Runs a child at top level as the command of a pg_cron job of its own (with the batch''s settings where '
    'the command can set them, and the batch''s statement timeout) and returns how it ended.';

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

CREATE PROCEDURE @schema@._cron_park(INOUT p_parked boolean DEFAULT NULL)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_job bigint := @schema@._cron_own_job();
BEGIN
    -- Ordered against a launch of the role (it queues under this lock, shared, then schedules a job if
    -- none is left): no batch is left with queued work and no job. Parked rather than removed:
    -- '@reboot' runs it only when pg_cron starts (after a server restart, when it resumes the role's
    -- queued work), and the job keeps its id for a fast next start. A role has at most as many as its
    -- largest cap.
    PERFORM @schema@._lock_role(0, true);
    p_parked := NOT (@schema@._role_has_queued() AND @schema@._role_slots_free());
    IF p_parked THEN
        PERFORM cron.schedule(j.jobname, '@reboot', j.command) FROM cron.job j WHERE j.jobid = v_job;
    END IF;
    COMMIT;
END
$fn$;
COMMENT ON PROCEDURE @schema@._cron_park(boolean) IS
    'Parks the pg_cron runner job of this session (schedule @reboot), for the next batch of its role to '
    'wake, and commits; p_parked is false, and nothing parked, when its role has queued work a runner could '
    'start.';

CREATE FUNCTION @schema@._cron_schedule_runners()
RETURNS void
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_wanted int;
BEGIN
    -- A child's job whose runner is gone (its child settled) must not run again.
    PERFORM cron.unschedule(j.jobid) FROM cron.job j
     WHERE starts_with(j.jobname, 'pgbg_child:')
       AND NOT EXISTS (SELECT 1 FROM @schema@.log_background c
                        WHERE c.uuid_child::text = substr(j.jobname, 12) AND c.status = 'running');
    -- Runner jobs pick any batch of their role: as many as its batches can use, up to the cap.
    v_wanted := (SELECT least(@schema@._global_cap(), coalesce(sum(least(n.queued + n.running, bt.max_parallel)), 0))::int
                   FROM @schema@.batch bt
                  CROSS JOIN LATERAL @schema@._batch_counts(bt.uuid_parent, bt.counted) n
                  WHERE bt.role_name = current_user AND bt.stop_requested_at IS NULL AND n.queued > 0);
    IF v_wanted > 0 THEN
        -- The role's jobs are counted on: ordered against one deciding to park (see _cron_park()), which
        -- then sees this work. Only then: a row lock makes a transaction write.
        PERFORM @schema@._lock_role(0, false);
        PERFORM @schema@._cron_ensure_runners(v_wanted);
    END IF;
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_schedule_runners() IS
    'pg_cron housekeeping: unschedules the jobs of children no runner runs any more, and schedules runner '
    'jobs of the caller''s role for its batches with queued children.';

CREATE PROCEDURE @schema@._cron_linger(p_until timestamptz, INOUT p_woken boolean)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_job bigint := @schema@._cron_own_job();
BEGIN
    -- A parked job starts only after pg_cron has seen this run end (up to 2 s). A run of a parked job
    -- does not linger: pg_cron started it for a tick that came while the last run lingered, or at its
    -- own start, and nothing is about to be launched for it.
    p_woken := false;
    IF NOT EXISTS (SELECT 1 FROM cron.job j WHERE j.jobid = v_job AND j.schedule = '@reboot') THEN
        CALL @schema@._linger(p_until, p_woken);
    END IF;
END
$fn$;
COMMENT ON PROCEDURE @schema@._cron_linger(timestamptz, boolean) IS
    'A pg_cron runner with nothing left stays until p_until for its role''s next batch; p_woken when one came.';

CREATE PROCEDURE @schema@._cron_runner()
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_ran boolean;
    v_left boolean;
    v_next_settle timestamptz := '-infinity';
    v_idle_since timestamptz := clock_timestamp();
    v_linger interval := (SELECT s.cron_linger FROM @schema@.settings s);
    v_woken boolean;
    v_parked boolean;
    v_planned bigint := pg_relation_size('@schema@.log_background');
BEGIN
    PERFORM set_config('application_name', 'pgbg:cron', false);
    -- The finished runs of this role's runner jobs (job_run_details would grow every second otherwise).
    DELETE FROM cron.job_run_details WHERE command = 'CALL @schema@._cron_runner()' AND status IN ('succeeded', 'failed');
    COMMIT;
    LOOP
        v_planned := @schema@._replan(v_planned);
        CALL @schema@._work_role(v_ran, v_left);
        EXIT WHEN v_left;  -- cancelled from outside: this run ends (the job runs again next second)
        PERFORM set_config('application_name', 'pgbg:cron', false);
        IF v_ran THEN
            v_next_settle := '-infinity';
            v_idle_since := clock_timestamp();
        END IF;
        -- A runner of this role killed mid-child (its job runs again a second later: this may be it) left
        -- that child 'running': settle it here (rows locked by another session stay theirs), at most once
        -- a second. A wait leaves it to the runner jobs.
        IF clock_timestamp() >= v_next_settle AND EXISTS (SELECT 1 FROM @schema@._orphans(NULL) o WHERE o.role_name = current_user) THEN
            PERFORM @schema@._housekeep(NULL::uuid[]);
            COMMIT;
            v_next_settle := clock_timestamp() + interval '1 s';
            CONTINUE;
        END IF;
        IF NOT v_ran AND @schema@._role_has_queued() THEN
            -- Work, but no free slot. When every batch with queued children has all its slots taken, the
            -- runners holding them run the rest: park, rather than run again every second for as long as
            -- that lasts. Short of a global slot only, this job runs again in a second.
            IF NOT @schema@._role_slots_free() THEN
                CALL @schema@._cron_park(v_parked);
            END IF;
            RETURN;
        END IF;
        IF EXISTS (SELECT 1 FROM @schema@._orphans(NULL) o WHERE o.role_name = current_user) THEN
            -- A child whose own job outlived its runner: it is settled once that job has ended, and
            -- nothing else would (this run stayed for it once, then parked, and the batch never ended).
            CALL @schema@._linger(v_next_settle, v_woken);
            CONTINUE;
        END IF;
        CALL @schema@._cron_linger(v_idle_since + v_linger, v_woken);
        CONTINUE WHEN v_woken;
        -- Nothing left: leave for good, unless work was queued meanwhile.
        CALL @schema@._cron_park(v_parked);
        EXIT WHEN v_parked;
    END LOOP;
END
$fn$;
COMMENT ON PROCEDURE @schema@._cron_runner() IS
    'Body of a pg_cron runner job: runs the batches of its role like a pg_background runner and settles '
    'its children whose runner died, then parks its job (schedule @reboot) once the role has had no queued '
    'work for settings.cron_linger and no such child is left.';

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
     WHERE j.jobname = 'pgbg_child:' || p_child AND d.status = 'running'
       AND d.command IS DISTINCT FROM @schema@._cron_spent_command()
     LIMIT 1;
    RETURN v_pid;
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_child_pid(uuid) IS
    'The backend of the pg_cron job that runs a child at top level, while it runs; NULL otherwise.';
