-- Executing one child inside the runner's transaction, and its result document.

CREATE FUNCTION @schema@._command_tag(p_head text, p_rows bigint)
RETURNS text
LANGUAGE sql IMMUTABLE
-- p_rows::text, not text || bigint: that operator is only stable, and would keep this from being inlined.
RETURN CASE split_part(p_head, ' ', 1)
    WHEN 'INSERT' THEN 'INSERT 0 ' || p_rows::text
    WHEN 'UPDATE' THEN 'UPDATE ' || p_rows::text
    WHEN 'DELETE' THEN 'DELETE ' || p_rows::text
    WHEN 'MERGE' THEN 'MERGE ' || p_rows::text
    WHEN 'SELECT' THEN 'SELECT ' || p_rows::text
    WHEN 'VALUES' THEN 'SELECT ' || p_rows::text
    WHEN 'TABLE' THEN 'SELECT ' || p_rows::text
    WHEN 'WITH' THEN 'WITH ' || p_rows::text
    WHEN 'COPY' THEN 'COPY ' || p_rows::text
    WHEN 'CREATE' THEN substring(p_head FROM '^CREATE (?:OR REPLACE |UNIQUE |TEMP |TEMPORARY |UNLOGGED )*[A-Z]+')
    WHEN 'DROP' THEN substring(p_head FROM '^DROP [A-Z]+')
    WHEN 'ALTER' THEN substring(p_head FROM '^ALTER [A-Z]+')
    ELSE split_part(p_head, ' ', 1)
END;
COMMENT ON FUNCTION @schema@._command_tag(text, bigint) IS
    'PL/pgSQL does not expose the command tag of a dynamic statement; this rebuilds it from its leading '
    'keywords (_statement_head()).';

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

CREATE FUNCTION @schema@._rows_document(p_sql text, p_head text, p_preview_rows int, p_preview_bytes int)
RETURNS jsonb
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_total bigint := 0;
    v_rows jsonb[] := '{}';
    v_preview jsonb;
    r record;
BEGIN
    -- Every row is read (the statement runs to completion); only the first p_preview_rows become JSON.
    FOR r IN EXECUTE p_sql LOOP
        v_total := v_total + 1;
        IF v_total <= p_preview_rows THEN
            v_rows := v_rows || to_jsonb(r);
        END IF;
    END LOOP;
    v_preview := to_jsonb(v_rows);
    RETURN jsonb_build_object('command', @schema@._command_tag(p_head, v_total), 'rows', v_total)
           || CASE WHEN octet_length(v_preview::text) <= p_preview_bytes  -- the usual, cheap case
                   THEN jsonb_build_object('preview', v_preview, 'truncated', cardinality(v_rows) < v_total)
                   ELSE @schema@._bounded_preview(v_preview, v_total, p_preview_bytes) END;
END
$fn$;
COMMENT ON FUNCTION @schema@._rows_document(text, text, int, int) IS
    'Runs a statement that returns rows; its result document with a bounded preview of them.';

CREATE FUNCTION @schema@._execute_inline(p_sql text, p_preview_rows int, p_preview_bytes int)
RETURNS jsonb
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_head text := @schema@._statement_head(p_sql);
    v_verb text := split_part(v_head, ' ', 1);
    v_total bigint;
BEGIN
    IF v_verb IN ('SELECT', 'VALUES', 'TABLE')
       OR (v_verb IN ('INSERT', 'UPDATE', 'DELETE', 'MERGE') AND p_sql ~* '\mRETURNING\M') THEN
        RETURN @schema@._rows_document(p_sql, v_head, p_preview_rows, p_preview_bytes);
    ELSIF v_verb = 'WITH' THEN
        BEGIN
            RETURN @schema@._rows_document(p_sql, v_head, p_preview_rows, p_preview_bytes);
        EXCEPTION WHEN invalid_cursor_definition THEN
            NULL;  -- a data-modifying WITH that returns no rows: refused before it ran, so run it as it is
        END;
    END IF;
    EXECUTE p_sql;
    GET DIAGNOSTICS v_total = ROW_COUNT;
    RETURN jsonb_build_object('command', @schema@._command_tag(v_head, v_total), 'rows', v_total);
END
$fn$;
COMMENT ON FUNCTION @schema@._execute_inline(text, int, int) IS
    'Executes one statement in the caller''s transaction and returns its result document.';
