-- Watching, polling and waiting.

CREATE FUNCTION @schema@._watch_key(p_parent uuid)
RETURNS int
LANGUAGE sql IMMUTABLE
RETURN hashtext('@schema@/watch/' || p_parent::text) & 2147483647;
COMMENT ON FUNCTION @schema@._watch_key(uuid) IS 'Advisory lock key under which sessions watch a batch.';

CREATE FUNCTION @schema@._claim_key(p_claimed_by text)
RETURNS int
LANGUAGE sql IMMUTABLE
RETURN hashtext(coalesce(p_claimed_by, '')) & 2147483647;
COMMENT ON FUNCTION @schema@._claim_key(text) IS 'Second half of a watch lock: which claim the session watches for.';

CREATE FUNCTION @schema@.pg_background_watch(uuid_fathers uuid[], p_claims text[])
RETURNS int
LANGUAGE sql
AS $fn$
    SELECT count(*) FILTER (WHERE pg_try_advisory_lock(@schema@._watch_key(w.parent), @schema@._claim_key(w.claim)))::int
      FROM unnest(uuid_fathers, p_claims) AS w(parent, claim)
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_watch(uuid[], text[]) IS
    'This session waits for these batches on behalf of these claims: a session advisory lock per pair, '
    'released by pg_background_unwatch() or when the session ends. Returns how many it took (a pair '
    'already held by another session is not taken again).';

CREATE FUNCTION @schema@.pg_background_unwatch(uuid_fathers uuid[], p_claims text[])
RETURNS int
LANGUAGE sql
AS $fn$
    SELECT count(*) FILTER (WHERE pg_advisory_unlock(@schema@._watch_key(w.parent), @schema@._claim_key(w.claim)))::int
      FROM unnest(uuid_fathers, p_claims) AS w(parent, claim)
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_unwatch(uuid[], text[]) IS 'Ends pg_background_watch() for these pairs.';

CREATE FUNCTION @schema@.pg_background_watched(uuid_father uuid, p_except_claim text DEFAULT NULL)
RETURNS boolean
LANGUAGE sql VOLATILE
AS $fn$
    SELECT EXISTS (
               SELECT 1 FROM pg_locks l
                WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                  AND l.classid = @schema@._watch_key(uuid_father)::oid
                  AND (p_except_claim IS NULL OR l.objid <> @schema@._claim_key(p_except_claim)::oid))
        -- Waiters without a session of their own (behind a pooler) keep a heartbeat instead.
        OR @schema@._heartbeat_watched(uuid_father, p_except_claim)
        -- Triggers of airflow_pgbg 0.1.0 named their connection instead.
        OR EXISTS (
               SELECT 1 FROM pg_stat_activity a
                WHERE a.application_name LIKE 'pgbg-trigger:' || uuid_father || ':%'
                  AND a.application_name IS DISTINCT FROM 'pgbg-trigger:' || uuid_father || ':' || p_except_claim)
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_watched(uuid, text) IS
    'Whether a live session (a watch lock) or a live heartbeat waiter waits for the batch on behalf of a '
    'claim other than p_except_claim.';

CREATE FUNCTION @schema@.pg_background_poll_many(uuid_fathers uuid[])
RETURNS SETOF @schema@.batches
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM @schema@._housekeep(uuid_fathers);
    RETURN QUERY SELECT * FROM @schema@.batches WHERE uuid_parent = ANY (uuid_fathers);
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_poll_many(uuid[]) IS
    'A watcher''s round trip for many batches: the housekeeping of those batches, then their rows of '
    'the batches view. Batches the caller cannot see, or that do not exist, have no row.';

CREATE FUNCTION @schema@._holds_back(p_parent uuid)
RETURNS boolean
LANGUAGE sql STABLE
RETURN EXISTS (SELECT 1 FROM @schema@.log_background x
                WHERE x.uuid_parent = p_parent AND x.status IN ('queued', 'running') AND x.run_mode = 'worker'
                  AND @schema@._waits_for_older_snapshots(x.query));
COMMENT ON FUNCTION @schema@._holds_back(uuid) IS
    'Whether a child of the batch still to run waits for every older snapshot: a statement that waits for '
    'the batch would hold it back.';

CREATE FUNCTION @schema@._await_end(p_parent uuid, p_deadline timestamptz, p_apart boolean)
RETURNS @schema@.child_status
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_status @schema@.child_status;
    v_nap float8 := 0.005;
BEGIN
    LOOP
        IF p_apart THEN
            PERFORM @schema@._housekeep_apart(ARRAY[p_parent]);
        END IF;
        v_status := @schema@.batch_status(p_parent);
        EXIT WHEN v_status IS NULL OR v_status NOT IN ('queued', 'running') OR clock_timestamp() >= p_deadline;
        -- Without a deadline, the nap (greatest() skips a NULL: the wait polled every millisecond).
        PERFORM pg_sleep(least(v_nap, greatest(coalesce(extract(epoch FROM p_deadline - clock_timestamp()), v_nap), 0.001)));
        v_nap := least(v_nap * 2, 0.2);
    END LOOP;
    RETURN v_status;
END
$fn$;
COMMENT ON FUNCTION @schema@._await_end(uuid, timestamptz, boolean) IS
    'Waits in the calling statement until the batch has ended or p_deadline (NULL: no limit) has passed; '
    'its status then. p_apart: housekeeping in transactions of its own meanwhile.';

CREATE FUNCTION @schema@.pg_background_poll(uuid_father uuid, p_wait interval DEFAULT NULL)
RETURNS SETOF @schema@.batches
LANGUAGE plpgsql
AS $fn$
BEGIN
    -- Waiting here (rather than sleeping in the poller) notices the end within milliseconds. A batch
    -- that a waiting statement would hold back (see _holds_back()) is not waited for: its poller
    -- waits between calls.
    IF coalesce(p_wait, interval '0') <= interval '0' OR @schema@._holds_back(uuid_father) THEN
        PERFORM @schema@._housekeep(ARRAY[uuid_father]);
    ELSE
        PERFORM @schema@._await_end(uuid_father, clock_timestamp() + p_wait, true);
    END IF;
    RETURN QUERY SELECT * FROM @schema@.batches WHERE uuid_parent = uuid_father;
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_poll(uuid, interval) IS
    'What a poller needs in one round trip: the housekeeping of pg_background_monitor() and the batch''s '
    'row of the batches view (status and counts), without the child rows; with p_wait, first waits up to '
    'that long for the batch to end, unless a child still to run waits for every older snapshot (CREATE '
    'INDEX, REINDEX or DETACH PARTITION CONCURRENTLY), which the wait would hold back: then the poller '
    'waits between calls. No row for an unknown batch.';

CREATE FUNCTION @schema@._wait_checks(p_parent uuid, p_form text)
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM @schema@.batch WHERE uuid_parent = p_parent) THEN
        RAISE EXCEPTION 'no batch with uuid %', p_parent USING ERRCODE = 'no_data_found',
            HINT = 'A role sees only its own batches.';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION '%() needs READ COMMITTED, not %', p_form, current_setting('transaction_isolation')
            USING ERRCODE = 'feature_not_supported';
    END IF;
END
$fn$;
COMMENT ON FUNCTION @schema@._wait_checks(uuid, text) IS 'What a wait refuses before it starts.';

CREATE FUNCTION @schema@.pg_background_wait(uuid_father uuid, p_timeout interval DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_status @schema@.child_status;
BEGIN
    PERFORM @schema@._wait_checks(uuid_father, 'pg_background_wait');
    IF @schema@._holds_back(uuid_father) THEN
        RAISE EXCEPTION 'pg_background_wait() would hold back batch %: a statement of it waits for every older snapshot',
            uuid_father
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'CREATE INDEX, REINDEX and DETACH PARTITION CONCURRENTLY wait for every older snapshot, '
                           'including that of the statement waiting for them.',
                  HINT = format('Outside a transaction block, CALL %s.pg_background_await(%L, %L, NULL) waits '
                                'without holding one; or poll %s.pg_background_poll() from short statements.',
                                '@schema@', uuid_father, p_timeout, '@schema@');
    END IF;
    -- Housekeeping apart: runners started from this statement's transaction would wait for its end.
    v_status := @schema@._await_end(uuid_father, clock_timestamp() + p_timeout, true);
    RETURN CASE WHEN v_status NOT IN ('queued', 'running') THEN v_status::text END;
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_wait(uuid, interval) IS
    'Waits until every child of the batch has ended and returns the batch status (done, failed, lost, '
    'stopped); NULL when p_timeout passes first. The batch keeps running either way. Refuses a batch it '
    'would hold back (see pg_background_await()).';

CREATE PROCEDURE @schema@.pg_background_await(uuid_father uuid, p_timeout interval DEFAULT NULL,
                                              INOUT status text DEFAULT NULL)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_deadline timestamptz := clock_timestamp() + p_timeout;
    v_nap float8 := 0.005;
BEGIN
    PERFORM @schema@._wait_checks(uuid_father, 'pg_background_await');
    -- Each check is a transaction of its own: no snapshot is held in between, so statements of the batch
    -- that wait for every older snapshot do not wait for this one. (In a transaction block, the first
    -- COMMIT raises "invalid transaction termination".)
    LOOP
        PERFORM @schema@._housekeep(ARRAY[uuid_father]);
        status := @schema@.batch_status(uuid_father);
        COMMIT;
        IF status NOT IN ('queued', 'running') THEN
            RETURN;
        ELSIF clock_timestamp() >= v_deadline THEN
            status := NULL;
            RETURN;
        END IF;
        PERFORM pg_sleep(least(v_nap, greatest(coalesce(extract(epoch FROM v_deadline - clock_timestamp()), v_nap), 0.001)));
        COMMIT;
        v_nap := least(v_nap * 2, 0.2);
    END LOOP;
END
$fn$;
COMMENT ON PROCEDURE @schema@.pg_background_await(uuid, interval, text) IS
    'pg_background_wait() as a procedure that commits between its checks (CALL it outside a transaction '
    'block): it holds no snapshot while it waits, so it never holds back a batch''s CREATE INDEX, REINDEX or '
    'DETACH PARTITION CONCURRENTLY. status: done, failed, lost, stopped, or NULL when p_timeout passed first.';

CREATE FUNCTION @schema@.pg_background_monitor(uuid_father uuid DEFAULT NULL, p_show_verbose boolean DEFAULT true)
RETURNS SETOF @schema@.monitor_row
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM @schema@._housekeep(CASE WHEN uuid_father IS NOT NULL THEN ARRAY[uuid_father] END);
    RETURN QUERY
    SELECT c.uuid_parent, c.uuid_child, c.seq, c.label, c.pid, c.status,
           CASE WHEN p_show_verbose THEN c.query ELSE left(c.query, 80) END,
           CASE WHEN p_show_verbose THEN c.result ELSE c.result - 'preview' END,
           c.error, c.sqlstate, c.queued_time, c.start_time_exec, c.end_time_exec,
           CASE WHEN c.start_time_exec IS NOT NULL
                THEN coalesce(c.end_time_exec, clock_timestamp()) - c.start_time_exec END,
           c.attempt, c.user_name, c.run_mode, c.not_before, c.errors
      FROM @schema@.log_background c
      JOIN @schema@.batch b USING (uuid_parent)
     WHERE uuid_father IS NULL OR c.uuid_parent = uuid_father
     ORDER BY b.created_at, c.uuid_parent, c.seq;
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_monitor(uuid, boolean) IS
    'One row per child of the batch (every batch the caller may see when NULL). Also does the '
    'housekeeping, so polling it drives a batch to its end. p_show_verbose => false shortens the query '
    'and leaves out the result preview.';
