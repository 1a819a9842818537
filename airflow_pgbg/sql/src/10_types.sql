-- Row shapes returned by the engine's functions (not stored in tables).

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
    run_mode text,
    not_before timestamptz,
    errors jsonb
);
COMMENT ON TYPE @schema@.monitor_row IS 'Row shape of pg_background_monitor(); airflow_pgbg.status.MONITOR_COLUMNS mirrors it.';

CREATE TYPE @schema@.cron_run AS (status text, job_pid int, start_time timestamptz, return_message text);
COMMENT ON TYPE @schema@.cron_run IS 'The run of a pg_cron job that runs one child (see _cron_run()).';

CREATE TYPE @schema@.child_outcome AS (
    result jsonb,
    sqlstate text,
    message text,
    detail text,
    hint text,
    context text
);
COMMENT ON TYPE @schema@.child_outcome IS
    'How a child''s statement ended, as its runner saw it: its result document, or its error (SQLSTATE, '
    'message, detail, hint, context). _settle() turns it into the child''s status.';
