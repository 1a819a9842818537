-- Batch settings: what every child of a batch runs with on top of its role's defaults, whoever runs it
-- (a runner the submitter, a poll, a wait or another batch started; a nested worker; a pg_cron job).
-- The engine's own statements in a runner run with the role's defaults alone: a batch's lock_timeout
-- must not make its runner give up on its own bookkeeping.

CREATE FUNCTION @schema@._engine_owned_setting(p_name text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
-- Who the children run as, the name runners and nested workers are found by, and what applies per
-- transaction (a child may run in its runner's transaction, which began before the child's settings).
RETURN p_name IN ('role', 'session_authorization', 'application_name', 'transaction_timeout',
                  'transaction_isolation', 'transaction_read_only', 'transaction_deferrable',
                  'default_transaction_isolation', 'default_transaction_read_only',
                  'default_transaction_deferrable');
COMMENT ON FUNCTION @schema@._engine_owned_setting(text) IS
    'Settings a batch may not set: who its children run as, the engine''s names for its processes, and '
    'settings that apply per transaction.';

CREATE FUNCTION @schema@._check_setting_name(p_name text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $fn$
DECLARE
    v_name text := lower(p_name);
BEGIN
    IF v_name IS NULL OR v_name !~ '^[a-z_][a-z0-9_$]*(\.[a-z_][a-z0-9_$]*)*$' THEN
        RAISE EXCEPTION 'batch setting %: not the name of a configuration parameter', coalesce(quote_literal(p_name), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF @schema@._engine_owned_setting(v_name) THEN
        RAISE EXCEPTION 'batch setting %: the engine sets it, not a batch', v_name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = CASE WHEN v_name = 'transaction_timeout' THEN 'A statement timeout limits each child.'
                              ELSE 'Children run as the role that launched the batch, each in a transaction of the engine.' END;
    END IF;
    RETURN v_name;
END
$fn$;
COMMENT ON FUNCTION @schema@._check_setting_name(text) IS
    'The setting''s name in lower case; raises for what is no name, or a setting of the engine''s own.';

CREATE FUNCTION @schema@._check_setting(p_name text, p_value text)
RETURNS text
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_name text := @schema@._check_setting_name(p_name);
    v_value text;
    v_state text;
    v_message text;
BEGIN
    IF p_value IS NULL THEN
        RAISE EXCEPTION 'batch setting %: no value', v_name USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- What PostgreSQL itself says of this name and value for this role, tried and rolled back.
    BEGIN
        PERFORM set_config(v_name, p_value, true);
        v_value := current_setting(v_name);
        RAISE SQLSTATE 'PGBG1';
    EXCEPTION
        WHEN SQLSTATE 'PGBG1' THEN
            NULL;
        WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT;
            RAISE EXCEPTION 'batch setting %: %', v_name, v_message USING ERRCODE = v_state;
    END;
    RETURN v_value;
END
$fn$;
COMMENT ON FUNCTION @schema@._check_setting(text, text) IS
    'The setting''s value as PostgreSQL shows it once set, or the error it raises for this name and value '
    'for this role (unknown, bad value, not settable in a session or by this role), prefixed with the name.';

CREATE FUNCTION @schema@._leading_set(p_sql text, OUT name text, OUT value text)
LANGUAGE plpgsql
AS $fn$
DECLARE
    m text[] := regexp_match(@schema@._strip_leading_comments(p_sql),
                             '^SET\s+(SESSION\s+)?(TIME\s+ZONE|SCHEMA|[[:alpha:]_][[:alnum:]_$]*(\.[[:alpha:]_][[:alnum:]_$]*)*)'
                             '(\s*=|\s+TO\M|\s+(?=[^=]))', 'i');
    v_state text;
    v_message text;
BEGIN
    IF m IS NULL OR upper(m[2]) IN ('LOCAL', 'ROLE', 'SESSION', 'AUTHORIZATION', 'CHARACTERISTICS', 'TRANSACTION',
                                    'CONSTRAINTS', 'NAMES', 'XML')
       OR cardinality(@schema@.split_statements(p_sql, ';')) <> 1 THEN
        RETURN;  -- not a SET of a setting: refused with the others
    END IF;
    name := @schema@._check_setting_name(CASE upper(regexp_replace(m[2], '\s+', ' ', 'g'))
                                             WHEN 'TIME ZONE' THEN 'timezone' WHEN 'SCHEMA' THEN 'search_path'
                                             ELSE m[2] END);
    -- The value as PostgreSQL reads it (units, lists, quoting): the statement itself, rolled back.
    BEGIN
        EXECUTE p_sql;
        value := current_setting(name);
        RAISE SQLSTATE 'PGBG1';
    EXCEPTION
        WHEN SQLSTATE 'PGBG1' THEN
            NULL;
        WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT;
            RAISE EXCEPTION 'batch setting %: %', name, v_message USING ERRCODE = v_state;
    END;
END
$fn$;
COMMENT ON FUNCTION @schema@._leading_set(text) IS
    'For "SET name = value" / "SET name TO value" (also SET TIME ZONE, SET SCHEMA): the setting and its '
    'value as PostgreSQL reads them; NULLs for any other statement. Raises for a bad name or value.';

CREATE FUNCTION @schema@._code_only(p_sql text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $fn$
DECLARE
    rest text := p_sql;
    code text := '';
    k int;
    opener text;
    closer text;
    n int;
BEGIN
    -- Positions, not one regular expression: PostgreSQL's matches one quantifier's greed for all.
    LOOP
        k := regexp_instr(rest, '[''"]|--|/\*|\$([[:alpha:]_][[:alnum:]_]*)?\$');
        IF k = 0 THEN
            RETURN code || rest;
        END IF;
        code := code || left(rest, k - 1) || ' ';
        rest := substr(rest, k);
        opener := substring(rest FROM '^([''"]|--|/\*|\$([[:alpha:]_][[:alnum:]_]*)?\$)');
        IF opener IN ('''', '"') THEN
            n := length(substring(rest FROM '^' || opener || '(?:[^' || opener || ']|' || opener || opener || ')*' || opener));
        ELSE
            closer := CASE opener WHEN '--' THEN E'\n' WHEN '/*' THEN '*/' ELSE opener END;
            n := strpos(substr(rest, length(opener) + 1), closer);
            n := CASE WHEN n = 0 THEN NULL ELSE length(opener) + n + length(closer) - 1 END;
        END IF;
        IF n IS NULL THEN
            RETURN code;  -- unterminated: the rest is inside it
        END IF;
        rest := substr(rest, n + 1);
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION @schema@._code_only(text) IS
    'The statement with its string literals, quoted names, comments and dollar-quoted bodies blanked out.';

CREATE FUNCTION @schema@._changes_session(p_sql text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
RETURN coalesce(@schema@._first_keyword(p_sql) IN ('SET', 'RESET', 'DISCARD'),
                @schema@._statement_head(p_sql) ~ '^(SET|RESET|DISCARD)( |$)')
    OR (p_sql ~* 'set_config' AND @schema@._code_only(p_sql) ~* '\mset_config\s*\(');
COMMENT ON FUNCTION @schema@._changes_session(text) IS
    'True for SET, RESET and DISCARD statements and calls of set_config(): in a runner they would change '
    'the session of the children after it.';

CREATE FUNCTION @schema@._batch_settings(p_querys text[], p_settings jsonb, p_statement_timeout interval,
                                         OUT querys text[], OUT settings jsonb, OUT statement_timeout interval)
LANGUAGE plpgsql
AS $fn$
DECLARE
    s record;
    v_k int := 1;
    v_set record;
BEGIN
    IF p_settings IS NOT NULL AND jsonb_typeof(p_settings) <> 'object' THEN
        RAISE EXCEPTION 'p_settings must be a JSON object of setting names and values, not %', jsonb_typeof(p_settings)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The submitter's search_path unless the batch names one, as a session started by that role
    -- would see it after "SET search_path".
    settings := jsonb_build_object('search_path', current_setting('search_path'));
    FOR s IN SELECT e.key, e.value FROM jsonb_each(coalesce(p_settings, '{}')) e LOOP
        IF jsonb_typeof(s.value) NOT IN ('string', 'number', 'boolean') THEN
            RAISE EXCEPTION 'batch setting %: its value must be a string, number or boolean, not %', s.key,
                jsonb_typeof(s.value) USING ERRCODE = 'invalid_parameter_value';
        END IF;
        PERFORM @schema@._check_setting(s.key, s.value #>> '{}');
        settings := settings || jsonb_build_object(lower(s.key), s.value #>> '{}');
    END LOOP;
    -- A script's leading SET statements are its settings, as in a session of its own.
    WHILE v_k <= cardinality(p_querys) AND @schema@._statement_head(p_querys[v_k]) ~ '^SET( |$)' LOOP
        v_set := @schema@._leading_set(p_querys[v_k]);
        EXIT WHEN v_set.name IS NULL;
        settings := settings || jsonb_build_object(v_set.name, v_set.value);
        v_k := v_k + 1;
    END LOOP;
    querys := p_querys[v_k:];
    IF cardinality(querys) = 0 THEN
        RAISE EXCEPTION 'batch holds only SET statements: nothing to run with those settings'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT k + v_k - 1 AS k, q INTO s FROM unnest(querys) WITH ORDINALITY AS u(q, k)
     WHERE @schema@._changes_session(q) ORDER BY k LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'statement % of the batch changes the session (%): a batch''s settings are set for all its children',
            s.k, left(regexp_replace(@schema@._strip_leading_comments(s.q), '\s+', ' ', 'g'), 60)
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'Children share runner sessions, so one child''s SET, RESET, DISCARD or set_config() would '
                           'change the next ones''; only SET statements at the start of a batch become its settings.',
                  HINT = 'Give settings with p_settings (Airflow: session_settings), or as SET statements at the '
                         'start of the batch.';
    END IF;
    -- A statement timeout cuts the statement it is armed for: a child's own, in a worker of its own
    -- (p_statement_timeout), never its runner's.
    statement_timeout := p_statement_timeout;
    IF settings ? 'statement_timeout' THEN
        statement_timeout := nullif(@schema@._check_setting('statement_timeout', settings ->> 'statement_timeout'),
                                    '0')::interval;
        settings := settings - 'statement_timeout';
        IF p_statement_timeout IS NOT NULL AND statement_timeout IS DISTINCT FROM p_statement_timeout THEN
            RAISE EXCEPTION 'the batch''s statement timeout is given twice: % and statement_timeout = %',
                p_statement_timeout, coalesce(statement_timeout::text, '0')
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
END
$fn$;
COMMENT ON FUNCTION @schema@._batch_settings(text[], jsonb, interval) IS
    'The batch''s settings (p_settings, then its leading SET statements, over the submitter''s '
    'search_path), each checked by PostgreSQL for this role; the statements after those SETs; and its '
    'statement timeout (p_statement_timeout, or a statement_timeout setting). Raises for a bad setting or '
    'a statement that would change a runner''s session.';

CREATE FUNCTION @schema@._enter_batch_session(p_settings jsonb)
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM set_config(s.key, s.value, false) FROM jsonb_each_text(p_settings) s;
END
$fn$;
COMMENT ON FUNCTION @schema@._enter_batch_session(jsonb) IS
    'Sets a batch''s settings for the child about to run (see _leave_batch_session()).';

CREATE FUNCTION @schema@._leave_batch_session()
RETURNS void
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_app text := current_setting('application_name');
BEGIN
    -- RESET ALL also undoes what the child set itself, through a function the launch could not see.
    RESET ALL;
    PERFORM set_config('application_name', v_app, false);
    -- A child that wrote nothing has nothing to make durable but its log row, which a crash would
    -- only put back in the queue: its commit need not wait for a WAL flush.
    IF pg_current_xact_id_if_assigned() IS NULL THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
END
$fn$;
COMMENT ON FUNCTION @schema@._leave_batch_session() IS
    'Back to the role''s defaults after a child: its batch''s settings and anything the child set go. A '
    'transaction that has written nothing yet commits without waiting for a WAL flush.';

CREATE FUNCTION @schema@._setting_is_default(p_name text, p_value text)
RETURNS boolean
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_given text;
    v_default text;
BEGIN
    BEGIN
        PERFORM set_config(p_name, p_value, true);
        v_given := current_setting(p_name);
        EXECUTE format('SET LOCAL %I TO DEFAULT', p_name);
        v_default := current_setting(p_name, true);
        RAISE SQLSTATE 'PGBG1';
    EXCEPTION WHEN SQLSTATE 'PGBG1' THEN
        NULL;
    END;
    RETURN v_given IS NOT DISTINCT FROM v_default;
END
$fn$;
COMMENT ON FUNCTION @schema@._setting_is_default(text, text) IS
    'Whether a setting''s value is what this session has by default (compared as PostgreSQL shows them).';

CREATE FUNCTION @schema@._non_default_settings(p_settings jsonb)
RETURNS text
LANGUAGE sql
RETURN (SELECT string_agg(format('%s = %s', s.key, s.value), ', ' ORDER BY s.key)
          FROM jsonb_each_text(p_settings) s WHERE NOT @schema@._setting_is_default(s.key, s.value));
COMMENT ON FUNCTION @schema@._non_default_settings(jsonb) IS
    'The batch''s settings that differ from this session''s defaults, as text; NULL when none does.';
