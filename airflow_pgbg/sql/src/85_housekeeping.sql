-- Housekeeping: children of runners that died, and runners where slots are free. Every poll, monitor,
-- wait, launch and retry does it, so polling is enough to drive a batch. Runners it starts begin once
-- its transaction has ended; a call that stays in its transaction (a wait) has it done apart.

CREATE FUNCTION @schema@._cancel_run(p_pid int)
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM pg_cancel_backend(p_pid);
EXCEPTION WHEN insufficient_privilege THEN
    NULL;  -- another role's child (an administrator's poll): that role's own polls pass the stop on
END
$fn$;
COMMENT ON FUNCTION @schema@._cancel_run(int) IS 'Cancels the statement of a child''s own process, where the caller may.';

CREATE FUNCTION @schema@._orphan_outcome(p_child @schema@.log_background, OUT running boolean,
                                         OUT outcome @schema@.child_outcome)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_job bigint;
    v_spent boolean;
    v_own boolean;
    v_run @schema@.cron_run;
    v_pid int;
BEGIN
    -- Whether a child whose runner died still runs somewhere, or how it ended there. Only a statement of
    -- its own worker or job can have outlived its runner; an inline one rolled back with it. A stop its
    -- runner could not pass on (it died, maybe of the very cancel that brought the stop) is passed on here.
    running := false;
    IF p_child.run_mode = 'inline' THEN
        RETURN;
    ELSIF @schema@._launcher() = 'pg_background' THEN
        SELECT a.pid INTO v_pid FROM pg_stat_activity a
         WHERE a.application_name = 'pgbg-child:' || p_child.uuid_child
           AND a.usename = p_child.role_name AND a.backend_type = 'pg_background';
        running := v_pid IS NOT NULL;
        IF running AND p_child.stop_requested THEN
            PERFORM @schema@._cancel_run(v_pid);
        END IF;
        RETURN;
    END IF;
    -- Under pg_cron, how the child's job ended is recorded: it is not lost with the runner.
    outcome := @schema@._cron_recorded(p_child.uuid_child);
    SELECT j.jobid, j.command = @schema@._cron_spent_command(), j.username = current_user INTO v_job, v_spent, v_own
      FROM cron.job j WHERE j.jobname = 'pgbg_child:' || p_child.uuid_child AND j.username = p_child.role_name;
    IF v_own AND NOT v_spent THEN
        -- Its runner died before it made the job's later runs no-ops (see _run_in_cron_job()): each would
        -- run the statement again, a second after the last (a stop cancelled one after the other, and the
        -- child was never settled). A run that has begun goes on, and is waited for. (An administrator's
        -- housekeeping would schedule a job of its own by that name: it leaves this to the role's.)
        PERFORM cron.schedule('pgbg_child:' || p_child.uuid_child, '1 seconds', @schema@._cron_spent_command());
    END IF;
    -- A run of the spent command (see _cron_spent_command()) is not the child's: one found running kept
    -- the child from being settled.
    SELECT d.job_pid INTO v_pid FROM cron.job_run_details d
     WHERE d.jobid = v_job AND d.status IN ('starting', 'running')
       AND d.command IS DISTINCT FROM @schema@._cron_spent_command()
     ORDER BY d.runid LIMIT 1;
    running := outcome IS NULL AND FOUND;
    IF running AND p_child.stop_requested AND v_pid IS NOT NULL THEN
        PERFORM @schema@._cancel_run(v_pid);
    END IF;
    v_run := @schema@._cron_run(v_job);
    IF outcome IS NULL AND NOT running AND v_run.status IN ('succeeded', 'failed') THEN
        BEGIN
            outcome.result := @schema@._cron_child_result(v_job, v_run, false, false);
        EXCEPTION WHEN query_canceled OR OTHERS THEN
            GET STACKED DIAGNOSTICS outcome.sqlstate = RETURNED_SQLSTATE, outcome.message = MESSAGE_TEXT,
                                    outcome.detail = PG_EXCEPTION_DETAIL, outcome.hint = PG_EXCEPTION_HINT;
        END;
    END IF;
    IF NOT running AND v_job IS NOT NULL THEN
        PERFORM cron.unschedule(v_job);  -- it must not run again
    END IF;
END
$fn$;
COMMENT ON FUNCTION @schema@._orphan_outcome(@schema@.log_background) IS
    'For a running child whose runner died: whether its nested worker or pg_cron job still runs it (a stop '
    'of the child is passed on to it), or how that job ended (pg_cron records it); neither for an inline '
    'child, which rolled back with its runner.';

CREATE FUNCTION @schema@._orphans(p_parents uuid[])
RETURNS SETOF @schema@.log_background
LANGUAGE sql STABLE
AS $fn$
    SELECT x.* FROM @schema@.log_background x
     WHERE x.status = 'running'
       AND (p_parents IS NULL OR x.uuid_parent = ANY (p_parents))
       AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                        WHERE a.pid = x.pid AND (a.backend_start = x.backend_start OR a.backend_start IS NULL))
$fn$;
COMMENT ON FUNCTION @schema@._orphans(uuid[]) IS
    'Running children whose runner (the same pid with the same backend_start) is gone.';

CREATE FUNCTION @schema@._settle_orphans(p_parents uuid[])
RETURNS uuid[]
LANGUAGE plpgsql
AS $fn$
DECLARE
    c @schema@.log_background;
    v_orphan record;
    v_status @schema@.child_status;
    v_touched uuid[] := '{}';
BEGIN
    -- Rows locked by someone else are left to that someone. The claim judged is the claim locked: a row
    -- claimed again since this statement's snapshot is locked in its newest version, which the recheck
    -- of (id, attempt) drops; by id alone a live runner's new claim was settled as gone.
    FOR c IN SELECT x.* FROM @schema@.log_background x
              WHERE (x.id, x.attempt) IN (SELECT o.id, o.attempt FROM @schema@._orphans(p_parents) o)
                AND x.status = 'running'
                FOR UPDATE SKIP LOCKED
    LOOP
        v_orphan := @schema@._orphan_outcome(c);
        CONTINUE WHEN v_orphan.running;
        SELECT s.status INTO v_status
          FROM @schema@._settle(c.id, c.attempt, v_orphan.outcome, v_orphan.outcome IS NULL) s;
        CONTINUE WHEN v_status IS NULL;
        PERFORM @schema@._count(c.uuid_parent, c.role_name, -pg_backend_pid(), (v_status = 'queued')::int, -1,
                                (v_status = 'done')::int, (v_status = 'failed')::int, (v_status = 'stopped')::int,
                                (v_status = 'lost')::int, NULL, clock_timestamp());
        v_touched := v_touched || c.uuid_parent;
    END LOOP;
    PERFORM @schema@._notify_if_ended(v_touched);
    RETURN v_touched;
END
$fn$;
COMMENT ON FUNCTION @schema@._settle_orphans(uuid[]) IS
    'Settles the running children whose runner died (see _orphans(), _orphan_outcome(), _settle()); returns '
    'their batches.';

CREATE FUNCTION @schema@._runners_of(p_parent uuid)
RETURNS int
LANGUAGE sql STABLE
-- Runners still starting hold no slot yet, but are named after their batch already; one still starting
-- others counts them too ('pgbg:<batch>+<n>', see _runner()).
-- (least() skips a NULL: a runner without a '+<n>' counted as 1,001, and one running batch kept every other
-- batch of the database from getting runners of its own.)
RETURN (SELECT coalesce(sum(1 + least(coalesce(substring(a.application_name FROM '\+([0-9]{1,4})$')::int, 0),
                                      1000)), 0)::int
          FROM pg_stat_activity a
         WHERE CASE WHEN p_parent IS NULL
                    THEN a.application_name LIKE 'pgbg:%-%' AND pg_has_role(a.usesysid, 'pgbg_user', 'MEMBER')
                    ELSE split_part(a.application_name, '+', 1) = 'pgbg:' || p_parent AND a.usename = current_user END
           AND a.backend_type = 'pg_background' AND a.datname = current_database());
COMMENT ON FUNCTION @schema@._runners_of(uuid) IS
    'pg_background runners of the caller''s batch p_parent (NULL: of every batch of the database), as '
    'only runners can show themselves (see _is_runner()).';

CREATE FUNCTION @schema@._runners_wanted(p_parents uuid[])
RETURNS TABLE (uuid_parent uuid, wanted int)
LANGUAGE sql STABLE
AS $fn$
    -- Only the caller's own batches: a runner runs as the role that starts it, and children must run
    -- as the role that submitted them.
    SELECT bt.uuid_parent, least(n.queued, bt.max_parallel - @schema@._runners_of(bt.uuid_parent))::int
      FROM @schema@.batch bt
     CROSS JOIN LATERAL @schema@._batch_counts(bt.uuid_parent, bt.counted) n
     WHERE bt.role_name = current_user AND bt.stop_requested_at IS NULL
       AND (p_parents IS NULL OR bt.uuid_parent = ANY (p_parents))
       AND n.queued > 0
     ORDER BY bt.created_at
$fn$;
COMMENT ON FUNCTION @schema@._runners_wanted(uuid[]) IS
    'For each of the caller''s batches with queued children, how many more pg_background runners it could use.';

CREATE FUNCTION @schema@._start_runners(p_parents uuid[])
RETURNS void
LANGUAGE plpgsql
AS $fn$
DECLARE
    b record;
    v_free int;
    v_lingering int;
    v_taken int;
    v_want int;
    v_started int;
BEGIN
    FOR b IN SELECT * FROM @schema@._runners_wanted(p_parents) w WHERE w.wanted > 0 LOOP
        IF v_lingering IS NULL THEN
            -- Runners of the role waiting for its next batch take this one within 20 ms, and are counted
            -- on: ordered against one deciding to leave (see _runner()), which then sees this work. Only
            -- here: a row lock makes a transaction write, and a poll with nothing to start need not.
            PERFORM @schema@._lock_role(0, false);
            PERFORM pg_stat_clear_snapshot();
            v_free := @schema@._global_cap() - @schema@._runners_of(NULL);
            v_lingering := @schema@._lingerers();
        END IF;
        EXIT WHEN v_free <= 0;
        v_want := least(b.wanted, v_free);
        v_taken := least(v_want, v_lingering);
        v_lingering := v_lingering - v_taken;
        v_free := v_free - v_taken;
        v_want := v_want - v_taken;
        v_started := @schema@._launch_runners(b.uuid_parent, v_want);
        v_free := v_free - v_started;
        EXIT WHEN v_started < v_want;  -- the server has no worker slot free
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION @schema@._start_runners(uuid[]) IS
    'Starts pg_background runners for the caller''s batches (every one when p_parents is NULL) where their '
    'caps and the global cap leave room.';

CREATE FUNCTION @schema@._get_runners(p_parents uuid[])
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    -- pg_stat_activity is otherwise frozen for the rest of the transaction.
    PERFORM pg_stat_clear_snapshot();
    IF @schema@._launcher() = 'pg_cron' THEN
        PERFORM @schema@._cron_schedule_runners();
    ELSE
        PERFORM @schema@._start_runners(p_parents);
    END IF;
END
$fn$;
COMMENT ON FUNCTION @schema@._get_runners(uuid[]) IS
    'Starts runners for the caller''s batches where slots are free (pg_cron: schedules runner jobs); every '
    'batch when p_parents is NULL. The runners begin once the calling transaction has ended.';

CREATE FUNCTION @schema@._housekeep(p_parents uuid[])
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM pg_stat_clear_snapshot();
    PERFORM @schema@._settle_orphans(p_parents);
    PERFORM @schema@._get_runners(p_parents);
END
$fn$;
COMMENT ON FUNCTION @schema@._housekeep(uuid[]) IS
    'Settles children of runners that died (see _settle_orphans()) and starts runners for the caller''s '
    'batches where slots are free (see _get_runners()); every batch when p_parents is NULL.';

CREATE FUNCTION @schema@._housekeep(p_parent uuid DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM @schema@._housekeep(CASE WHEN p_parent IS NOT NULL THEN ARRAY[p_parent] END);
END
$fn$;
COMMENT ON FUNCTION @schema@._housekeep(uuid) IS '_housekeep() of one batch, or of every batch when NULL.';

CREATE FUNCTION @schema@._housekeeping_due(p_parents uuid[])
RETURNS boolean
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM pg_stat_clear_snapshot();
    RETURN EXISTS (SELECT 1 FROM @schema@._orphans(p_parents) o WHERE NOT (@schema@._orphan_outcome(o)).running)
        OR (@schema@._global_cap() > @schema@._runners_of(NULL)
            AND (SELECT coalesce(sum(w.wanted), 0) FROM @schema@._runners_wanted(p_parents) w WHERE w.wanted > 0)
                > @schema@._lingerers());
END
$fn$;
COMMENT ON FUNCTION @schema@._housekeeping_due(uuid[]) IS
    'Whether _housekeep() has anything to do for these batches (pg_background).';

CREATE FUNCTION @schema@._housekeep_apart(p_parents uuid[])
RETURNS void
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_pid int;
    v_cookie bigint;
BEGIN
    -- For a caller that stays in its transaction (a wait): what housekeeping writes, and the runners it
    -- starts for it, must not wait for that transaction to end. Done by a worker of its own, in a
    -- transaction that commits at once, and only when there is something to do. Under pg_cron the
    -- runner jobs settle their role's orphans and stay scheduled while work is queued.
    IF @schema@._launcher() <> 'pg_background' THEN
        RETURN;
    ELSIF NOT @schema@._housekeeping_due(p_parents) THEN
        RETURN;
    END IF;
    BEGIN
        SELECT h.pid, h.cookie INTO v_pid, v_cookie
          FROM @pgbg_ext@.pg_background_launch_v2(format('SELECT @schema@._housekeep(%L::uuid[])', p_parents)) h;
    EXCEPTION WHEN insufficient_resources OR configuration_limit_exceeded THEN
        RETURN;  -- no worker slot right now: the next round tries again
    END;
    PERFORM @pgbg_ext@.pg_background_wait_v2(v_pid, v_cookie);
    PERFORM @schema@._top_level_result(v_pid, v_cookie);  -- raises what made it fail, rather than loop on it
END
$fn$;
COMMENT ON FUNCTION @schema@._housekeep_apart(uuid[]) IS
    '_housekeep() in a transaction of its own (a pg_background worker), when it has anything to do: for '
    'callers that wait in one long statement.';
