-- Splitting batch text into statements, and classifying a statement by its leading keywords.

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
COMMENT ON FUNCTION @schema@._strip_leading_comments(text) IS
    'The statement without the comments, blanks and opening parentheses it starts with.';

CREATE FUNCTION @schema@._statement_head(p_sql text)
RETURNS text
LANGUAGE sql IMMUTABLE
-- Most statements start with no comment: the PL/pgSQL scanner only for those that do (it runs per
-- statement at launch, and per child in a runner).
RETURN upper(regexp_replace(
    substring(CASE WHEN left(ltrim(p_sql, E' \t\r\n\f\v('), 2) IN ('--', '/*')
                   THEN @schema@._strip_leading_comments(p_sql)
                   ELSE ltrim(p_sql, E' \t\r\n\f\v(') END,
              '^([[:alpha:]]+(\s+[[:alpha:]]+){0,3})'),
    '\s+', ' ', 'g'));
COMMENT ON FUNCTION @schema@._statement_head(text) IS
    'Up to four leading keywords, upper case, after comments and opening parentheses.';

CREATE FUNCTION @schema@._first_keyword(p_sql text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
-- NULL when a comment comes first: only _statement_head() reads past that.
RETURN upper(substring(p_sql FROM '^[ \t\r\n\f\v(]*([[:alpha:]]+)'));
COMMENT ON FUNCTION @schema@._first_keyword(text) IS
    'The first word of _statement_head(), cheaply, for a statement that starts with no comment; else NULL.';

CREATE FUNCTION @schema@._needs_own_worker(p_sql text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
-- The usual verbs are decided by their first keyword: this runs for every statement of a launch.
RETURN CASE @schema@._first_keyword(p_sql)
    WHEN 'SELECT' THEN p_sql ~* '\mINTO\M'
    WHEN 'INSERT' THEN false WHEN 'UPDATE' THEN false WHEN 'DELETE' THEN false WHEN 'MERGE' THEN false
    WHEN 'WITH' THEN false WHEN 'VALUES' THEN false WHEN 'TABLE' THEN false WHEN 'ANALYZE' THEN false
    WHEN 'TRUNCATE' THEN false WHEN 'COPY' THEN false
    ELSE @schema@._statement_head(p_sql) ~ ('^(VACUUM|CALL|DO|CLUSTER|REINDEX|SET|RESET|DISCARD|LOAD'
                                           '|ALTER SYSTEM|CREATE DATABASE|DROP DATABASE|ALTER DATABASE'
                                           '|CREATE TABLESPACE|DROP TABLESPACE)( |$)')
    OR (@schema@._statement_head(p_sql) ~ '^(CREATE|DROP|ALTER) '
        AND p_sql ~* '\m(INDEX|PARTITION)\M.*\mCONCURRENTLY\M')
    -- SELECT ... INTO creates a table, which dynamic SQL in a function refuses.
    OR (@schema@._statement_head(p_sql) ~ '^SELECT( |$)' AND p_sql ~* '\mINTO\M')
END;
COMMENT ON FUNCTION @schema@._needs_own_worker(text) IS
    'True for statements that must be a top-level statement of their own: they refuse to run in a '
    'function or transaction block, may commit (CALL, DO), or would change the runner''s session (SET).';

CREATE FUNCTION @schema@._waits_for_older_snapshots(p_sql text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
RETURN p_sql ~* '\mCONCURRENTLY\M'
   AND (@schema@._statement_head(p_sql) ~ '^(CREATE (UNIQUE )?INDEX|REINDEX)( |$)'
        OR @schema@._statement_head(p_sql) ~ '^ALTER TABLE' AND p_sql ~* '\mDETACH\s+PARTITION\M');
COMMENT ON FUNCTION @schema@._waits_for_older_snapshots(text) IS
    'True for CREATE INDEX, REINDEX and ALTER TABLE ... DETACH PARTITION CONCURRENTLY: they wait for every '
    'snapshot older than theirs, a waiting statement''s too.';
