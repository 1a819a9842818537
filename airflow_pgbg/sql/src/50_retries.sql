-- Automatic retries: which failures are transient, when the next attempt is due.

CREATE FUNCTION @schema@._is_transient(p_sqlstate text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
RETURN p_sqlstate IN ('40001', '40P01', '55P03', '57P01', '57P02', '57P03', '53300')
    OR left(p_sqlstate, 2) = '08';
COMMENT ON FUNCTION @schema@._is_transient(text) IS
    'Failures worth trying again unchanged: serialization failure, deadlock, lock not available, '
    'shutdown or restart, too many connections, connection exceptions (class 08).';

CREATE FUNCTION @schema@._retry_at(p_delay interval, p_backoff float8, p_failures int)
RETURNS timestamptz
LANGUAGE sql VOLATILE
RETURN clock_timestamp() + p_delay * power(p_backoff, p_failures);
COMMENT ON FUNCTION @schema@._retry_at(interval, float8, int) IS
    'When the next automatic retry may start: the delay grows by p_backoff with each failure.';

CREATE FUNCTION @schema@._attempt_error(p_attempt int, p_status text, p_sqlstate text, p_error text)
RETURNS jsonb
LANGUAGE sql VOLATILE
RETURN jsonb_build_array(jsonb_build_object('attempt', p_attempt, 'status', p_status, 'sqlstate', p_sqlstate,
                                            'error', p_error, 'at', clock_timestamp()));
COMMENT ON FUNCTION @schema@._attempt_error(int, text, text, text) IS 'One entry of log_background.errors.';

CREATE FUNCTION @schema@._validate_retries(p_retries int, p_retry_delay interval, p_retry_backoff float8)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $fn$
BEGIN
    IF p_retries IS NULL OR p_retries < 0 THEN
        RAISE EXCEPTION 'p_retries must be 0 or more, got %', coalesce(p_retries::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_retries > 0 AND (p_retry_delay IS NULL OR p_retry_delay < interval '0') THEN
        RAISE EXCEPTION 'p_retry_delay must be 0 or more when p_retries > 0, got %', coalesce(p_retry_delay::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_retry_backoff IS NULL OR p_retry_backoff < 1 THEN
        RAISE EXCEPTION 'p_retry_backoff must be 1 or more, got %', coalesce(p_retry_backoff::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$fn$;
COMMENT ON FUNCTION @schema@._validate_retries(int, interval, float8) IS
    'Rejects bad retry options before anything is recorded.';
