-- Housekeeping: children of runners that died, and runners where slots are free.

CREATE FUNCTION @schema@._housekeep(p_parents uuid[])
RETURNS void
LANGUAGE plpgsql
AS $fn$
DECLARE
    b record;
    r record;
    v_touched uuid[];
    v_free_global int;
    v_want int;
    v_started int;
BEGIN
    -- pg_stat_activity is otherwise frozen for the rest of the transaction.
    PERFORM pg_stat_clear_snapshot();
    IF @schema@._launcher() = 'pg_cron' THEN
        -- Ordered against a runner job that is deciding to unschedule itself (_cron_runner()).
        PERFORM pg_advisory_xact_lock_shared(@schema@._role_key());
    END IF;

    -- A running child whose runner is gone (same pid with the same backend_start) has no one left
    -- to record its outcome. Rows locked by someone else are left to that someone.
    FOR r IN
        WITH gone AS (
            SELECT x.id FROM @schema@.log_background x
             WHERE x.status = 'running'
               AND (p_parents IS NULL OR x.uuid_parent = ANY (p_parents))
               AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                                WHERE a.pid = x.pid AND (a.backend_start = x.backend_start OR a.backend_start IS NULL))
               FOR UPDATE OF x SKIP LOCKED),
        settled AS (
            UPDATE @schema@.log_background c
               SET status = CASE WHEN c.stop_requested AND c.requeue_on_stop THEN 'queued'
                                 WHEN c.stop_requested THEN 'stopped'
                                 WHEN bt.retry_lost AND c.failures < bt.retries THEN 'queued'
                                 ELSE 'lost' END::@schema@.child_status,
                   end_time_exec = clock_timestamp(),
                   error = CASE WHEN c.stop_requested AND c.requeue_on_stop
                                THEN 'cut short and queued again: ' || coalesce(c.stopped_by, 'takeover')
                                WHEN c.stop_requested THEN 'stopped by pg_background_stop()'
                                ELSE 'worker process ended without recording an outcome '
                                     '(terminated, crashed or server restarted)' END,
                   failures = c.failures + (NOT c.stop_requested)::int,
                   not_before = CASE WHEN NOT c.stop_requested AND bt.retry_lost AND c.failures < bt.retries
                                     THEN @schema@._retry_at(bt.retry_delay, bt.retry_backoff, c.failures) END,
                   errors = CASE WHEN c.stop_requested THEN c.errors
                                 ELSE coalesce(c.errors, '[]') || @schema@._attempt_error(
                                     c.attempt, 'lost', NULL, 'worker process ended without recording an outcome') END
              FROM gone, @schema@.batch bt
             WHERE c.id = gone.id AND bt.uuid_parent = c.uuid_parent
            RETURNING c.uuid_parent, c.role_name, c.status)
        SELECT s.uuid_parent, s.role_name, count(*) AS n, count(*) FILTER (WHERE s.status = 'queued') AS queued,
               count(*) FILTER (WHERE s.status = 'stopped') AS stopped, count(*) FILTER (WHERE s.status = 'lost') AS lost
          FROM settled s GROUP BY s.uuid_parent, s.role_name
    LOOP
        PERFORM @schema@._count(r.uuid_parent, r.role_name, -pg_backend_pid(), r.queued, -r.n, 0, 0, r.stopped, r.lost,
                                NULL, clock_timestamp());
        v_touched := v_touched || r.uuid_parent;
    END LOOP;
    IF v_touched IS NOT NULL THEN
        PERFORM @schema@._notify_if_ended(v_touched);
    END IF;

    -- Start runners where slots are free. Only for the caller's own batches: a runner runs as the
    -- role that starts it, and children must run as the role that submitted them.
    IF @schema@._launcher() = 'pg_cron' THEN
        -- A child's job whose runner is gone (its child settled above) must not run again.
        PERFORM cron.unschedule(j.jobid) FROM cron.job j
         WHERE starts_with(j.jobname, 'pgbg_child:')
           AND NOT EXISTS (SELECT 1 FROM @schema@.log_background c
                            WHERE c.uuid_child::text = substr(j.jobname, 12) AND c.status = 'running');
        -- Runner jobs pick any batch of their role: as many as its batches can use, up to the cap.
        PERFORM @schema@._cron_ensure_runners((
            SELECT least(@schema@._global_cap(), coalesce(sum(least(n.queued + n.running, bt.max_parallel)), 0))::int
              FROM @schema@.batch bt
             CROSS JOIN LATERAL @schema@._batch_counts(bt.uuid_parent, bt.counted) n
             WHERE bt.role_name = current_user AND bt.stop_requested_at IS NULL AND n.queued > 0));
        RETURN;
    END IF;
    -- Runners still starting up hold no lock yet but already carry their batch's name, so both are
    -- counted.
    v_free_global := @schema@._global_cap()
        - greatest(@schema@._slots_held(@schema@._global_lock_key()),
                   (SELECT count(*)::int FROM pg_stat_activity
                     WHERE application_name LIKE 'pgbg:%-%' AND datname = current_database()));
    IF v_free_global <= 0 THEN
        RETURN;
    END IF;
    FOR b IN
        WITH held AS (
            SELECT l.classid::bigint AS key, count(*)::int AS n FROM pg_locks l
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
             GROUP BY l.classid),
        named AS (
            SELECT a.application_name, count(*)::int AS n FROM pg_stat_activity a
             WHERE a.application_name LIKE 'pgbg:%-%' AND a.datname = current_database()
             GROUP BY a.application_name)
        SELECT bt.uuid_parent, bt.max_parallel, bt.enqueue_xid, n.queued,
               greatest(coalesce(h.n, 0), coalesce(nm.n, 0)) AS active
          FROM @schema@.batch bt
          CROSS JOIN LATERAL @schema@._batch_counts(bt.uuid_parent, bt.counted) n
          LEFT JOIN held h ON h.key = @schema@._batch_lock_key(bt.uuid_parent)
          LEFT JOIN named nm ON nm.application_name = 'pgbg:' || bt.uuid_parent
         WHERE bt.role_name = current_user AND bt.stop_requested_at IS NULL
           AND (p_parents IS NULL OR bt.uuid_parent = ANY (p_parents))
           AND n.queued > 0
         ORDER BY bt.created_at
    LOOP
        v_want := least(b.queued, b.max_parallel - b.active, v_free_global)::int;
        CONTINUE WHEN v_want <= 0;
        v_started := @schema@._launch_runners(b.uuid_parent, b.enqueue_xid, v_want);
        v_free_global := v_free_global - v_started;
        EXIT WHEN v_started < v_want OR v_free_global <= 0;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION @schema@._housekeep(uuid[]) IS
    'Settles children of dead workers (lost, or queued again when the batch retries lost children) and '
    'starts runners for the caller''s batches where slots are free (pg_cron: schedules runner jobs); every '
    'batch when p_parents is NULL. Run by every poll, monitor, wait and launch call, so polling is enough '
    'to drive a batch.';

CREATE FUNCTION @schema@._housekeep(p_parent uuid DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM @schema@._housekeep(CASE WHEN p_parent IS NOT NULL THEN ARRAY[p_parent] END);
END
$fn$;
COMMENT ON FUNCTION @schema@._housekeep(uuid) IS
    'Marks children of dead workers lost and starts runners for the caller''s batches where slots are '
    'free. Run by every monitor, wait and launch call, so polling is enough to drive a batch.';
