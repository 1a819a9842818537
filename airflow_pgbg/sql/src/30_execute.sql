-- Executing one child inside the runner's transaction, and its result document.

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
