-- Submitting: validating a batch, recording it and starting its first runners.

CREATE FUNCTION @schema@._one_statement(p_sql text, p_k int)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $fn$
DECLARE
    v_piece text[];
BEGIN
    IF p_sql IS NULL THEN
        RAISE EXCEPTION 'statement % of the batch is NULL', p_k USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF p_sql !~ '[''"$;/-]' THEN
        -- No quote, dollar, comment or semicolon: nothing for the scanner to find (the usual case,
        -- and a hundred times cheaper at 10,000 statements).
        v_piece := ARRAY[@schema@._trim_statement(p_sql)];
        IF v_piece[1] = '' THEN
            v_piece := '{}';
        END IF;
    ELSE
        BEGIN
            v_piece := @schema@.split_statements(p_sql, NULL);
        EXCEPTION WHEN syntax_error THEN
            RAISE EXCEPTION 'statement % of the batch: %', p_k, SQLERRM USING ERRCODE = 'syntax_error';
        END;
    END IF;
    IF cardinality(v_piece) = 0 THEN
        RAISE EXCEPTION 'statement % of the batch holds only blanks or comments', p_k
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN v_piece[1];
END
$fn$;
COMMENT ON FUNCTION @schema@._one_statement(text, int) IS
    'Statement p_k of a batch, trimmed; raises if it is NULL, blank, only comments or unterminated.';

CREATE FUNCTION @schema@._validate_batch(p_querys text[], p_max_parallel int, p_statement_timeout interval)
RETURNS text[]
LANGUAGE plpgsql IMMUTABLE
AS $fn$
BEGIN
    IF p_querys IS NULL OR cardinality(p_querys) = 0 THEN
        RAISE EXCEPTION 'batch is empty: no SQL statement given' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_statement_timeout IS NOT NULL AND p_statement_timeout <= interval '0' THEN
        RAISE EXCEPTION 'p_statement_timeout must be positive, got %', p_statement_timeout
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_max_parallel IS NOT NULL AND p_max_parallel <= 0 THEN
        RAISE EXCEPTION 'p_max_parallel must be a positive number of workers, got %', p_max_parallel
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- One set-based pass (0.1.0 appended to the array one statement at a time). A statement with no
    -- quote, dollar, comment or semicolon is only trimmed, without a call per statement (the fast path of
    -- _one_statement(), which raises for a NULL or blank one).
    RETURN (SELECT array_agg(CASE WHEN q !~ '[''"$;/-]' AND t <> '' THEN t
                                  ELSE @schema@._one_statement(q, k::int) END ORDER BY k)
              FROM unnest(p_querys) WITH ORDINALITY AS u(q, k), @schema@._trim_statement(q) AS t);
END
$fn$;
COMMENT ON FUNCTION @schema@._validate_batch(text[], int, interval) IS
    'Rejects a bad batch before anything is recorded or started; returns the trimmed statements.';

CREATE FUNCTION @schema@._enqueue(p_parent uuid, p_querys text[], p_max_parallel int, p_label text,
                                 p_user_name name, p_ip_client inet, p_settings jsonb,
                                 p_fail_fast boolean, p_statement_timeout interval, p_origin text,
                                 p_retries int, p_retry_delay interval, p_retry_backoff float8,
                                 p_retry_lost boolean, p_claimed_by text, p_requeue_on_takeover boolean)
RETURNS int
LANGUAGE plpgsql
AS $fn$
BEGIN
    IF @schema@._launcher() = 'pg_cron' AND NOT has_schema_privilege('cron', 'USAGE') THEN
        RAISE EXCEPTION 'role % may not schedule pg_cron jobs, which run its batches', current_user
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('GRANT USAGE ON SCHEMA cron TO %I (python -m airflow_pgbg install grants it to pgbg_user).',
                                current_user);
    END IF;
    IF @schema@._launcher() = 'pg_cron' AND @schema@._non_default_settings(p_settings) IS NOT NULL THEN
        -- Early, for the common case; the runner checks again against its own session's default. These
        -- are the statements _cron_job_command() has no command for, found without building one each.
        PERFORM @schema@._cron_refuse_settings(q, p_settings)
           FROM unnest(p_querys) q
          WHERE @schema@._needs_own_worker(q)
          LIMIT 1;
    END IF;
    INSERT INTO @schema@.batch (uuid_parent, label, user_name, ip_client, max_parallel, search_path,
                                fail_fast, statement_timeout, origin, retries, retry_delay, retry_backoff,
                                retry_lost, claimed_by, claimed_at, requeue_on_takeover, session_settings)
    VALUES (p_parent, p_label, p_user_name, p_ip_client, p_max_parallel, p_settings ->> 'search_path',
            p_fail_fast, p_statement_timeout, p_origin, p_retries, coalesce(p_retry_delay, interval '1 second'),
            p_retry_backoff, p_retry_lost, p_claimed_by, CASE WHEN p_claimed_by IS NOT NULL THEN clock_timestamp() END,
            coalesce(p_requeue_on_takeover, false), p_settings);
    IF p_max_parallel > @schema@._global_cap() THEN
        -- Not an error: the batch runs, at most the global cap at a time. It says so.
        UPDATE @schema@.batch
           SET notes = format('max_parallel %s is above the global cap %s (%s): at most %s children run at once',
                              p_max_parallel, @schema@._global_cap(), @schema@._cap_source(), @schema@._global_cap())
         WHERE uuid_parent = p_parent;
        RAISE NOTICE 'batch %: max_parallel % is above the global cap % (%)', p_parent, p_max_parallel,
            @schema@._global_cap(), @schema@._cap_source();
    END IF;
    INSERT INTO @schema@.log_background (uuid_parent, seq, query, label, run_mode, user_name, ip_client)
    SELECT p_parent, q.seq, q.sql, p_label,
           CASE WHEN p_statement_timeout IS NOT NULL OR @schema@._needs_own_worker(q.sql)
                THEN 'worker' ELSE 'inline' END,
           p_user_name, p_ip_client
      FROM unnest(p_querys) WITH ORDINALITY AS q(sql, seq);
    PERFORM @schema@._count(p_parent, current_user, 0, cardinality(p_querys), 0, 0, 0, 0, 0);
    -- Runners only: a new batch has no child whose runner died (looking costs a few ms of the launch).
    PERFORM @schema@._get_runners(ARRAY[p_parent]);
    RETURN cardinality(p_querys);
END
$fn$;
COMMENT ON FUNCTION @schema@._enqueue(uuid, text[], int, text, name, inet, jsonb, boolean, interval, text, int,
                                      interval, float8, boolean, text, boolean) IS
    'Records a validated batch and starts its first runners, which wait for this transaction to commit.';

CREATE FUNCTION @schema@.pg_background_launch_num(
    p_querys text[],
    p_monitor boolean DEFAULT true,
    p_max_parallel int DEFAULT NULL,
    p_label text DEFAULT NULL,
    p_fail_fast boolean DEFAULT false,
    p_statement_timeout interval DEFAULT NULL,
    p_origin text DEFAULT NULL,
    p_retries int DEFAULT 0,
    p_retry_delay interval DEFAULT interval '1 second',
    p_retry_backoff float8 DEFAULT 2,
    p_retry_lost boolean DEFAULT false,
    p_settings jsonb DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_parent uuid := gen_random_uuid();
    v_batch record := @schema@._batch_settings(@schema@._validate_batch(p_querys, p_max_parallel, p_statement_timeout),
                                               p_settings, p_statement_timeout);
    v_querys text[] := v_batch.querys;
    v_statement_timeout interval := v_batch.statement_timeout;
    v_max_parallel int := coalesce(p_max_parallel, @schema@._global_cap());
    v_pid int;
    v_cookie bigint;
    v_deadline timestamptz := clock_timestamp() + interval '60 seconds';
BEGIN
    PERFORM @schema@._validate_retries(p_retries, p_retry_delay, p_retry_backoff);
    IF NOT p_monitor THEN
        -- Queued in the caller's transaction: the batch starts when it commits, and never if it
        -- rolls back.
        PERFORM @schema@._enqueue(v_parent, v_querys, v_max_parallel, p_label,
                                  session_user, inet_client_addr(), v_batch.settings,
                                  p_fail_fast, v_statement_timeout, p_origin,
                                  p_retries, p_retry_delay, p_retry_backoff, coalesce(p_retry_lost, false), NULL, false);
        RETURN v_parent;
    END IF;
    IF @schema@._launcher() = 'pg_cron' THEN
        RAISE EXCEPTION 'p_monitor => true needs the pg_background launcher'
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'Its wait keeps this transaction open, and pg_cron can start the batch only once it is committed.',
                  HINT = 'Launch with p_monitor => false, then SELECT @schema@.pg_background_wait(...) in a statement of its own.';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(v_querys) AS q WHERE @schema@._waits_for_older_snapshots(q)) THEN
        RAISE EXCEPTION 'p_monitor => true cannot wait for a batch with CONCURRENTLY statements'
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'They wait for every older snapshot, including that of the waiting statement.',
                  HINT = 'Launch with p_monitor => false, then CALL @schema@.pg_background_await(...) outside a '
                         'transaction block, or poll pg_background_poll() from short statements.';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'p_monitor => true waits for other transactions and needs READ COMMITTED, not %',
            current_setting('transaction_isolation') USING ERRCODE = 'feature_not_supported';
    END IF;
    -- Waiting here keeps this transaction open, so the batch is queued by a worker of its own that
    -- commits at once; runners could not see rows this transaction has not committed.
    LOOP
        BEGIN
            SELECT h.pid, h.cookie INTO v_pid, v_cookie FROM @pgbg_ext@.pg_background_launch_v2(format(
                'SELECT @schema@._enqueue(%L::uuid, %L::text[], %s, %L, %L, %L::inet, %L::jsonb, %L, %L::interval, %L, '
                '%s, %L::interval, %s, %L, NULL, false)',
                v_parent, v_querys, v_max_parallel, p_label, session_user, inet_client_addr(), v_batch.settings,
                p_fail_fast, v_statement_timeout, p_origin, p_retries, p_retry_delay, p_retry_backoff,
                coalesce(p_retry_lost, false))) h;
            EXIT;
        EXCEPTION WHEN insufficient_resources OR configuration_limit_exceeded THEN
            IF clock_timestamp() > v_deadline THEN
                RAISE EXCEPTION 'no background worker slot came free in 60 s to queue the batch; nothing was queued'
                    USING ERRCODE = 'insufficient_resources',
                          HINT = 'Raise max_worker_processes, or launch with p_monitor => false.';
            END IF;
            PERFORM pg_sleep(0.05);
        END;
    END LOOP;
    PERFORM @pgbg_ext@.pg_background_wait_v2(v_pid, v_cookie);
    PERFORM @schema@._top_level_result(v_pid, v_cookie);  -- raises what made the enqueue fail
    PERFORM @schema@.pg_background_wait(v_parent);
    RETURN v_parent;
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_launch_num(text[], boolean, int, text, boolean, interval, text, int,
                                                      interval, float8, boolean, jsonb) IS
    'Runs each statement of the array as a child of a new batch and returns its parent UUID. '
    'p_max_parallel caps the batch (NULL: the global cap); p_monitor => true returns when the batch has '
    'ended, false at once; p_fail_fast stops the rest after the first final failure; p_statement_timeout '
    'limits each child; p_origin records who asked (Airflow: the task instance); p_retries retries a '
    'child''s transient failures after p_retry_delay, growing by p_retry_backoff, and p_retry_lost also '
    'children lost with their worker; p_settings (a JSON object: work_mem, lock_timeout, search_path, ...) '
    'are set for every child, as are SET statements at the start of the batch (the submitter''s search_path '
    'unless one is given). Bad input raises before anything is recorded.';

CREATE FUNCTION @schema@.pg_background_launch_num(
    p_querys text,
    p_delimiter text DEFAULT ';',
    p_monitor boolean DEFAULT true,
    p_max_parallel int DEFAULT NULL,
    p_label text DEFAULT NULL,
    p_fail_fast boolean DEFAULT false,
    p_statement_timeout interval DEFAULT NULL,
    p_origin text DEFAULT NULL,
    p_retries int DEFAULT 0,
    p_retry_delay interval DEFAULT interval '1 second',
    p_retry_backoff float8 DEFAULT 2,
    p_retry_lost boolean DEFAULT false,
    p_settings jsonb DEFAULT NULL)
RETURNS uuid
LANGUAGE sql
RETURN @schema@.pg_background_launch_num(
    @schema@.split_statements(p_querys, p_delimiter), p_monitor, p_max_parallel, p_label,
    p_fail_fast, p_statement_timeout, p_origin, p_retries, p_retry_delay, p_retry_backoff, p_retry_lost, p_settings);
COMMENT ON FUNCTION @schema@.pg_background_launch_num(text, text, boolean, int, text, boolean, interval, text, int,
                                                      interval, float8, boolean, jsonb) IS
    'The seed''s form: splits p_querys on p_delimiter outside quotes, dollar quotes and comments, then '
    'as the array form.';

CREATE FUNCTION @schema@._take_over(p_parent uuid, p_status @schema@.child_status, p_requeue_running boolean,
                                   p_claimed_by text, p_requeue_on_takeover boolean)
RETURNS text
LANGUAGE plpgsql
AS $fn$
BEGIN
    -- An earlier try's batch that this try finishes: it owns it from now on.
    UPDATE @schema@.batch b
       SET claimed_by = p_claimed_by, claimed_at = clock_timestamp(),
           requeue_on_takeover = coalesce(p_requeue_on_takeover, false)
     WHERE b.uuid_parent = p_parent;
    IF p_status IN ('running', 'queued') AND p_requeue_running THEN
        -- Its holder waited from where only a person ends a wait: a new try means a clear. Running
        -- children are cut short and queued again, as the holder's kill would have.
        PERFORM @schema@._stop(p_parent, NULL, true, 'takeover by ' || p_claimed_by);
    END IF;
    IF p_status IN ('running', 'queued') THEN
        PERFORM @schema@._housekeep(ARRAY[p_parent]);
        RETURN 'reconnected';
    ELSIF p_status = 'done' THEN
        RETURN 'finished';
    END IF;
    PERFORM @schema@.pg_background_retry(p_parent, 'resumed by ' || p_claimed_by);
    RETURN 'resumed';
END
$fn$;
COMMENT ON FUNCTION @schema@._take_over(uuid, @schema@.child_status, boolean, text, boolean) IS
    'pg_background_submit() taking an earlier claim''s batch of its origin over: reconnected (it runs), '
    'finished (it succeeded, nobody took that outcome) or resumed (what did not succeed is queued again).';

CREATE FUNCTION @schema@.pg_background_submit(
    p_querys text[],
    p_origin text,
    p_claimed_by text,
    p_requeue_on_takeover boolean DEFAULT false,
    p_takeover boolean DEFAULT false,
    p_max_parallel int DEFAULT NULL,
    p_label text DEFAULT NULL,
    p_fail_fast boolean DEFAULT false,
    p_statement_timeout interval DEFAULT NULL,
    p_retries int DEFAULT 0,
    p_retry_delay interval DEFAULT interval '1 second',
    p_retry_backoff float8 DEFAULT 2,
    p_retry_lost boolean DEFAULT false,
    p_settings jsonb DEFAULT NULL)
RETURNS TABLE (uuid_parent uuid, action text, claimed_at timestamptz, previous_holder text)
LANGUAGE plpgsql
AS $fn$
#variable_conflict use_column
DECLARE
    v_batch record := @schema@._batch_settings(@schema@._validate_batch(p_querys, p_max_parallel, p_statement_timeout),
                                               p_settings, p_statement_timeout);
    v_querys text[] := v_batch.querys;
    v_prev record;
    v_parent uuid;
    v_status @schema@.child_status;
BEGIN
    PERFORM @schema@._validate_retries(p_retries, p_retry_delay, p_retry_backoff);
    IF p_origin IS NULL OR p_claimed_by IS NULL THEN
        RAISE EXCEPTION 'pg_background_submit() needs p_origin and p_claimed_by'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- One submit per origin at a time: two processes running the same try (a triggerer restart, two
    -- triggerers) must not both launch.
    PERFORM @schema@._lock_role(1 + (hashtext(p_origin) & 1023), true);

    SELECT b.uuid_parent, b.claimed_by, b.claimed_at, b.requeue_on_takeover, b.outcome_taken_by INTO v_prev
      FROM @schema@.batch b
     WHERE b.origin = p_origin AND b.role_name = current_user
     ORDER BY b.created_at DESC
     LIMIT 1;

    IF FOUND AND v_prev.claimed_by = p_claimed_by THEN
        -- Already this claimant's (a restart of the same try): nothing is launched twice.
        RETURN QUERY SELECT v_prev.uuid_parent, 'attached'::text, v_prev.claimed_at, v_prev.claimed_by;
        RETURN;
    END IF;

    IF FOUND
       AND (SELECT array_agg(c.query ORDER BY c.seq) FROM @schema@.log_background c
             WHERE c.uuid_parent = v_prev.uuid_parent) = v_querys THEN
        v_status := @schema@.batch_status(v_prev.uuid_parent);
        -- Only a batch whose success a try took (its task completed: this try is a clear) is run again.
        -- A success nobody took belongs to a try that died before it could: this try takes it.
        IF v_status IS DISTINCT FROM 'done' OR v_prev.outcome_taken_by IS NULL THEN
            -- An earlier try's trigger that still waits would stop what this try resumes: let it go
            -- first. A success is only taken, never stopped.
            IF v_status IS DISTINCT FROM 'done' AND NOT p_takeover
               AND @schema@.pg_background_watched(v_prev.uuid_parent, p_claimed_by) THEN
                RETURN QUERY SELECT v_prev.uuid_parent, 'waiting'::text, v_prev.claimed_at, v_prev.claimed_by;
                RETURN;
            END IF;
            RETURN QUERY SELECT v_prev.uuid_parent,
                                @schema@._take_over(v_prev.uuid_parent, v_status, v_prev.requeue_on_takeover,
                                                    p_claimed_by, p_requeue_on_takeover),
                                clock_timestamp(), v_prev.claimed_by;
            RETURN;
        END IF;
    END IF;

    v_parent := gen_random_uuid();
    PERFORM @schema@._enqueue(v_parent, v_querys, coalesce(p_max_parallel, @schema@._global_cap()), p_label,
                              session_user, inet_client_addr(), v_batch.settings,
                              p_fail_fast, v_batch.statement_timeout, p_origin, p_retries, p_retry_delay, p_retry_backoff,
                              coalesce(p_retry_lost, false), p_claimed_by, p_requeue_on_takeover);
    RETURN QUERY SELECT v_parent, 'launched'::text, clock_timestamp(), NULL::text;
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_submit(text[], text, text, boolean, boolean, int, text, boolean, interval,
                                                  int, interval, float8, boolean, jsonb) IS
    'Idempotent submit for a waiter identified by p_origin (what asks, e.g. an Airflow task instance) and '
    'p_claimed_by (which attempt, e.g. its try). Returns the batch and what happened: attached (this claim '
    'already holds the latest batch of p_origin), waiting (that batch has not succeeded and another claim''s '
    'waiter still watches it; call again, or with p_takeover), reconnected (still running, now claimed; '
    'if its holder had p_requeue_on_takeover, running children were stopped and queued again), finished '
    '(it succeeded and no claim took that outcome with pg_background_take_outcome(): now claimed, nothing '
    'runs again), resumed (ended without success: failed, lost and stopped children queued again, done '
    'ones kept) or launched (a new batch: the latest one''s success was taken by another claim, whose task '
    'completed, or it holds other statements).';
