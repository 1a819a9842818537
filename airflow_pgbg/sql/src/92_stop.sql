-- Stopping, claiming, retrying and purging batches.

CREATE FUNCTION @schema@._signal(p_parent uuid, p_role name, p_children uuid[], p_pids int[], p_whole_batch boolean)
RETURNS int
LANGUAGE sql
AS $fn$
    -- Only processes that say by themselves that they work for this batch are signalled: background
    -- workers (pg_background's, or pg_cron's) of the batch's role named after one of its children (a
    -- nested worker) or after the batch (a runner; under pg_cron it passes the stop on to the job
    -- that runs its child at top level). pid and backend_start in log_background are columns the role may write: they only
    -- choose among the batch's own runners, and a stop of the whole batch does not need them.
    SELECT count(*) FILTER (WHERE pg_cancel_backend(a.pid))::int
      FROM pg_stat_activity a
     WHERE a.backend_type IN ('pg_background', 'pg_cron')
       AND a.pid <> pg_backend_pid()  -- a runner stopping its batch (fail_fast) goes on to record it
       AND a.usesysid = (SELECT oid FROM pg_roles WHERE rolname = p_role)
       AND (a.application_name = ANY (SELECT 'pgbg-child:' || c FROM unnest(p_children) c)
            OR (a.application_name = 'pgbg:' || p_parent AND (p_whole_batch OR a.pid = ANY (p_pids))))
$fn$;
COMMENT ON FUNCTION @schema@._signal(uuid, name, uuid[], int[], boolean) IS
    'Cancels the engine processes executing running children of a batch, identified by what each process '
    'reports about itself (backend type, role, name), never by a pid alone; every runner of the batch '
    'when the whole batch stops.';

CREATE FUNCTION @schema@._stop(uuid_father_or_child uuid, p_reason text, p_requeue boolean, p_stopped_by text)
RETURNS int
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_stopped int := 0;
    v_parent uuid;
    v_is_batch boolean;
    v_workers uuid[];
    v_pids int[];
    v_role name;
    v_new int;
BEGIN
    SELECT b.uuid_parent INTO v_parent FROM @schema@.batch b WHERE b.uuid_parent = uuid_father_or_child;
    v_is_batch := FOUND;
    IF NOT v_is_batch THEN
        SELECT c.uuid_parent INTO v_parent FROM @schema@.log_background c WHERE c.uuid_child = uuid_father_or_child;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'no batch or child with uuid %', uuid_father_or_child
                USING ERRCODE = 'no_data_found', HINT = 'A role sees and stops only its own batches.';
        END IF;
    END IF;
    IF v_is_batch AND NOT p_requeue THEN
        UPDATE @schema@.batch SET stop_requested_at = coalesce(stop_requested_at, clock_timestamp()),
                                  stop_requested_by = coalesce(stop_requested_by, p_stopped_by)
         WHERE uuid_parent = v_parent;
    END IF;

    -- Queued children never start: runners skip locked rows and find them stopped after commit. A
    -- takeover (p_requeue) leaves them queued for the new holder.
    IF NOT p_requeue THEN
        WITH s AS (
            UPDATE @schema@.log_background
               SET status = 'stopped', end_time_exec = clock_timestamp(), error = p_reason, stopped_by = p_stopped_by,
                   not_before = NULL
             WHERE status = 'queued'
               AND (uuid_parent = uuid_father_or_child OR uuid_child = uuid_father_or_child)
            RETURNING role_name)
        SELECT count(*) INTO v_stopped FROM s;
        IF v_stopped > 0 THEN
            PERFORM @schema@._count(v_parent, (SELECT role_name FROM @schema@.batch WHERE uuid_parent = v_parent),
                                    -pg_backend_pid(), -v_stopped, 0, 0, 0, v_stopped, 0, NULL, clock_timestamp());
        END IF;
    END IF;

    -- Running children: the row lock taken here keeps a runner on its child (it must update the
    -- row to leave it) until this transaction ends, so the cancel cannot hit its next child.
    WITH s AS (
        UPDATE @schema@.log_background c
           SET stop_requested = true, requeue_on_stop = p_requeue, stopped_by = p_stopped_by
          FROM (SELECT id, stop_requested AS was_requested FROM @schema@.log_background
                 WHERE status = 'running'
                   AND (uuid_parent = uuid_father_or_child OR uuid_child = uuid_father_or_child)
                 FOR UPDATE) p
         WHERE c.id = p.id AND c.status = 'running'
        RETURNING c.uuid_child, c.run_mode, c.pid, c.role_name, p.was_requested)
    SELECT coalesce(array_agg(uuid_child) FILTER (WHERE run_mode = 'worker'), '{}'),
           coalesce(array_agg(pid), '{}'), min(role_name), count(*) FILTER (WHERE NOT was_requested)
      INTO v_workers, v_pids, v_role, v_new FROM s;
    IF v_role IS NOT NULL THEN
        PERFORM pg_stat_clear_snapshot();
        PERFORM @schema@._signal(v_parent, v_role, v_workers, v_pids, v_is_batch);
        v_stopped := v_stopped + v_new;
    END IF;
    PERFORM @schema@._notify_if_ended(ARRAY[v_parent]);
    RETURN v_stopped;
END
$fn$;
COMMENT ON FUNCTION @schema@._stop(uuid, text, boolean, text) IS
    'Stops a batch or one child, recording p_reason on the queued children it stops and p_stopped_by on '
    'all; with p_requeue (a takeover), running children are cancelled and queued again and queued ones '
    'stay queued.';

CREATE FUNCTION @schema@._stop(uuid_father_or_child uuid, p_reason text)
RETURNS int
LANGUAGE sql
RETURN @schema@._stop(uuid_father_or_child, p_reason, false, NULL);
COMMENT ON FUNCTION @schema@._stop(uuid, text) IS 'The stop of engine 0.1.0 (its fail_fast), kept for its runners.';

CREATE FUNCTION @schema@.pg_background_stop(uuid_father_or_child uuid)
RETURNS int
LANGUAGE sql
RETURN @schema@._stop(uuid_father_or_child, 'stopped by pg_background_stop() before it started', false, NULL);
COMMENT ON FUNCTION @schema@.pg_background_stop(uuid) IS
    'Stops a whole batch (queued children never start, running ones are cancelled) or one child, and '
    'returns how many children it stopped; 0 when there is nothing left to stop. Raises for a UUID the '
    'caller cannot see.';

CREATE FUNCTION @schema@.pg_background_stop(uuid_father_or_child uuid, p_if_claimed_by text)
RETURNS int
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_holder text;
BEGIN
    -- The row lock orders this against pg_background_claim(): a newer holder's claim waits for this
    -- stop, and a stop after the claim sees the new holder and leaves the batch alone.
    SELECT b.claimed_by INTO v_holder FROM @schema@.batch b
     WHERE b.uuid_parent = uuid_father_or_child
        OR b.uuid_parent = (SELECT c.uuid_parent FROM @schema@.log_background c
                             WHERE c.uuid_child = uuid_father_or_child)
       FOR UPDATE;
    IF FOUND AND v_holder IS DISTINCT FROM p_if_claimed_by THEN
        RETURN 0;
    END IF;
    RETURN @schema@.pg_background_stop(uuid_father_or_child);
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_stop(uuid, text) IS
    'pg_background_stop() only while the batch is still claimed by p_if_claimed_by; 0 otherwise.';

CREATE FUNCTION @schema@.pg_background_stop(uuid_father_or_child uuid, p_if_claimed_by text, p_stopped_by text)
RETURNS int
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_holder text;
BEGIN
    -- The row lock orders this against pg_background_claim(): a newer holder's claim waits for this
    -- stop, and a stop after the claim sees the new holder and leaves the batch alone.
    SELECT b.claimed_by INTO v_holder FROM @schema@.batch b
     WHERE b.uuid_parent = uuid_father_or_child
        OR b.uuid_parent = (SELECT c.uuid_parent FROM @schema@.log_background c
                             WHERE c.uuid_child = uuid_father_or_child)
       FOR UPDATE;
    IF FOUND AND p_if_claimed_by IS NOT NULL AND v_holder IS DISTINCT FROM p_if_claimed_by THEN
        RETURN 0;
    END IF;
    RETURN @schema@._stop(uuid_father_or_child,
                          'stopped' || coalesce(' by ' || p_stopped_by, ' by pg_background_stop()') || ' before it started',
                          false, p_stopped_by);
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_stop(uuid, text, text) IS
    'pg_background_stop(), only while the batch is still claimed by p_if_claimed_by (unless NULL), '
    'recording who asked (p_stopped_by, free text); 0 when the batch has another holder.';

CREATE FUNCTION @schema@.pg_background_claim(uuid_father uuid, p_claimed_by text)
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    UPDATE @schema@.batch SET claimed_by = p_claimed_by, claimed_at = clock_timestamp()
     WHERE uuid_parent = uuid_father;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no batch with uuid %', uuid_father USING ERRCODE = 'no_data_found';
    END IF;
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_claim(uuid, text) IS
    'Records who now owns the batch, e.g. the Airflow try that resumed it, so that a late kill of an '
    'earlier try (pg_background_stop(uuid, its claim)) does not stop the work the new one waits for.';

CREATE FUNCTION @schema@.pg_background_retry(uuid_father uuid, p_requested_by text)
RETURNS int
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_role name;
    v_q bigint; v_f bigint; v_s bigint; v_l bigint;
BEGIN
    SELECT role_name INTO v_role FROM @schema@.batch WHERE uuid_parent = uuid_father AND role_name = current_user;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no batch with uuid % submitted by %', uuid_father, current_user
            USING ERRCODE = 'no_data_found', HINT = 'Children run as the role that submitted them; only it can retry.';
    END IF;
    -- New runners wait for this transaction, as for the one that queued the batch.
    -- What runs again has an outcome of its own, for the next claim to take.
    UPDATE @schema@.batch SET stop_requested_at = NULL, stop_requested_by = NULL, enqueue_xid = pg_current_xact_id(),
                              outcome_taken_by = NULL, outcome_taken_at = NULL
     WHERE uuid_parent = uuid_father;
    -- done children stay done: a retry runs only what did not succeed. Earlier attempts stay in errors.
    WITH r AS (
        UPDATE @schema@.log_background c
           SET status = 'queued', pid = NULL, backend_start = NULL, result = NULL,
               start_time_exec = NULL, end_time_exec = NULL, stop_requested = false, requeue_on_stop = false,
               not_before = NULL, failures = 0, interruptions = 0, stopped_by = NULL,
               sqlstate = NULL, error = NULL, error_detail = NULL, error_hint = NULL, error_context = NULL
          FROM (SELECT id, status AS was FROM @schema@.log_background
                 WHERE uuid_parent = uuid_father AND status IN ('failed', 'lost', 'stopped') FOR UPDATE) p
         WHERE c.id = p.id
        RETURNING p.was)
    SELECT count(*), count(*) FILTER (WHERE was = 'failed'), count(*) FILTER (WHERE was = 'stopped'),
           count(*) FILTER (WHERE was = 'lost')
      INTO v_q, v_f, v_s, v_l FROM r;
    IF v_q > 0 THEN
        PERFORM @schema@._count(uuid_father, v_role, -pg_backend_pid(), v_q, 0, 0, -v_f, -v_s, -v_l);
        -- Who queued them again, and when: the batch's notes are what the console shows of its history.
        UPDATE @schema@.batch
           SET notes = concat_ws(E'\n', notes, format('%s children queued again by %s at %s', v_q,
                                 coalesce(p_requested_by, current_user::text),
                                 to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"')))
         WHERE uuid_parent = uuid_father;
    END IF;
    PERFORM @schema@._housekeep(ARRAY[uuid_father]);
    RETURN v_q;
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_retry(uuid, text) IS
    'Queues again the failed, lost and stopped children of one of the caller''s batches (done children '
    'are not run again) and starts runners; returns how many were queued. Who asked (p_requested_by, '
    'free text; else the role) and when goes into the batch''s notes.';

CREATE FUNCTION @schema@.pg_background_retry(uuid_father uuid)
RETURNS int
LANGUAGE sql
RETURN @schema@.pg_background_retry(uuid_father, NULL);
COMMENT ON FUNCTION @schema@.pg_background_retry(uuid) IS
    'Queues again the failed, lost and stopped children of one of the caller''s batches (done children '
    'are not run again) and starts runners; returns how many were queued. attempt counts the tries.';

CREATE FUNCTION @schema@.pg_background_purge(p_older_than interval DEFAULT interval '30 days')
RETURNS bigint
LANGUAGE sql
AS $fn$
    WITH gone AS (
        DELETE FROM @schema@.batch b
         WHERE b.created_at < clock_timestamp() - p_older_than
           AND NOT EXISTS (SELECT 1 FROM @schema@.log_background c
                            WHERE c.uuid_parent = b.uuid_parent AND c.status IN ('queued', 'running'))
        RETURNING 1)
    SELECT count(*) FROM gone
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_purge(interval) IS
    'Deletes the caller''s finished batches (all finished batches for pgbg_admin) older than p_older_than.';
