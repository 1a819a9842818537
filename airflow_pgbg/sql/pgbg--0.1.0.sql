-- airflow_pgbg engine, version 0.1.0: batches of SQL statements run by pg_background workers.
--
-- Rendered by the installer (python -m airflow_pgbg install): @schema@ becomes the target schema
-- and @pgbg_ext@ the schema holding the pg_background extension (2.x, "v2" API).
--
-- How a batch runs. pg_background_launch_num() records the batch and its children (one row per
-- statement in log_background, status 'queued') and starts up to max_parallel *runners*: workers
-- running the procedure _runner(). A runner holds one slot (a session advisory lock) and loops:
-- claim the next queued child (FOR UPDATE SKIP LOCKED), commit 'running', execute the statement,
-- record its outcome in the same transaction as its work, commit. So a freed slot is refilled by
-- the runner itself within milliseconds, nobody needs to poll, and the launching session may
-- disconnect. Statements that cannot run inside a function or a transaction block (VACUUM,
-- CREATE INDEX CONCURRENTLY, CALL of a procedure that commits, ...) are handed by the runner to a
-- nested worker of their own, where they run as a top-level statement.
--
-- There is no SECURITY DEFINER here: runners and nested workers run as the role that submitted the
-- batch, row-level security limits every role to its own batches, and pgbg_admin sees all.
--
-- Seed status words map onto the vocabulary as: running -> running, sleep -> queued,
-- stop -> stopped; done / failed / lost are new (the seed recorded no outcome).

CREATE TABLE @schema@.meta (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version text NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE @schema@.meta IS 'Engine version installed in this schema; maintained by the installer.';

-- The single definition of the child status vocabulary; airflow_pgbg.status mirrors it and a test
-- compares the two.
CREATE TYPE @schema@.child_status AS ENUM ('queued', 'running', 'done', 'failed', 'stopped', 'lost');
COMMENT ON TYPE @schema@.child_status IS
    'queued: waiting for a slot; running: a worker is executing it; done / failed: outcome recorded '
    'with the work; stopped: pg_background_stop() reached it; lost: its worker ended without recording '
    'an outcome (terminated, crashed, server restart).';

CREATE TABLE @schema@.settings (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    max_workers int CHECK (max_workers > 0),
    preview_rows int NOT NULL DEFAULT 100 CHECK (preview_rows >= 0),
    preview_bytes int NOT NULL DEFAULT 65536 CHECK (preview_bytes >= 0)
);
COMMENT ON TABLE @schema@.settings IS 'Engine-wide settings; only pgbg_admin may change them.';
COMMENT ON COLUMN @schema@.settings.max_workers IS
    'Global cap on runners across all batches of this database. NULL: (max_worker_processes - 2) / 2, '
    'because a runner may need a second worker for a top-level statement and the server needs headroom.';
INSERT INTO @schema@.settings DEFAULT VALUES;

CREATE TABLE @schema@.batch (
    uuid_parent uuid PRIMARY KEY,
    label text,
    origin text,
    claimed_by text,
    role_name name NOT NULL DEFAULT current_user,
    user_name name NOT NULL DEFAULT session_user,
    ip_client inet DEFAULT inet_client_addr(),
    max_parallel int NOT NULL CHECK (max_parallel > 0),
    fail_fast boolean NOT NULL DEFAULT false,
    statement_timeout interval CHECK (statement_timeout > interval '0'),
    search_path text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    enqueue_xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    stop_requested_at timestamptz
);
COMMENT ON TABLE @schema@.batch IS 'One row per batch (parent UUID): who submitted it and how it runs.';
CREATE INDEX ON @schema@.batch (origin, created_at) WHERE origin IS NOT NULL;
COMMENT ON COLUMN @schema@.batch.origin IS
    'Who asked for the batch, e.g. the Airflow task instance; lets a retry find the batch of its first try.';
COMMENT ON COLUMN @schema@.batch.claimed_by IS
    'Which waiter currently owns the batch (Airflow: the try); a stop conditioned on an older holder '
    'does nothing once a newer one has claimed it.';
COMMENT ON COLUMN @schema@.batch.role_name IS 'Role the children run as (current_user at submission).';
COMMENT ON COLUMN @schema@.batch.search_path IS 'The submitter''s search_path, restored in every runner.';
COMMENT ON COLUMN @schema@.batch.fail_fast IS 'The first failed child stops the rest of the batch.';
COMMENT ON COLUMN @schema@.batch.statement_timeout IS
    'Per-child time limit. Such batches run every child in a nested worker, where statement_timeout applies.';
COMMENT ON COLUMN @schema@.batch.enqueue_xid IS 'Transaction that queued the batch; runners wait for it to commit.';

CREATE TABLE @schema@.log_background (
    id bigserial PRIMARY KEY,
    pid int,
    status @schema@.child_status NOT NULL DEFAULT 'queued',
    ip_client inet DEFAULT inet_client_addr(),
    user_name name NOT NULL DEFAULT session_user,
    uuid_parent uuid NOT NULL REFERENCES @schema@.batch ON DELETE CASCADE,
    uuid_child uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    query text NOT NULL,
    result jsonb,
    start_time_exec timestamptz,
    end_time_exec timestamptz,
    seq int NOT NULL,
    label text,
    role_name name NOT NULL DEFAULT current_user,
    run_mode text NOT NULL CHECK (run_mode IN ('inline', 'worker')),
    queued_time timestamptz NOT NULL DEFAULT clock_timestamp(),
    attempt int NOT NULL DEFAULT 0,
    backend_start timestamptz,
    stop_requested boolean NOT NULL DEFAULT false,
    sqlstate text,
    error text,
    error_detail text,
    error_hint text,
    error_context text,
    UNIQUE (uuid_parent, seq)
);
CREATE INDEX ON @schema@.log_background (status, uuid_parent) WHERE status IN ('queued', 'running');
-- Runners claim the next queued child of a batch in order: an index scan, not a sort per claim.
CREATE INDEX ON @schema@.log_background (uuid_parent, seq) WHERE status = 'queued';
COMMENT ON TABLE @schema@.log_background IS
    'Audit of every child statement: the seed''s columns plus what the engine needs. One row per child.';
COMMENT ON COLUMN @schema@.log_background.pid IS 'Runner process executing the child; with backend_start it names the process exactly.';
COMMENT ON COLUMN @schema@.log_background.result IS
    'command (tag with row count), rows, and for row-returning statements a JSON preview '
    '(settings.preview_rows / preview_bytes) with truncated = true when cut.';
COMMENT ON COLUMN @schema@.log_background.run_mode IS
    'inline: executed by the runner, outcome recorded atomically with the work; worker: needs a top-level '
    'statement (VACUUM, CONCURRENTLY, CALL, DO, SET...), executed in a nested worker.';
COMMENT ON COLUMN @schema@.log_background.attempt IS 'How many times a runner claimed this child.';

-- A role sees and changes only its own rows; pgbg_admin sees and stops everything.
ALTER TABLE @schema@.batch ENABLE ROW LEVEL SECURITY;
ALTER TABLE @schema@.log_background ENABLE ROW LEVEL SECURITY;
CREATE POLICY owner_or_admin ON @schema@.batch
    USING (role_name = current_user OR pg_has_role(current_user, 'pgbg_admin', 'MEMBER'));
CREATE POLICY submit_own ON @schema@.batch FOR INSERT WITH CHECK (role_name = current_user);
CREATE POLICY owner_or_admin ON @schema@.log_background
    USING (role_name = current_user OR pg_has_role(current_user, 'pgbg_admin', 'MEMBER'));
-- A child may only be added to a batch of the same role: a runner executes what it claims as itself.
CREATE POLICY submit_own ON @schema@.log_background FOR INSERT WITH CHECK (
    role_name = current_user
    AND EXISTS (SELECT 1 FROM @schema@.batch b
                WHERE b.uuid_parent = log_background.uuid_parent AND b.role_name = current_user));

CREATE TYPE @schema@.monitor_row AS (
    uuid_parent uuid,
    uuid_child uuid,
    seq int,
    label text,
    pid int,
    status @schema@.child_status,
    query text,
    result jsonb,
    error text,
    sqlstate text,
    queued_time timestamptz,
    start_time_exec timestamptz,
    end_time_exec timestamptz,
    duration interval,
    attempt int,
    user_name name,
    run_mode text
);
COMMENT ON TYPE @schema@.monitor_row IS 'Row shape of pg_background_monitor(); airflow_pgbg.status.MONITOR_COLUMNS mirrors it.';

------------------------------------------------------------------------------------------------
-- Splitting and classifying statements
------------------------------------------------------------------------------------------------

CREATE FUNCTION @schema@.split_statements(p_text text, p_delimiter text DEFAULT ';')
RETURNS text[]
LANGUAGE plpgsql IMMUTABLE
AS $fn$
DECLARE
    c text[];
    n int;
    dl int := coalesce(length(p_delimiter), 0);
    d text[];
    i int := 1;
    j int;
    k int;
    start int := 1;
    depth int;
    esc boolean;
    has_code boolean := false;
    tag text;
    tl int;
    pieces text[] := '{}';
BEGIN
    IF p_text IS NULL THEN
        RAISE EXCEPTION 'batch is NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF p_delimiter = '' THEN
        RAISE EXCEPTION 'delimiter must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- An array of characters: indexing text by position is linear in UTF-8, this is constant.
    c := regexp_split_to_array(p_text, '');
    n := length(p_text);
    d := regexp_split_to_array(p_delimiter, '');
    WHILE i <= n LOOP
        IF dl > 0 AND c[i] = d[1] AND c[i:i + dl - 1] = d THEN
            IF has_code THEN
                pieces := pieces || @schema@._trim_statement(array_to_string(c[start:i - 1], ''));
            END IF;
            i := i + dl;
            start := i;
            has_code := false;
        ELSIF c[i] = '-' AND c[i + 1] = '-' THEN
            WHILE i <= n AND c[i] <> E'\n' LOOP
                i := i + 1;
            END LOOP;
        ELSIF c[i] = '/' AND c[i + 1] = '*' THEN
            depth := 1;
            j := i + 2;
            WHILE depth > 0 LOOP
                IF j > n THEN
                    RAISE EXCEPTION 'unterminated /* comment in batch text at character %', i
                        USING ERRCODE = 'syntax_error';
                ELSIF c[j] = '/' AND c[j + 1] = '*' THEN
                    depth := depth + 1; j := j + 2;
                ELSIF c[j] = '*' AND c[j + 1] = '/' THEN
                    depth := depth - 1; j := j + 2;
                ELSE
                    j := j + 1;
                END IF;
            END LOOP;
            i := j;
        ELSIF c[i] = '''' THEN
            -- E'...' strings take backslash escapes; standard strings only double the quote.
            esc := i > 1 AND c[i - 1] IN ('E', 'e') AND (i = 2 OR c[i - 2] !~ '[[:alnum:]_$]');
            j := i + 1;
            LOOP
                IF j > n THEN
                    RAISE EXCEPTION 'unterminated quoted string in batch text at character %', i
                        USING ERRCODE = 'syntax_error';
                ELSIF esc AND c[j] = '\' THEN
                    j := j + 2;
                ELSIF c[j] = '''' THEN
                    EXIT WHEN c[j + 1] IS DISTINCT FROM '''';
                    j := j + 2;
                ELSE
                    j := j + 1;
                END IF;
            END LOOP;
            i := j + 1;
            has_code := true;
        ELSIF c[i] = '"' THEN
            j := i + 1;
            LOOP
                IF j > n THEN
                    RAISE EXCEPTION 'unterminated quoted identifier in batch text at character %', i
                        USING ERRCODE = 'syntax_error';
                ELSIF c[j] = '"' THEN
                    EXIT WHEN c[j + 1] IS DISTINCT FROM '"';
                    j := j + 2;
                ELSE
                    j := j + 1;
                END IF;
            END LOOP;
            i := j + 1;
            has_code := true;
        ELSIF c[i] = '$' AND (i = 1 OR c[i - 1] !~ '[[:alnum:]_$]')
              AND array_to_string(c[i:i + 63], '') ~ '^\$([[:alpha:]_][[:alnum:]_]*)?\$' THEN
            tag := substring(array_to_string(c[i:i + 63], '') FROM '^\$(?:[[:alpha:]_][[:alnum:]_]*)?\$');
            tl := length(tag);
            j := i + tl;
            LOOP
                IF j + tl - 1 > n THEN
                    RAISE EXCEPTION 'unterminated dollar-quoted string % in batch text at character %', tag, i
                        USING ERRCODE = 'syntax_error';
                END IF;
                EXIT WHEN c[j] = '$' AND array_to_string(c[j:j + tl - 1], '') = tag;
                j := j + 1;
            END LOOP;
            i := j + tl;
            has_code := true;
        ELSE
            IF c[i] !~ '^\s$' AND c[i] <> ';' THEN
                has_code := true;
            END IF;
            i := i + 1;
        END IF;
    END LOOP;
    IF has_code THEN
        pieces := pieces || @schema@._trim_statement(array_to_string(c[start:n], ''));
    END IF;
    RETURN pieces;
END
$fn$;
COMMENT ON FUNCTION @schema@.split_statements(text, text) IS
    'Splits batch text on a delimiter found outside quotes, quoted identifiers, dollar quotes and '
    'comments; drops pieces that hold only blanks, semicolons or comments; raises on anything '
    'unterminated. A NULL delimiter only validates and trims one statement.';

CREATE FUNCTION @schema@._trim_statement(p_sql text)
RETURNS text
LANGUAGE sql IMMUTABLE
RETURN regexp_replace(btrim(p_sql, E' \t\r\n\f\v'), '[\s;]+$', '');
COMMENT ON FUNCTION @schema@._trim_statement(text) IS
    'Trailing semicolons go: the seed writes "select version();" between commas.';

CREATE FUNCTION @schema@._strip_leading_comments(p_sql text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $fn$
DECLARE
    s text := p_sql;
    depth int;
    i int;
BEGIN
    LOOP
        s := ltrim(s, E' \t\r\n\f\v(');
        IF left(s, 2) = '--' THEN
            i := strpos(s, E'\n');
            s := CASE WHEN i = 0 THEN '' ELSE substr(s, i + 1) END;
        ELSIF left(s, 2) = '/*' THEN
            -- Block comments nest in PostgreSQL.
            depth := 1;
            i := 3;
            WHILE depth > 0 AND i <= length(s) LOOP
                IF substr(s, i, 2) = '/*' THEN
                    depth := depth + 1; i := i + 2;
                ELSIF substr(s, i, 2) = '*/' THEN
                    depth := depth - 1; i := i + 2;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
            s := substr(s, i);
        ELSE
            RETURN s;
        END IF;
    END LOOP;
END
$fn$;

CREATE FUNCTION @schema@._statement_head(p_sql text)
RETURNS text
LANGUAGE sql IMMUTABLE
RETURN upper(regexp_replace(
    substring(@schema@._strip_leading_comments(p_sql), '^([[:alpha:]]+(\s+[[:alpha:]]+){0,3})'),
    '\s+', ' ', 'g'));
COMMENT ON FUNCTION @schema@._statement_head(text) IS
    'Up to four leading keywords, upper case, after comments and opening parentheses.';

CREATE FUNCTION @schema@._needs_own_worker(p_sql text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
RETURN @schema@._statement_head(p_sql) ~ ('^(VACUUM|CALL|DO|CLUSTER|REINDEX|SET|RESET|DISCARD|LOAD'
                                           '|ALTER SYSTEM|CREATE DATABASE|DROP DATABASE|ALTER DATABASE'
                                           '|CREATE TABLESPACE|DROP TABLESPACE)( |$)')
    OR (@schema@._statement_head(p_sql) ~ '^(CREATE|DROP|ALTER) '
        AND p_sql ~* '\m(INDEX|PARTITION)\M.*\mCONCURRENTLY\M')
    -- SELECT ... INTO creates a table, which dynamic SQL in a function refuses.
    OR (@schema@._statement_head(p_sql) ~ '^SELECT( |$)' AND p_sql ~* '\mINTO\M');
COMMENT ON FUNCTION @schema@._needs_own_worker(text) IS
    'True for statements that must be a top-level statement of their own: they refuse to run in a '
    'function or transaction block, may commit (CALL, DO), or would change the runner''s session (SET).';

------------------------------------------------------------------------------------------------
-- Executing one child (called by runners)
------------------------------------------------------------------------------------------------

CREATE FUNCTION @schema@._command_tag(p_sql text, p_rows bigint)
RETURNS text
LANGUAGE sql IMMUTABLE
RETURN CASE split_part(@schema@._statement_head(p_sql), ' ', 1)
    WHEN 'INSERT' THEN 'INSERT 0 ' || p_rows
    WHEN 'UPDATE' THEN 'UPDATE ' || p_rows
    WHEN 'DELETE' THEN 'DELETE ' || p_rows
    WHEN 'MERGE' THEN 'MERGE ' || p_rows
    WHEN 'SELECT' THEN 'SELECT ' || p_rows
    WHEN 'VALUES' THEN 'SELECT ' || p_rows
    WHEN 'TABLE' THEN 'SELECT ' || p_rows
    WHEN 'WITH' THEN 'WITH ' || p_rows
    WHEN 'COPY' THEN 'COPY ' || p_rows
    WHEN 'CREATE' THEN substring(@schema@._statement_head(p_sql) FROM '^CREATE (?:OR REPLACE |UNIQUE |TEMP |TEMPORARY |UNLOGGED )*[A-Z]+')
    WHEN 'DROP' THEN substring(@schema@._statement_head(p_sql) FROM '^DROP [A-Z]+')
    WHEN 'ALTER' THEN substring(@schema@._statement_head(p_sql) FROM '^ALTER [A-Z]+')
    ELSE split_part(@schema@._statement_head(p_sql), ' ', 1)
END;
COMMENT ON FUNCTION @schema@._command_tag(text, bigint) IS
    'PL/pgSQL does not expose the command tag of a dynamic statement; this rebuilds it from the keywords.';

CREATE FUNCTION @schema@._bounded_preview(p_rows jsonb, p_total bigint, p_max_bytes int)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
AS $fn$
    WITH kept AS (
        SELECT coalesce(jsonb_agg(e ORDER BY k), '[]'::jsonb) AS preview
        FROM (SELECT e, k, sum(octet_length(e::text) + 2) OVER (ORDER BY k) AS running_bytes
              FROM jsonb_array_elements(coalesce(p_rows, '[]'::jsonb)) WITH ORDINALITY AS x(e, k)) s
        WHERE running_bytes <= p_max_bytes
    )
    SELECT jsonb_build_object('preview', preview, 'truncated', jsonb_array_length(preview) < p_total)
    FROM kept
$fn$;
COMMENT ON FUNCTION @schema@._bounded_preview(jsonb, bigint, int) IS
    'Keeps the longest prefix of rows that fits in p_max_bytes and says whether rows were left out.';

CREATE FUNCTION @schema@._execute_inline(p_sql text, p_preview_rows int, p_preview_bytes int)
RETURNS jsonb
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_head text := @schema@._statement_head(p_sql);
    v_verb text := split_part(v_head, ' ', 1);
    v_total bigint;
    v_rows jsonb;
    v_wrapped text;
BEGIN
    IF v_verb IN ('SELECT', 'VALUES', 'TABLE', 'WITH')
       OR (v_verb IN ('INSERT', 'UPDATE', 'DELETE', 'MERGE') AND p_sql ~* '\mRETURNING\M') THEN
        -- Count every row (so the statement runs to completion) but turn only the first
        -- p_preview_rows into JSON. The newlines keep a trailing -- comment from eating the wrapper.
        v_wrapped := CASE WHEN v_verb IN ('INSERT', 'UPDATE', 'DELETE', 'MERGE')
            THEN format(E'WITH q AS (\n%s\n) ', p_sql)
                 || format('SELECT count(*), jsonb_agg(j) FILTER (WHERE j IS NOT NULL) FROM '
                           '(SELECT CASE WHEN row_number() OVER () <= %s THEN to_jsonb(q.*) END AS j FROM q) s',
                           p_preview_rows)
            ELSE format('SELECT count(*), jsonb_agg(j) FILTER (WHERE j IS NOT NULL) FROM '
                        '(SELECT CASE WHEN row_number() OVER () <= %s THEN to_jsonb(q.*) END AS j FROM ',
                        p_preview_rows)
                 || format(E'(\n%s\n) AS q) s', p_sql)
        END;
        BEGIN
            EXECUTE v_wrapped INTO v_total, v_rows;
            v_rows := coalesce(v_rows, '[]'::jsonb);
            RETURN jsonb_build_object('command', @schema@._command_tag(p_sql, v_total), 'rows', v_total)
                   || CASE WHEN octet_length(v_rows::text) <= p_preview_bytes  -- the usual, cheap case
                           THEN jsonb_build_object('preview', v_rows, 'truncated', jsonb_array_length(v_rows) < v_total)
                           ELSE @schema@._bounded_preview(v_rows, v_total, p_preview_bytes) END;
        EXCEPTION WHEN syntax_error OR feature_not_supported THEN
            -- The wrapper does not fit every statement (SELECT ... INTO, a data-modifying WITH):
            -- its failed parse ran nothing, so run the statement as written, without a preview.
            NULL;
        END;
    END IF;
    EXECUTE p_sql;
    GET DIAGNOSTICS v_total = ROW_COUNT;
    RETURN jsonb_build_object('command', @schema@._command_tag(p_sql, v_total), 'rows', v_total);
END
$fn$;
COMMENT ON FUNCTION @schema@._execute_inline(text, int, int) IS
    'Executes one statement in the caller''s transaction and returns its result document.';

CREATE FUNCTION @schema@._launch_top_level(p_sql text, p_child uuid, p_timeout interval)
RETURNS @pgbg_ext@.pg_background_handle
LANGUAGE plpgsql
AS $fn$
DECLARE
    h @pgbg_ext@.pg_background_handle;
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
            h := @pgbg_ext@.pg_background_launch_v2(p_sql);
            EXIT;
        EXCEPTION WHEN insufficient_resources OR configuration_limit_exceeded THEN
            PERFORM pg_sleep(0.1);
        END;
    END LOOP;
    PERFORM set_config('application_name', v_app, false);
    PERFORM set_config('statement_timeout', v_timeout, false);
    RETURN h;
END
$fn$;
COMMENT ON FUNCTION @schema@._launch_top_level(text, uuid, interval) IS
    'Starts one statement as the top-level statement of a nested worker, so VACUUM, CONCURRENTLY and '
    'procedures that COMMIT work; waits for a free worker slot rather than failing.';

CREATE FUNCTION @schema@._top_level_result(h @pgbg_ext@.pg_background_handle)
RETURNS jsonb
LANGUAGE plpgsql
-- Some pg_background functions are SQL wrappers that resolve their helpers through search_path,
-- while runners use the submitter's. Nothing here runs user SQL.
SET search_path = @pgbg_ext@, pg_catalog
AS $fn$
DECLARE
    o @pgbg_ext@.pg_background_outcome := @pgbg_ext@.pg_background_outcome_v2(h.pid, h.cookie);
    e @pgbg_ext@.pg_background_error;
BEGIN
    IF o.has_error THEN
        e := @pgbg_ext@.pg_background_error_info_v2(h.pid, h.cookie);
    END IF;
    PERFORM @pgbg_ext@.pg_background_detach_v2(h.pid, h.cookie);
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
COMMENT ON FUNCTION @schema@._top_level_result(@pgbg_ext@.pg_background_handle) IS
    'Result document of a finished nested worker; re-raises its error with SQLSTATE, detail and hint.';

------------------------------------------------------------------------------------------------
-- Slots: session advisory locks held by runners, released by the server if a runner dies
------------------------------------------------------------------------------------------------

CREATE FUNCTION @schema@._global_cap()
RETURNS int
LANGUAGE sql STABLE
RETURN (SELECT coalesce(s.max_workers,
                        greatest(1, (current_setting('max_worker_processes')::int - 2) / 2))
        FROM @schema@.settings s);
COMMENT ON FUNCTION @schema@._global_cap() IS 'Global runner cap in effect (settings.max_workers or its default).';

CREATE FUNCTION @schema@._global_lock_key()
RETURNS int
LANGUAGE sql IMMUTABLE
RETURN hashtext('@schema@/global') & 2147483647;

CREATE FUNCTION @schema@._batch_lock_key(p_parent uuid)
RETURNS int
LANGUAGE sql IMMUTABLE
RETURN hashtext('@schema@/' || p_parent::text) & 2147483647;

CREATE FUNCTION @schema@._slots_held(p_key int)
RETURNS int
LANGUAGE sql VOLATILE
RETURN (SELECT count(*)::int FROM pg_locks
        WHERE locktype = 'advisory' AND granted AND objsubid = 2
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND classid = p_key::oid);
COMMENT ON FUNCTION @schema@._slots_held(int) IS 'Slots of one kind currently held by live runners.';

CREATE FUNCTION @schema@._try_slot(p_key int, p_slots int)
RETURNS int
LANGUAGE plpgsql VOLATILE
AS $fn$
BEGIN
    FOR s IN 1..p_slots LOOP
        IF pg_try_advisory_lock(p_key, s) THEN
            RETURN s;
        END IF;
    END LOOP;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION @schema@._try_slot(int, int) IS
    'Takes the first free slot 1..p_slots as a session advisory lock; NULL when all are taken.';

------------------------------------------------------------------------------------------------
-- Runners
------------------------------------------------------------------------------------------------

CREATE PROCEDURE @schema@._runner(p_parent uuid, p_enqueue_xid xid8)
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
    v_handle @pgbg_ext@.pg_background_handle;
    v_finished boolean;
    v_leave boolean := false;
    v_sql text;
    v_mode text;
    v_result jsonb;
    v_state text;
    v_msg text;
    v_detail text;
    v_hint text;
    v_context text;
    v_next uuid;
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
    v_global_slot := @schema@._try_slot(@schema@._global_lock_key(), @schema@._global_cap());
    IF v_global_slot IS NULL THEN
        RETURN;
    END IF;
    v_batch_slot := @schema@._try_slot(@schema@._batch_lock_key(v_parent), v_batch.max_parallel);
    IF v_batch_slot IS NULL THEN
        PERFORM pg_advisory_unlock_all();
        RETURN;
    END IF;
    SELECT backend_start INTO v_backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid();
    PERFORM set_config('search_path', v_batch.search_path, false);
    COMMIT;

    LOOP
        -- Publishing 'running' need not wait for a WAL flush: the outcome's commit, later in the WAL,
        -- does, and a claim lost in a crash leaves a child that never ran queued instead of lost.
        PERFORM set_config('synchronous_commit', 'off', true);
        UPDATE @schema@.log_background c
           SET status = 'running', pid = pg_backend_pid(), backend_start = v_backend_start,
               start_time_exec = clock_timestamp(), attempt = c.attempt + 1
         WHERE c.id = (SELECT x.id FROM @schema@.log_background x
                        WHERE x.uuid_parent = v_parent AND x.status = 'queued' AND x.role_name = current_user
                        ORDER BY x.seq
                        LIMIT 1
                        FOR UPDATE SKIP LOCKED)
        RETURNING c.id, c.uuid_child, c.query, c.run_mode INTO v_id, v_child, v_sql, v_mode;

        IF v_id IS NULL THEN
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
                v_slot := @schema@._try_slot(@schema@._batch_lock_key(v_batch.uuid_parent), v_batch.max_parallel);
                IF v_slot IS NOT NULL THEN
                    PERFORM pg_advisory_unlock(@schema@._batch_lock_key(v_parent), v_batch_slot);
                    v_batch_slot := v_slot;
                    v_next := v_batch.uuid_parent;
                    EXIT;
                END IF;
            END LOOP;
            EXIT WHEN v_next IS NULL;
            v_parent := v_next;
            PERFORM set_config('application_name', 'pgbg:' || v_parent, false);
            PERFORM set_config('search_path', v_batch.search_path, false);
            COMMIT;
            CONTINUE;
        END IF;
        COMMIT;

        v_handle := NULL;
        IF v_mode = 'worker' THEN
            -- Launch, then wait in short statements with a COMMIT between them: CREATE INDEX
            -- CONCURRENTLY in the nested worker waits for every older snapshot, this runner's too.
            BEGIN
                v_handle := @schema@._launch_top_level(v_sql, v_child, v_batch.statement_timeout);
            EXCEPTION WHEN query_canceled THEN
                NULL;  -- stopped before it started; recorded below
            END;
            COMMIT;
            v_finished := v_handle IS NULL;
            WHILE NOT v_finished LOOP
                BEGIN
                    v_finished := @pgbg_ext@.pg_background_wait_v2(v_handle.pid, v_handle.cookie, 250);
                EXCEPTION WHEN query_canceled THEN
                    PERFORM @pgbg_ext@.pg_background_cancel_v2(v_handle.pid, v_handle.cookie, 0);
                END;
                COMMIT;
            END LOOP;
        END IF;

        BEGIN
            IF v_mode = 'inline' THEN
                v_result := @schema@._execute_inline(v_sql, v_settings.preview_rows, v_settings.preview_bytes);
                -- A child that wrote nothing has nothing to make durable but its log row, which a crash
                -- would turn into 'lost': its commit need not wait for a WAL flush either.
                IF pg_current_xact_id_if_assigned() IS NULL THEN
                    PERFORM set_config('synchronous_commit', 'off', true);
                END IF;
            ELSIF v_handle IS NULL THEN
                RAISE EXCEPTION 'canceling statement due to user request' USING ERRCODE = 'query_canceled';
            ELSE
                v_result := @schema@._top_level_result(v_handle);
            END IF;
            UPDATE @schema@.log_background
               SET status = 'done', result = v_result, end_time_exec = clock_timestamp()
             WHERE id = v_id;
        EXCEPTION
            WHEN query_canceled OR admin_shutdown THEN
                -- pg_background_stop() sets stop_requested under a row lock before it signals, so
                -- the flag tells a stop from a statement_timeout and from pg_cancel_backend() or
                -- pg_terminate_backend() sent by someone else (pg_background turns SIGTERM into a
                -- cancel): such a worker is treated as gone, its child lost, and the runner leaves.
                GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
                UPDATE @schema@.log_background
                   SET status = CASE WHEN stop_requested THEN 'stopped'
                                     WHEN v_msg LIKE '%statement timeout%' THEN 'failed'
                                     ELSE 'lost' END::@schema@.child_status,
                       sqlstate = v_state,
                       error = CASE WHEN stop_requested THEN 'stopped by pg_background_stop()'
                                    WHEN v_msg LIKE '%statement timeout%' THEN v_msg
                                    ELSE 'worker process was cancelled or terminated from outside: ' || v_msg END,
                       end_time_exec = clock_timestamp()
                 WHERE id = v_id
                RETURNING status = 'lost' INTO v_leave;
            WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT,
                                        v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                                        v_context = PG_EXCEPTION_CONTEXT;
                UPDATE @schema@.log_background
                   SET status = 'failed', sqlstate = v_state, error = v_msg,
                       error_detail = nullif(v_detail, ''), error_hint = nullif(v_hint, ''),
                       error_context = nullif(v_context, ''), end_time_exec = clock_timestamp()
                 WHERE id = v_id;
        END;
        COMMIT;
        IF v_batch.fail_fast
           AND (SELECT status FROM @schema@.log_background WHERE id = v_id) = 'failed' THEN
            PERFORM @schema@._stop(v_parent, format('stopped: fail_fast after child %s failed', v_child));
            COMMIT;
        END IF;
        v_id := NULL;
        EXIT WHEN v_leave;
    END LOOP;
    -- Leave the name first so that nobody counts this process once its slots are free.
    PERFORM set_config('application_name', 'pgbg:exiting', false);
    PERFORM pg_advisory_unlock_all();
END
$fn$;
COMMENT ON PROCEDURE @schema@._runner(uuid, xid8) IS
    'Body of a runner worker: holds one global and one batch slot and executes queued children until '
    'none is left, recording each outcome in the transaction of its work. Started by _housekeep().';

CREATE FUNCTION @schema@._launch_runners(p_parent uuid, p_enqueue_xid xid8, p_count int)
RETURNS int
LANGUAGE plpgsql
AS $fn$
DECLARE
    h @pgbg_ext@.pg_background_handle;
    v_started int := 0;
BEGIN
    FOR k IN 1..coalesce(p_count, 0) LOOP
        BEGIN
            h := @pgbg_ext@.pg_background_submit_v2(
                format('CALL @schema@._runner(%L::uuid, %L::xid8)', p_parent, p_enqueue_xid));
            -- Detached handles do not count against pg_background.max_workers of this session.
            PERFORM @pgbg_ext@.pg_background_detach_v2(h.pid, h.cookie);
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

CREATE FUNCTION @schema@._housekeep(p_parent uuid DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
AS $fn$
DECLARE
    b record;
    v_free_global int;
    v_want int;
    v_active int;
BEGIN
    -- pg_stat_activity is otherwise frozen for the rest of the transaction.
    PERFORM pg_stat_clear_snapshot();

    -- A running child whose runner is gone (same pid with the same backend_start) has no one left
    -- to record its outcome. Rows locked by someone else are left to that someone.
    UPDATE @schema@.log_background c
       SET status = CASE WHEN c.stop_requested THEN 'stopped' ELSE 'lost' END::@schema@.child_status,
           end_time_exec = clock_timestamp(),
           error = CASE WHEN c.stop_requested THEN 'stopped by pg_background_stop()'
                        ELSE 'worker process ended without recording an outcome '
                             '(terminated, crashed or server restarted)' END
     WHERE c.status = 'running'
       AND c.id IN (SELECT x.id FROM @schema@.log_background x
                     WHERE x.status = 'running'
                       AND (p_parent IS NULL OR x.uuid_parent = p_parent)
                       AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                                        WHERE a.pid = x.pid
                                          AND (a.backend_start = x.backend_start OR a.backend_start IS NULL))
                     FOR UPDATE SKIP LOCKED);

    -- Start runners where slots are free. Only for the caller's own batches: a runner runs as the
    -- role that starts it, and children must run as the role that submitted them.
    FOR b IN
        SELECT bt.uuid_parent, bt.max_parallel, bt.enqueue_xid,
               (SELECT count(*) FROM @schema@.log_background x
                 WHERE x.uuid_parent = bt.uuid_parent AND x.status = 'queued') AS queued
          FROM @schema@.batch bt
         WHERE bt.role_name = current_user AND bt.stop_requested_at IS NULL
           AND (p_parent IS NULL OR bt.uuid_parent = p_parent)
           AND EXISTS (SELECT 1 FROM @schema@.log_background x
                        WHERE x.uuid_parent = bt.uuid_parent AND x.status = 'queued')
         ORDER BY bt.created_at
    LOOP
        v_free_global := @schema@._global_cap()
            - greatest(@schema@._slots_held(@schema@._global_lock_key()),
                       (SELECT count(*)::int FROM pg_stat_activity
                         WHERE application_name LIKE 'pgbg:%-%' AND datname = current_database()));
        EXIT WHEN v_free_global <= 0;
        -- Runners still starting up hold no lock yet but already carry the batch's name.
        v_active := greatest(@schema@._slots_held(@schema@._batch_lock_key(b.uuid_parent)),
                             (SELECT count(*)::int FROM pg_stat_activity
                               WHERE application_name = 'pgbg:' || b.uuid_parent));
        v_want := least(b.queued::int, b.max_parallel - v_active, v_free_global);
        IF v_want > 0 THEN
            EXIT WHEN @schema@._launch_runners(b.uuid_parent, b.enqueue_xid, v_want) < v_want;
        END IF;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION @schema@._housekeep(uuid) IS
    'Marks children of dead workers lost and starts runners for the caller''s batches where slots are '
    'free. Run by every monitor, wait and launch call, so polling is enough to drive a batch.';

------------------------------------------------------------------------------------------------
-- Public API
------------------------------------------------------------------------------------------------

CREATE FUNCTION @schema@._enqueue(p_parent uuid, p_querys text[], p_max_parallel int, p_label text,
                                 p_user_name name, p_ip_client inet, p_search_path text,
                                 p_fail_fast boolean, p_statement_timeout interval, p_origin text)
RETURNS int
LANGUAGE plpgsql
AS $fn$
BEGIN
    INSERT INTO @schema@.batch (uuid_parent, label, user_name, ip_client, max_parallel, search_path,
                                fail_fast, statement_timeout, origin)
    VALUES (p_parent, p_label, p_user_name, p_ip_client, p_max_parallel, p_search_path,
            p_fail_fast, p_statement_timeout, p_origin);
    INSERT INTO @schema@.log_background (uuid_parent, seq, query, label, run_mode, user_name, ip_client)
    SELECT p_parent, q.seq, q.sql, p_label,
           CASE WHEN p_statement_timeout IS NOT NULL OR @schema@._needs_own_worker(q.sql)
                THEN 'worker' ELSE 'inline' END,
           p_user_name, p_ip_client
      FROM unnest(p_querys) WITH ORDINALITY AS q(sql, seq);
    PERFORM @schema@._housekeep(p_parent);
    RETURN cardinality(p_querys);
END
$fn$;
COMMENT ON FUNCTION @schema@._enqueue(uuid, text[], int, text, name, inet, text, boolean, interval, text) IS
    'Records a validated batch and starts its first runners, which wait for this transaction to commit.';

CREATE FUNCTION @schema@._validate_batch(p_querys text[], p_max_parallel int, p_statement_timeout interval)
RETURNS text[]
LANGUAGE plpgsql IMMUTABLE
AS $fn$
DECLARE
    v_out text[] := '{}';
    v_piece text[];
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
    FOR k IN 1..cardinality(p_querys) LOOP
        IF p_querys[k] IS NULL THEN
            RAISE EXCEPTION 'statement % of the batch is NULL', k USING ERRCODE = 'null_value_not_allowed';
        END IF;
        BEGIN
            v_piece := @schema@.split_statements(p_querys[k], NULL);
        EXCEPTION WHEN syntax_error THEN
            RAISE EXCEPTION 'statement % of the batch: %', k, SQLERRM USING ERRCODE = 'syntax_error';
        END;
        IF cardinality(v_piece) = 0 THEN
            RAISE EXCEPTION 'statement % of the batch holds only blanks or comments', k
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v_out := v_out || v_piece[1];
    END LOOP;
    RETURN v_out;
END
$fn$;
COMMENT ON FUNCTION @schema@._validate_batch(text[], int, interval) IS
    'Rejects a bad batch before anything is recorded or started; returns the trimmed statements.';

CREATE FUNCTION @schema@.pg_background_launch_num(
    p_querys text[],
    p_monitor boolean DEFAULT true,
    p_max_parallel int DEFAULT NULL,
    p_label text DEFAULT NULL,
    p_fail_fast boolean DEFAULT false,
    p_statement_timeout interval DEFAULT NULL,
    p_origin text DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_parent uuid := gen_random_uuid();
    v_querys text[] := @schema@._validate_batch(p_querys, p_max_parallel, p_statement_timeout);
    v_max_parallel int := coalesce(p_max_parallel, @schema@._global_cap());
    v_search_path text := current_setting('search_path');
    h @pgbg_ext@.pg_background_handle;
    v_deadline timestamptz := clock_timestamp() + interval '60 seconds';
BEGIN
    IF NOT p_monitor THEN
        -- Queued in the caller's transaction: the batch starts when it commits, and never if it
        -- rolls back.
        PERFORM @schema@._enqueue(v_parent, v_querys, v_max_parallel, p_label,
                                  session_user, inet_client_addr(), v_search_path,
                                  p_fail_fast, p_statement_timeout, p_origin);
        RETURN v_parent;
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(v_querys) AS q WHERE q ~* '\mCONCURRENTLY\M') THEN
        RAISE EXCEPTION 'p_monitor => true cannot wait for a batch with CONCURRENTLY statements'
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'They wait for every older snapshot, including that of the waiting statement.',
                  HINT = 'Launch with p_monitor => false, then poll pg_background_monitor() or pg_background_wait() '
                         'from short statements.';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'p_monitor => true waits for other transactions and needs READ COMMITTED, not %',
            current_setting('transaction_isolation') USING ERRCODE = 'feature_not_supported';
    END IF;
    -- Waiting here keeps this transaction open, so the batch is queued by a worker of its own that
    -- commits at once; runners could not see rows this transaction has not committed.
    LOOP
        BEGIN
            h := @pgbg_ext@.pg_background_launch_v2(format(
                'SELECT @schema@._enqueue(%L::uuid, %L::text[], %s, %L, %L, %L::inet, %L, %L, %L::interval, %L)',
                v_parent, v_querys, v_max_parallel, p_label, session_user, inet_client_addr(), v_search_path,
                p_fail_fast, p_statement_timeout, p_origin));
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
    PERFORM @pgbg_ext@.pg_background_wait_v2(h.pid, h.cookie);
    PERFORM @schema@._top_level_result(h);  -- raises what made the enqueue fail
    PERFORM @schema@.pg_background_wait(v_parent);
    RETURN v_parent;
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_launch_num(text[], boolean, int, text, boolean, interval, text) IS
    'Runs each statement of the array as a child of a new batch and returns its parent UUID. '
    'p_max_parallel caps the batch (NULL: the global cap); p_monitor => true returns when the batch has '
    'ended, false at once; p_fail_fast stops the rest after the first failure; p_statement_timeout '
    'limits each child; p_origin records who asked (Airflow: the task instance). Bad input raises '
    'before anything is recorded.';

CREATE FUNCTION @schema@.pg_background_launch_num(
    p_querys text,
    p_delimiter text DEFAULT ';',
    p_monitor boolean DEFAULT true,
    p_max_parallel int DEFAULT NULL,
    p_label text DEFAULT NULL,
    p_fail_fast boolean DEFAULT false,
    p_statement_timeout interval DEFAULT NULL,
    p_origin text DEFAULT NULL)
RETURNS uuid
LANGUAGE sql
RETURN @schema@.pg_background_launch_num(
    @schema@.split_statements(p_querys, p_delimiter), p_monitor, p_max_parallel, p_label,
    p_fail_fast, p_statement_timeout, p_origin);
COMMENT ON FUNCTION @schema@.pg_background_launch_num(text, text, boolean, int, text, boolean, interval, text) IS
    'The seed''s form: splits p_querys on p_delimiter outside quotes, dollar quotes and comments, then '
    'as the array form.';

CREATE FUNCTION @schema@.batch_status(p_parent uuid)
RETURNS @schema@.child_status
LANGUAGE sql STABLE
AS $fn$
    SELECT CASE
        WHEN count(*) = 0 THEN NULL
        WHEN bool_or(status = 'running') THEN 'running'
        WHEN bool_or(status = 'queued') THEN 'queued'
        WHEN bool_or(status = 'failed') THEN 'failed'
        WHEN bool_or(status = 'lost') THEN 'lost'
        WHEN bool_or(status = 'stopped') THEN 'stopped'
        ELSE 'done' END::@schema@.child_status
    FROM @schema@.log_background WHERE uuid_parent = p_parent
$fn$;
COMMENT ON FUNCTION @schema@.batch_status(uuid) IS
    'Status of a whole batch in the child vocabulary: running or queued while any child is; then the '
    'worst outcome (failed, lost, stopped), else done. NULL for a batch the caller cannot see.';

CREATE FUNCTION @schema@.pg_background_monitor(uuid_father uuid DEFAULT NULL, p_show_verbose boolean DEFAULT true)
RETURNS SETOF @schema@.monitor_row
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM @schema@._housekeep(uuid_father);
    RETURN QUERY
    SELECT c.uuid_parent, c.uuid_child, c.seq, c.label, c.pid, c.status,
           CASE WHEN p_show_verbose THEN c.query ELSE left(c.query, 80) END,
           CASE WHEN p_show_verbose THEN c.result ELSE c.result - 'preview' END,
           c.error, c.sqlstate, c.queued_time, c.start_time_exec, c.end_time_exec,
           CASE WHEN c.start_time_exec IS NOT NULL
                THEN coalesce(c.end_time_exec, clock_timestamp()) - c.start_time_exec END,
           c.attempt, c.user_name, c.run_mode
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

CREATE FUNCTION @schema@.pg_background_wait(uuid_father uuid, p_timeout interval DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_deadline timestamptz := clock_timestamp() + p_timeout;
    v_status @schema@.child_status;
    v_nap float8 := 0.005;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM @schema@.batch WHERE uuid_parent = uuid_father) THEN
        RAISE EXCEPTION 'no batch with uuid %', uuid_father USING ERRCODE = 'no_data_found',
            HINT = 'A role sees only its own batches.';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pg_background_wait() needs READ COMMITTED, not %',
            current_setting('transaction_isolation') USING ERRCODE = 'feature_not_supported';
    END IF;
    LOOP
        PERFORM @schema@._housekeep(uuid_father);
        v_status := @schema@.batch_status(uuid_father);
        IF v_status NOT IN ('queued', 'running') THEN
            RETURN v_status::text;
        END IF;
        IF clock_timestamp() >= v_deadline THEN
            RETURN NULL;
        END IF;
        PERFORM pg_sleep(least(v_nap, coalesce(greatest(extract(epoch FROM v_deadline - clock_timestamp()), 0.001), v_nap)));
        v_nap := least(v_nap * 2, 0.2);
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_wait(uuid, interval) IS
    'Waits until every child of the batch has ended and returns the batch status (done, failed, lost, '
    'stopped); NULL when p_timeout passes first. The batch keeps running either way.';

CREATE FUNCTION @schema@._signal_child(p_child uuid, p_run_mode text, p_pid int, p_backend_start timestamptz)
RETURNS boolean
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_pid int;
BEGIN
    PERFORM pg_stat_clear_snapshot();
    -- A top-level child runs in a nested worker named after it: cancel that one, the runner then
    -- records the outcome. Otherwise cancel the runner, but only the very process that claimed the
    -- child, since a pid alone may have been reused.
    IF p_run_mode = 'worker' THEN
        SELECT pid INTO v_pid FROM pg_stat_activity WHERE application_name = 'pgbg-child:' || p_child;
        IF FOUND THEN
            RETURN pg_cancel_backend(v_pid);
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = p_pid AND backend_start = p_backend_start) THEN
        RETURN pg_cancel_backend(p_pid);
    END IF;
    RETURN false;
END
$fn$;
COMMENT ON FUNCTION @schema@._signal_child(uuid, text, int, timestamptz) IS
    'Cancels whatever process is executing a running child.';

CREATE FUNCTION @schema@._stop(uuid_father_or_child uuid, p_reason text)
RETURNS int
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_stopped int := 0;
    v_is_batch boolean;
    r record;
BEGIN
    SELECT true INTO v_is_batch FROM @schema@.batch WHERE uuid_parent = uuid_father_or_child;
    IF v_is_batch THEN
        UPDATE @schema@.batch SET stop_requested_at = coalesce(stop_requested_at, clock_timestamp())
         WHERE uuid_parent = uuid_father_or_child;
    ELSIF NOT EXISTS (SELECT 1 FROM @schema@.log_background WHERE uuid_child = uuid_father_or_child) THEN
        RAISE EXCEPTION 'no batch or child with uuid %', uuid_father_or_child
            USING ERRCODE = 'no_data_found', HINT = 'A role sees and stops only its own batches.';
    END IF;

    -- Queued children never start: runners skip locked rows and find them stopped after commit.
    WITH s AS (
        UPDATE @schema@.log_background
           SET status = 'stopped', end_time_exec = clock_timestamp(), error = p_reason
         WHERE status = 'queued'
           AND (uuid_parent = uuid_father_or_child OR uuid_child = uuid_father_or_child)
        RETURNING 1)
    SELECT count(*) INTO v_stopped FROM s;

    -- Running children: the row lock taken here keeps the runner on this child (it must update the
    -- row to leave it) until this transaction ends, so the cancel cannot hit its next child.
    FOR r IN
        UPDATE @schema@.log_background c SET stop_requested = true
          FROM (SELECT id, stop_requested AS was_requested FROM @schema@.log_background
                 WHERE status = 'running'
                   AND (uuid_parent = uuid_father_or_child OR uuid_child = uuid_father_or_child)
                 FOR UPDATE) p
         WHERE c.id = p.id AND c.status = 'running'
        RETURNING c.uuid_child, c.run_mode, c.pid, c.backend_start, p.was_requested
    LOOP
        PERFORM @schema@._signal_child(r.uuid_child, r.run_mode, r.pid, r.backend_start);
        IF NOT r.was_requested THEN
            v_stopped := v_stopped + 1;
        END IF;
    END LOOP;
    RETURN v_stopped;
END
$fn$;
COMMENT ON FUNCTION @schema@._stop(uuid, text) IS
    'pg_background_stop(), recording p_reason on the queued children it stops (fail_fast has its own).';

CREATE FUNCTION @schema@.pg_background_stop(uuid_father_or_child uuid)
RETURNS int
LANGUAGE sql
RETURN @schema@._stop(uuid_father_or_child, 'stopped by pg_background_stop() before it started');
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

CREATE FUNCTION @schema@.pg_background_claim(uuid_father uuid, p_claimed_by text)
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    UPDATE @schema@.batch SET claimed_by = p_claimed_by WHERE uuid_parent = uuid_father;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no batch with uuid %', uuid_father USING ERRCODE = 'no_data_found';
    END IF;
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_claim(uuid, text) IS
    'Records who now owns the batch, e.g. the Airflow try that resumed it, so that a late kill of an '
    'earlier try (pg_background_stop(uuid, its claim)) does not stop the work the new one waits for.';

CREATE FUNCTION @schema@.pg_background_retry(uuid_father uuid)
RETURNS int
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_requeued int;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM @schema@.batch WHERE uuid_parent = uuid_father AND role_name = current_user) THEN
        RAISE EXCEPTION 'no batch with uuid % submitted by %', uuid_father, current_user
            USING ERRCODE = 'no_data_found', HINT = 'Children run as the role that submitted them; only it can retry.';
    END IF;
    -- New runners wait for this transaction, as for the one that queued the batch.
    UPDATE @schema@.batch SET stop_requested_at = NULL, enqueue_xid = pg_current_xact_id()
     WHERE uuid_parent = uuid_father;
    -- done children stay done: a retry runs only what did not succeed.
    WITH r AS (
        UPDATE @schema@.log_background
           SET status = 'queued', pid = NULL, backend_start = NULL, result = NULL,
               start_time_exec = NULL, end_time_exec = NULL, stop_requested = false,
               sqlstate = NULL, error = NULL, error_detail = NULL, error_hint = NULL, error_context = NULL
         WHERE uuid_parent = uuid_father AND status IN ('failed', 'lost', 'stopped')
        RETURNING 1)
    SELECT count(*) INTO v_requeued FROM r;
    PERFORM @schema@._housekeep(uuid_father);
    RETURN v_requeued;
END
$fn$;
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

CREATE VIEW @schema@.batches WITH (security_invoker = true) AS
SELECT b.uuid_parent, b.label, b.origin, b.role_name, b.user_name, b.created_at, b.max_parallel,
       b.fail_fast, b.statement_timeout, b.stop_requested_at,
       @schema@.batch_status(b.uuid_parent) AS status,
       count(*) AS children,
       count(*) FILTER (WHERE c.status = 'queued') AS queued,
       count(*) FILTER (WHERE c.status = 'running') AS running,
       count(*) FILTER (WHERE c.status = 'done') AS done,
       count(*) FILTER (WHERE c.status = 'failed') AS failed,
       count(*) FILTER (WHERE c.status = 'stopped') AS stopped,
       count(*) FILTER (WHERE c.status = 'lost') AS lost,
       min(c.start_time_exec) AS started_at,
       CASE WHEN bool_and(c.end_time_exec IS NOT NULL) THEN max(c.end_time_exec) END AS ended_at
  FROM @schema@.batch b
  JOIN @schema@.log_background c USING (uuid_parent)
 GROUP BY b.uuid_parent;
COMMENT ON VIEW @schema@.batches IS 'One row per batch the caller may see, with counts per child status.';

CREATE FUNCTION @schema@.pg_background_poll(uuid_father uuid, p_wait interval DEFAULT NULL)
RETURNS SETOF @schema@.batches
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_deadline timestamptz := clock_timestamp() + coalesce(p_wait, interval '0');
    v_nap float8 := 0.005;
BEGIN
    -- Waiting here (rather than sleeping in the poller) notices the end within milliseconds; each
    -- call is still one short statement, so CREATE INDEX CONCURRENTLY waits at most p_wait for it.
    LOOP
        PERFORM @schema@._housekeep(uuid_father);
        EXIT WHEN clock_timestamp() >= v_deadline
               OR @schema@.batch_status(uuid_father) IS DISTINCT FROM 'running'
                  AND @schema@.batch_status(uuid_father) IS DISTINCT FROM 'queued';
        PERFORM pg_sleep(least(v_nap, greatest(extract(epoch FROM v_deadline - clock_timestamp()), 0)));
        v_nap := least(v_nap * 2, 0.1);
    END LOOP;
    RETURN QUERY SELECT * FROM @schema@.batches WHERE uuid_parent = uuid_father;
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_poll(uuid, interval) IS
    'What a poller needs in one round trip: the housekeeping of pg_background_monitor() and the batch''s '
    'row of the batches view (status and counts), without the child rows; with p_wait, first waits up to '
    'that long for the batch to end. No row for an unknown batch.';

------------------------------------------------------------------------------------------------
-- Privileges: nothing for PUBLIC; pgbg_user submits and manages its own batches; pgbg_admin all.
------------------------------------------------------------------------------------------------

REVOKE ALL ON SCHEMA @schema@ FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA @schema@ FROM PUBLIC;
REVOKE ALL ON ALL ROUTINES IN SCHEMA @schema@ FROM PUBLIC;
GRANT USAGE ON SCHEMA @schema@ TO pgbg_user;
GRANT EXECUTE ON ALL ROUTINES IN SCHEMA @schema@ TO pgbg_user;
GRANT SELECT ON @schema@.meta, @schema@.settings, @schema@.batches TO pgbg_user;
GRANT SELECT, INSERT, DELETE ON @schema@.batch, @schema@.log_background TO pgbg_user;
-- No role may change what a child executes or whose it is once it is queued.
GRANT UPDATE (stop_requested_at, enqueue_xid, claimed_by) ON @schema@.batch TO pgbg_user;
GRANT UPDATE (status, pid, backend_start, result, start_time_exec, end_time_exec, attempt, stop_requested,
              sqlstate, error, error_detail, error_hint, error_context)
    ON @schema@.log_background TO pgbg_user;
GRANT USAGE ON SEQUENCE @schema@.log_background_id_seq TO pgbg_user;
GRANT UPDATE ON @schema@.settings TO pgbg_admin;
