-- airflow_pgbg engine: version 1.1.8, installed from nothing.
--
-- Built by scripts/build_engine.py from airflow_pgbg/sql/src and airflow_pgbg/sql/migrations: edit those,
-- not this file. The installer (python -m airflow_pgbg install) renders @schema@ as the engine's schema
-- and @pgbg_ext@ as the schema of the pg_background extension (the engine's schema where the server
-- has none).

-- How a batch runs. pg_background_launch_num() records the batch and its children (one row per
-- statement in log_background, status 'queued') and starts up to max_parallel *runners*. A runner
-- holds one slot (a session advisory lock) and loops: record the outcome of the child it just ran,
-- in the transaction of its work, together with the claim of the next queued child (FOR UPDATE SKIP
-- LOCKED), commit, execute that child. So a freed slot is refilled by the runner itself within
-- milliseconds, nobody needs to poll, and the launching session may disconnect. Children whose
-- failure is transient are queued again after a delay; the counts per status are kept as deltas in
-- batch_progress, so a poll costs the same whatever the size of the batch; the runner that records a
-- batch's last outcome announces it on batch_end_channel().
--
-- Launchers (settings.launcher). pg_background: runners are pg_background workers, and a child that
-- cannot run inside a function or a transaction block (VACUUM, CREATE INDEX CONCURRENTLY, CALL of a
-- procedure that commits, ...) runs in a nested worker of its own. pg_cron (managed services):
-- runners are pg_cron jobs of the submitting role that exist only while it has work, and such a
-- child runs as the command of a job of its own.
--
-- There is no SECURITY DEFINER here: runners run as the role that submitted the batch, row-level
-- security limits every role to its own batches, and pgbg_admin sees all.
--
-- Seed status words map onto the vocabulary as: running -> running, sleep -> queued,
-- stop -> stopped; done / failed / lost are new (the seed recorded no outcome).

-- The engine's state: its tables, their indexes and row-level security. Only a fresh install runs
-- this file; an upgrade runs a hand-written step of ../migrations/ in its place, after dropping the
-- routines and views that the files after this one create anew (a test keeps both ways equal).

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
    preview_bytes int NOT NULL DEFAULT 65536 CHECK (preview_bytes >= 0),
    launcher text NOT NULL DEFAULT 'pg_background' CHECK (launcher IN ('pg_background', 'pg_cron')),
    cron_max_running_jobs int CHECK (cron_max_running_jobs > 0),
    cron_linger interval NOT NULL DEFAULT '5 s' CHECK (cron_linger >= interval '0'),
    linger interval NOT NULL DEFAULT '2 s' CHECK (linger >= interval '0')
);
COMMENT ON TABLE @schema@.settings IS 'Engine-wide settings; only pgbg_admin may change them.';
COMMENT ON COLUMN @schema@.settings.max_workers IS
    'Global cap on runners across all batches of this database. NULL: (max_worker_processes - 2) / 2, '
    'because a runner may need a second worker for a top-level statement and the server needs headroom.';
COMMENT ON COLUMN @schema@.settings.launcher IS
    'What starts runners: pg_background workers, or pg_cron jobs (chosen by the installer).';
COMMENT ON COLUMN @schema@.settings.cron_max_running_jobs IS
    'cron.max_running_jobs, which only superusers may read, recorded by the installer (it changes only '
    'with a restart; run the installer again after one).';
COMMENT ON COLUMN @schema@.settings.cron_linger IS
    'pg_cron: how long a runner with nothing left to run stays for its role''s next batch before it parks '
    'its job. A batch launched meanwhile starts within 20 ms; a parked job takes pg_cron up to 2 s to start '
    'again. Each lingering runner holds one of cron.max_running_jobs.';
COMMENT ON COLUMN @schema@.settings.linger IS
    'pg_background: how long a runner with nothing left to run stays for its role''s next batch, which it '
    'starts within 20 ms rather than the few tens of ms new runners take. It holds no slot meanwhile, but one '
    'of max_worker_processes. 0: runners leave at once.';
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
    stop_requested_at timestamptz,
    retries int NOT NULL DEFAULT 0 CHECK (retries >= 0),
    retry_delay interval NOT NULL DEFAULT interval '1 second' CHECK (retry_delay >= interval '0'),
    retry_backoff float8 NOT NULL DEFAULT 2 CHECK (retry_backoff >= 1),
    retry_lost boolean NOT NULL DEFAULT false,
    claimed_at timestamptz,
    requeue_on_takeover boolean NOT NULL DEFAULT false,
    stop_requested_by text,
    counted boolean NOT NULL DEFAULT true,
    notes text,
    outcome_taken_by text,
    outcome_taken_at timestamptz,
    session_settings jsonb NOT NULL DEFAULT '{}'
);
COMMENT ON TABLE @schema@.batch IS 'One row per batch (parent UUID): who submitted it and how it runs.';
CREATE INDEX ON @schema@.batch (origin, created_at) WHERE origin IS NOT NULL;
COMMENT ON COLUMN @schema@.batch.origin IS
    'Who asked for the batch, e.g. the Airflow task instance; lets a retry find the batch of its first try.';
COMMENT ON COLUMN @schema@.batch.claimed_by IS
    'Which waiter currently owns the batch (Airflow: the try); a stop conditioned on an older holder '
    'does nothing once a newer one has claimed it.';
COMMENT ON COLUMN @schema@.batch.role_name IS 'Role the children run as (current_user at submission).';
COMMENT ON COLUMN @schema@.batch.search_path IS 'The batch''s search_path (also in session_settings).';
COMMENT ON COLUMN @schema@.batch.session_settings IS
    'Settings every child runs with on top of its role''s defaults, whoever runs it: the submitter''s '
    'search_path unless the batch named one, the launch''s p_settings and the batch''s leading SET statements.';
COMMENT ON COLUMN @schema@.batch.fail_fast IS 'The first failed child stops the rest of the batch.';
COMMENT ON COLUMN @schema@.batch.statement_timeout IS
    'Per-child time limit. Such batches run every child in a nested worker, where statement_timeout applies.';
COMMENT ON COLUMN @schema@.batch.enqueue_xid IS 'Transaction that queued the batch; runners wait for it to commit.';
COMMENT ON COLUMN @schema@.batch.retries IS
    'Automatic retries per child of a transient failure (serialization failure, deadlock, lock timeout, '
    'connection loss, shutdown, too many connections; see _is_transient()).';
COMMENT ON COLUMN @schema@.batch.retry_delay IS 'Wait before the first automatic retry of a child.';
COMMENT ON COLUMN @schema@.batch.retry_backoff IS 'Each further retry waits retry_backoff times longer.';
COMMENT ON COLUMN @schema@.batch.retry_lost IS
    'Children lost with their worker (terminated, crashed, server restart) are retried too: the '
    'submitter says its statements are safe to run again.';
COMMENT ON COLUMN @schema@.batch.claimed_at IS 'When claimed_by took the batch.';
COMMENT ON COLUMN @schema@.batch.requeue_on_takeover IS
    'The holder waits for the batch from somewhere that only a person can end (Airflow''s triggerer): '
    'when a newer claim takes the batch over, its running children are stopped and queued again.';
COMMENT ON COLUMN @schema@.batch.stop_requested_by IS 'Who asked for the stop (free text, e.g. an Airflow user).';
COMMENT ON COLUMN @schema@.batch.counted IS
    'false for batches that were running when engine 1.0.0 was installed over 0.1.0: they are counted row by row.';
COMMENT ON COLUMN @schema@.batch.notes IS 'What the engine wants the submitter to know, e.g. a cap it lowered.';
COMMENT ON COLUMN @schema@.batch.outcome_taken_by IS
    'The claim that took the batch''s outcome (pg_background_take_outcome()) as it ended its wait: a task '
    'that completed. A success nobody took is taken by the next claim instead of being run again.';
COMMENT ON COLUMN @schema@.batch.outcome_taken_at IS 'When outcome_taken_by took it.';

CREATE TABLE @schema@.log_background (
    id bigserial PRIMARY KEY,
    pid int,
    status @schema@.child_status NOT NULL DEFAULT 'queued',
    ip_client inet DEFAULT inet_client_addr(),
    user_name name NOT NULL DEFAULT session_user,
    -- No foreign key: its check ran once per row as a launch recorded its children, a third of
    -- registering 5,000 of them. A launch writes the batch first, in the same transaction; the insert
    -- policy below checks the batch is the role's own; a trigger deletes children with their batch.
    uuid_parent uuid NOT NULL,
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
    UNIQUE (uuid_parent, seq),
    not_before timestamptz,
    failures int NOT NULL DEFAULT 0,
    errors jsonb,
    requeue_on_stop boolean NOT NULL DEFAULT false,
    stopped_by text,
    interruptions int NOT NULL DEFAULT 0
);
-- Runners claim the next queued child of a batch in order, after the one they claimed before: only
-- indexes in seq order, so the planner never sorts every queued child once per claim.
CREATE INDEX ON @schema@.log_background (uuid_parent, seq) WHERE status = 'queued';
-- A lingering runner looks for its role's queued work every few ms: by the role, not through every
-- role's queue (the index above held 50,000 queued children of another role: 400 ms a look). In seq
-- order within each batch too: the claim names the role, and the planner chose an index of the role
-- alone where statistics showed a queue nearly empty, then sorted the role's whole queue per claim.
CREATE INDEX ON @schema@.log_background (role_name, uuid_parent, seq) WHERE status = 'queued';
-- Failed, lost and stopped children in order, for summaries and the batch page.
CREATE INDEX ON @schema@.log_background (uuid_parent, seq) WHERE status IN ('failed', 'lost', 'stopped');
-- Housekeeping finds running children through an index of their own; a runner records its child done
-- through it, by batch and id (see the partial indexes' note in _claim()).
CREATE INDEX ON @schema@.log_background (uuid_parent, id) WHERE status = 'running';
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
COMMENT ON COLUMN @schema@.log_background.not_before IS 'A queued retry starts no earlier than this.';
COMMENT ON COLUMN @schema@.log_background.failures IS
    'Automatic retries used since the child was last queued by a person or a new try.';
COMMENT ON COLUMN @schema@.log_background.errors IS
    'Every failed, lost or interrupted attempt, oldest first: [{attempt, status, sqlstate, error, at}].';
COMMENT ON COLUMN @schema@.log_background.requeue_on_stop IS
    'Set with stop_requested by a takeover: the stopped attempt goes back to the queue.';
COMMENT ON COLUMN @schema@.log_background.stopped_by IS 'Who stopped the child.';
COMMENT ON COLUMN @schema@.log_background.interruptions IS
    'Times its runner was cancelled, terminated or died while running it inline: it rolled back each time '
    'and was queued again, without using a retry; at 3 it ends lost.';

-- Time-ordered on PostgreSQL 18 and later: a launch's children go to the end of the index of
-- uuid_child, not to a random page each (with the foreign key gone, half of a launch's registration).
DO $v7$
BEGIN
    IF current_setting('server_version_num')::int >= 180000 THEN
        ALTER TABLE @schema@.log_background ALTER COLUMN uuid_child SET DEFAULT uuidv7();
    END IF;
END
$v7$;
COMMENT ON COLUMN @schema@.log_background.uuid_child IS
    'The child''s public id: uuidv7() on PostgreSQL 18 and later (time-ordered), gen_random_uuid() before.';

-- Takes a batch's children with it, as ON DELETE CASCADE did, once per statement. A trigger function is
-- the tables' own: an upgrade keeps it, as it keeps the trigger (migrations/ change it).
CREATE FUNCTION @schema@._delete_children()
RETURNS trigger
LANGUAGE plpgsql
AS $fn$
BEGIN
    DELETE FROM @schema@.log_background c USING deleted_batch d WHERE c.uuid_parent = d.uuid_parent;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION @schema@._delete_children() IS
    'Trigger of batch: deletes the children of the batches a statement deleted.';
CREATE TRIGGER delete_children AFTER DELETE ON @schema@.batch
    REFERENCING OLD TABLE AS deleted_batch FOR EACH STATEMENT EXECUTE FUNCTION @schema@._delete_children();

-- A role sees and changes only its own rows; pgbg_admin sees and stops everything.
ALTER TABLE @schema@.batch ENABLE ROW LEVEL SECURITY;
ALTER TABLE @schema@.log_background ENABLE ROW LEVEL SECURITY;
CREATE POLICY owner_or_admin ON @schema@.batch
    USING (role_name = current_user OR pg_has_role(current_user, 'pgbg_admin', 'MEMBER'));
-- Restrictive, like the children's below: a permissive one only widens owner_or_admin, which lets an
-- admin's rows (and a child into any batch) through.
CREATE POLICY submit_own ON @schema@.batch AS RESTRICTIVE FOR INSERT WITH CHECK (role_name = current_user);
CREATE POLICY owner_or_admin ON @schema@.log_background
    USING (role_name = current_user OR pg_has_role(current_user, 'pgbg_admin', 'MEMBER'));
-- A child may only be added to a batch of the same role: a runner executes what it claims as itself.
-- Up to engine 1.1.7 this policy was permissive, and so never narrowed owner_or_admin: a role could add
-- children under its own name to another role's batch (never run: runners claim their role's).
CREATE POLICY submit_own ON @schema@.log_background AS RESTRICTIVE FOR INSERT WITH CHECK (
    role_name = current_user
    AND EXISTS (SELECT 1 FROM @schema@.batch b
                WHERE b.uuid_parent = log_background.uuid_parent AND b.role_name = current_user));

CREATE TABLE @schema@.batch_progress (
    uuid_parent uuid NOT NULL REFERENCES @schema@.batch ON DELETE CASCADE,
    shard int NOT NULL,
    role_name name NOT NULL,
    queued bigint NOT NULL DEFAULT 0,
    running bigint NOT NULL DEFAULT 0,
    done bigint NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0,
    stopped bigint NOT NULL DEFAULT 0,
    lost bigint NOT NULL DEFAULT 0,
    first_start timestamptz,
    last_end timestamptz,
    PRIMARY KEY (uuid_parent, shard)
);
COMMENT ON TABLE @schema@.batch_progress IS
    'Children per status of a batch as deltas: the sum over a batch''s rows is its count per status. '
    'shard 0: the enqueue; shard n > 0: the runner holding global slot n; shard -pid: any other writer.';
ALTER TABLE @schema@.batch_progress ENABLE ROW LEVEL SECURITY;
-- role_name is the batch's role, whoever writes the row: pgbg_admin's stops count for the owner too.
-- A row must name its batch's own role, and only that role or pgbg_admin may write it, so nobody can
-- put counts on another role's batch (the batch lookup is itself limited to the batches one may see).
CREATE POLICY owner_or_admin ON @schema@.batch_progress
    USING (role_name = current_user OR pg_has_role(current_user, 'pgbg_admin', 'MEMBER'))
    WITH CHECK ((role_name = current_user OR pg_has_role(current_user, 'pgbg_admin', 'MEMBER'))
                AND EXISTS (SELECT 1 FROM @schema@.batch b
                             WHERE b.uuid_parent = batch_progress.uuid_parent AND b.role_name = batch_progress.role_name));

-- Waiters that show they are alive by a row they keep refreshing, where a session advisory lock
-- (pg_background_watch) would mean nothing: behind a pooler in transaction mode, such a lock stays
-- with a server connection that outlives its client, and holds for whoever uses it next.
CREATE TABLE @schema@.waiter (
    waiter_id uuid PRIMARY KEY,
    role_name name NOT NULL DEFAULT current_user,
    alive_until timestamptz NOT NULL
);
COMMENT ON TABLE @schema@.waiter IS
    'One row per waiter that proves it is alive by heartbeats (pg_background_heartbeat): alive while '
    'alive_until is in the future.';
CREATE TABLE @schema@.waiter_watch (
    waiter_id uuid NOT NULL REFERENCES @schema@.waiter ON DELETE CASCADE,
    uuid_parent uuid NOT NULL REFERENCES @schema@.batch ON DELETE CASCADE,
    claimed_by text NOT NULL,
    role_name name NOT NULL DEFAULT current_user,
    PRIMARY KEY (uuid_parent, claimed_by, waiter_id)
);
COMMENT ON TABLE @schema@.waiter_watch IS
    'Which batches a heartbeat waiter waits for, on behalf of which claim (what pg_background_watched() '
    'reads beside the watch locks).';
CREATE INDEX ON @schema@.waiter_watch (waiter_id);
ALTER TABLE @schema@.waiter ENABLE ROW LEVEL SECURITY;
ALTER TABLE @schema@.waiter_watch ENABLE ROW LEVEL SECURITY;
CREATE POLICY owner_or_admin ON @schema@.waiter
    USING (role_name = current_user OR pg_has_role(current_user, 'pgbg_admin', 'MEMBER'))
    WITH CHECK (role_name = current_user);
-- A foreign key is checked past row-level security: the check names the role's own batches.
CREATE POLICY owner_or_admin ON @schema@.waiter_watch
    USING (role_name = current_user OR pg_has_role(current_user, 'pgbg_admin', 'MEMBER'))
    WITH CHECK (role_name = current_user
                AND EXISTS (SELECT 1 FROM @schema@.batch b
                             WHERE b.uuid_parent = waiter_watch.uuid_parent AND b.role_name = current_user));

-- Locks a role takes on its own work are rows of its own: a session of another role can neither see nor
-- lock them, where an advisory lock's key is anyone's to take (and pg_locks shows it to everyone).
CREATE TABLE @schema@.role_lock (
    role_name name NOT NULL DEFAULT current_user,
    lock_key int NOT NULL,
    PRIMARY KEY (role_name, lock_key)
);
COMMENT ON TABLE @schema@.role_lock IS
    'A row per lock a role takes on its own work (see _lock_role()): key 0 orders its runners deciding to '
    'leave against its launches and housekeeping; keys 1..1024 serialize its submits per origin (a hash).';
ALTER TABLE @schema@.role_lock ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON @schema@.role_lock USING (role_name = current_user) WITH CHECK (role_name = current_user);

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

-- Counting a batch's children per status in constant time, and announcing a batch's end.

CREATE FUNCTION @schema@._count(p_parent uuid, p_role name, p_shard int, p_queued bigint, p_running bigint,
                               p_done bigint, p_failed bigint, p_stopped bigint, p_lost bigint,
                               p_started timestamptz DEFAULT NULL, p_ended timestamptz DEFAULT NULL)
RETURNS void
LANGUAGE sql
AS $fn$
    INSERT INTO @schema@.batch_progress AS p (uuid_parent, shard, role_name, queued, running, done, failed,
                                              stopped, lost, first_start, last_end)
    VALUES (p_parent, p_shard, p_role, p_queued, p_running, p_done, p_failed, p_stopped, p_lost, p_started, p_ended)
    ON CONFLICT (uuid_parent, shard) DO UPDATE
       SET queued = p.queued + excluded.queued, running = p.running + excluded.running,
           done = p.done + excluded.done, failed = p.failed + excluded.failed,
           stopped = p.stopped + excluded.stopped, lost = p.lost + excluded.lost,
           first_start = least(p.first_start, excluded.first_start),
           last_end = greatest(p.last_end, excluded.last_end)
$fn$;
COMMENT ON FUNCTION @schema@._count(uuid, name, int, bigint, bigint, bigint, bigint, bigint, bigint, timestamptz, timestamptz) IS
    'Adds status deltas to one counter row of a batch. Every change of a child''s status calls it in the '
    'same transaction.';

CREATE FUNCTION @schema@._batch_counts(p_parent uuid, p_counted boolean)
RETURNS TABLE (children bigint, queued bigint, running bigint, done bigint, failed bigint, stopped bigint,
               lost bigint, started_at timestamptz, last_end timestamptz)
LANGUAGE sql STABLE
AS $fn$
    SELECT sum(queued + running + done + failed + stopped + lost)::bigint, sum(queued)::bigint,
           sum(running)::bigint, sum(done)::bigint, sum(failed)::bigint, sum(stopped)::bigint, sum(lost)::bigint,
           min(first_start), max(last_end)
      FROM @schema@.batch_progress
     WHERE uuid_parent = p_parent AND p_counted
    HAVING p_counted
    UNION ALL
    SELECT count(*), count(*) FILTER (WHERE status = 'queued'), count(*) FILTER (WHERE status = 'running'),
           count(*) FILTER (WHERE status = 'done'), count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status = 'stopped'), count(*) FILTER (WHERE status = 'lost'),
           min(start_time_exec), max(end_time_exec)
      FROM @schema@.log_background
     WHERE uuid_parent = p_parent AND NOT p_counted
    HAVING NOT p_counted
$fn$;
COMMENT ON FUNCTION @schema@._batch_counts(uuid, boolean) IS
    'Children of a batch per status: the sum of its counter rows, or a count of its children for a '
    'batch that was running when 1.0.0 was installed over 0.1.0.';

CREATE FUNCTION @schema@._status_of(p_children bigint, p_queued bigint, p_running bigint, p_failed bigint,
                                   p_stopped bigint, p_lost bigint)
RETURNS @schema@.child_status
LANGUAGE sql IMMUTABLE
RETURN CASE
    WHEN coalesce(p_children, 0) = 0 THEN NULL
    WHEN p_running > 0 THEN 'running'
    WHEN p_queued > 0 THEN 'queued'
    WHEN p_failed > 0 THEN 'failed'
    WHEN p_lost > 0 THEN 'lost'
    WHEN p_stopped > 0 THEN 'stopped'
    ELSE 'done' END::@schema@.child_status;
COMMENT ON FUNCTION @schema@._status_of(bigint, bigint, bigint, bigint, bigint, bigint) IS
    'A batch''s status from its counts: running or queued while any child is, then the worst outcome.';

CREATE FUNCTION @schema@.batch_status(p_parent uuid)
RETURNS @schema@.child_status
LANGUAGE sql STABLE
AS $fn$
    SELECT @schema@._status_of(n.children, n.queued, n.running, n.failed, n.stopped, n.lost)
      FROM @schema@.batch b CROSS JOIN LATERAL @schema@._batch_counts(b.uuid_parent, b.counted) n
     WHERE b.uuid_parent = p_parent
$fn$;
COMMENT ON FUNCTION @schema@.batch_status(uuid) IS
    'Status of a whole batch in the child vocabulary: running or queued while any child is; then the '
    'worst outcome (failed, lost, stopped), else done. NULL for a batch the caller cannot see.';

CREATE VIEW @schema@.batches WITH (security_invoker = true) AS
SELECT b.uuid_parent, b.label, b.origin, b.role_name, b.user_name, b.created_at, b.max_parallel,
       b.fail_fast, b.statement_timeout, b.stop_requested_at,
       @schema@._status_of(n.children, n.queued, n.running, n.failed, n.stopped, n.lost) AS status,
       n.children, n.queued, n.running, n.done, n.failed, n.stopped, n.lost,
       n.started_at,
       CASE WHEN n.queued + n.running = 0 THEN n.last_end END AS ended_at,
       b.claimed_by, b.claimed_at, b.retries, b.retry_delay, b.retry_backoff, b.retry_lost, b.stop_requested_by,
       b.notes, b.outcome_taken_by, b.outcome_taken_at, b.session_settings
  FROM @schema@.batch b
 CROSS JOIN LATERAL @schema@._batch_counts(b.uuid_parent, b.counted) n;
COMMENT ON VIEW @schema@.batches IS
    'One row per batch the caller may see, with counts per child status; reads a few counter rows per '
    'batch, however many children it has.';

CREATE FUNCTION @schema@.batch_end_channel()
RETURNS text
LANGUAGE sql IMMUTABLE
RETURN '@schema@_batch_end';
COMMENT ON FUNCTION @schema@.batch_end_channel() IS
    'LISTEN channel on which the engine sends a batch''s parent UUID when its last child ends. '
    'Any session of the database may listen; the payload is only the UUID.';

CREATE FUNCTION @schema@._notify_if_ended(p_parents uuid[])
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM pg_notify(@schema@.batch_end_channel(), b.uuid_parent::text)
       FROM @schema@.batch b CROSS JOIN LATERAL @schema@._batch_counts(b.uuid_parent, b.counted) n
      WHERE b.uuid_parent = ANY (p_parents) AND n.queued + n.running = 0;
END
$fn$;
COMMENT ON FUNCTION @schema@._notify_if_ended(uuid[]) IS
    'Notifies the end of those batches that have no queued or running child left (sent on commit).';

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

-- The launcher in use, the caps, and slots: session advisory locks held by runners, freed when a
-- runner dies. Only runners count against a cap, whatever other sessions hold or call themselves.

CREATE FUNCTION @schema@._launcher()
RETURNS text
LANGUAGE sql STABLE
RETURN (SELECT launcher FROM @schema@.settings);
COMMENT ON FUNCTION @schema@._launcher() IS 'pg_background or pg_cron (settings.launcher).';

CREATE FUNCTION @schema@._global_cap()
RETURNS int
LANGUAGE sql STABLE
RETURN (SELECT least(coalesce(s.max_workers, greatest(1, (current_setting('max_worker_processes')::int - 2) / 2)),
                     -- pg_cron runs at most cron.max_running_jobs jobs at once, server-wide, and a
                     -- runner may need a second job for a child that runs at top level.
                     CASE WHEN s.launcher = 'pg_cron' THEN greatest(1, coalesce(s.cron_max_running_jobs, 32) / 2) END)
        FROM @schema@.settings s);
COMMENT ON FUNCTION @schema@._global_cap() IS 'Global runner cap in effect (settings.max_workers or its default).';

CREATE FUNCTION @schema@._cap_source()
RETURNS text
LANGUAGE sql STABLE
RETURN (SELECT CASE
                   WHEN s.launcher = 'pg_cron' AND @schema@._global_cap() = greatest(1, coalesce(s.cron_max_running_jobs, 32) / 2)
                   THEN 'half of cron.max_running_jobs = ' || coalesce(s.cron_max_running_jobs, 32)
                   WHEN s.max_workers IS NOT NULL THEN 'pgbg.settings.max_workers'
                   ELSE 'from max_worker_processes = ' || current_setting('max_worker_processes') END
        FROM @schema@.settings s);
COMMENT ON FUNCTION @schema@._cap_source() IS 'Where the global cap in effect comes from, in words.';

CREATE FUNCTION @schema@._role_key()
RETURNS int
LANGUAGE sql STABLE
RETURN hashtext('@schema@/role/' || current_user) & 2147483647;
COMMENT ON FUNCTION @schema@._role_key() IS
    'The role lock of engine 1.0.0 (an advisory lock, which any session could hold): its runners still '
    'running after an upgrade call it as they leave. See _lock_role().';

CREATE FUNCTION @schema@._lock_role(p_key int, p_exclusive boolean)
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    LOOP
        IF p_exclusive THEN
            PERFORM FROM @schema@.role_lock l WHERE l.role_name = current_user AND l.lock_key = p_key FOR UPDATE;
        ELSE
            PERFORM FROM @schema@.role_lock l WHERE l.role_name = current_user AND l.lock_key = p_key FOR SHARE;
        END IF;
        EXIT WHEN FOUND;
        -- The role's first use of this key; a concurrent first use inserts it too, and both lock it then.
        INSERT INTO @schema@.role_lock (role_name, lock_key) VALUES (current_user, p_key) ON CONFLICT DO NOTHING;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION @schema@._lock_role(int, boolean) IS
    'Locks key p_key of the caller''s role until the end of the transaction (a row of role_lock, which '
    'only that role can lock): shared or exclusive.';

CREATE FUNCTION @schema@._global_lock_key()
RETURNS int
LANGUAGE sql IMMUTABLE
RETURN hashtext('@schema@/global') & 2147483647;
COMMENT ON FUNCTION @schema@._global_lock_key() IS 'Advisory lock key of the global slots of this engine.';

CREATE FUNCTION @schema@._batch_lock_key(p_parent uuid)
RETURNS int
LANGUAGE sql IMMUTABLE
RETURN hashtext('@schema@/' || p_parent::text) & 2147483647;
COMMENT ON FUNCTION @schema@._batch_lock_key(uuid) IS 'Advisory lock key of the slots of one batch.';

CREATE FUNCTION @schema@._is_runner(p_pid int, p_role name)
RETURNS boolean
LANGUAGE sql STABLE
-- What a session says of itself that nobody without the engine's grants can fake: its role (a member
-- of pgbg_user), and, for a role's own sessions, that it is a background worker. Anyone may hold any
-- advisory lock or take any application_name.
-- pg_stat_get_activity(p_pid), not pg_stat_activity: that view lists every backend for each call (0.3 ms a
-- call; a lingering runner's look at its role's slots made one per slot holder).
RETURN EXISTS (SELECT 1 FROM pg_stat_get_activity(p_pid) a
                -- A runner starting a child's own worker is named after the child for a moment (the worker
                -- inherits the name): it still holds its slots.
                WHERE (a.application_name LIKE 'pgbg:%' OR a.application_name LIKE 'pgbg-child:%')
                  AND pg_has_role(a.usesysid, 'pgbg_user', 'MEMBER')
                  AND (p_role IS NULL OR pg_get_userbyid(a.usesysid) = p_role AND a.backend_type IN ('pg_background', 'pg_cron')));
COMMENT ON FUNCTION @schema@._is_runner(int, name) IS
    'Whether a process is an engine runner: of p_role, as a background worker, when given; else of any role '
    'of pgbg_user.';

CREATE FUNCTION @schema@._slot_holders(p_key int, p_role name)
RETURNS int
LANGUAGE sql VOLATILE
RETURN (SELECT count(*)::int FROM pg_locks l
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND l.classid = p_key::oid AND @schema@._is_runner(l.pid, p_role));
COMMENT ON FUNCTION @schema@._slot_holders(int, name) IS
    'Runners (see _is_runner()) holding a slot under p_key; locks others hold there do not count.';

CREATE FUNCTION @schema@._take_slot(p_key int, p_slots int, p_role name)
RETURNS int
LANGUAGE plpgsql VOLATILE
AS $fn$
DECLARE
    v_others int;
BEGIN
    FOR s IN 1..p_slots + 1000 LOOP
        CONTINUE WHEN NOT pg_try_advisory_lock(p_key, s);
        IF s <= p_slots THEN
            RETURN s;
        END IF;
        -- Past the cap only in place of numbers below held by sessions that are not runners.
        PERFORM pg_stat_clear_snapshot();
        SELECT count(*) INTO v_others FROM pg_locks l
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND l.classid = p_key::oid AND l.objid < s::oid AND NOT @schema@._is_runner(l.pid, p_role);
        IF s - v_others <= p_slots THEN
            RETURN s;
        END IF;
        PERFORM pg_advisory_unlock(p_key, s);
        RETURN NULL;
    END LOOP;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION @schema@._take_slot(int, int, name) IS
    'Takes slot 1..p_slots under p_key as a session advisory lock (a number held by a session that is not '
    'a runner of p_role, see _is_runner(), is skipped and not counted); NULL when all are taken.';

CREATE FUNCTION @schema@._try_slot(p_key int, p_slots int)
RETURNS int
LANGUAGE sql VOLATILE
RETURN NULL::int;
COMMENT ON FUNCTION @schema@._try_slot(int, int) IS
    'Slot taking of engine 0.1.0, refused since 1.0.0: a 0.1.0 runner still running after the upgrade '
    'finishes its own batch but adopts no other, whose counters it would not keep.';

-- The pg_background launcher: runners are pg_background workers, and a child that must run at top
-- level runs in a nested worker of its own.

CREATE FUNCTION @schema@._start_top_level(p_sql text, p_child uuid, p_timeout interval, p_settings jsonb)
RETURNS TABLE (pid int, cookie bigint)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_app text := current_setting('application_name');
BEGIN
    -- The nested worker starts with this session's settings: the batch's, for the launch alone.
    PERFORM @schema@._enter_batch_session(p_settings);
    -- statement_timeout is armed per top-level statement, so it works in the nested worker only.
    PERFORM set_config('statement_timeout', coalesce((extract(epoch FROM p_timeout) * 1000)::bigint::text, '0'), false);
    -- The nested worker inherits this session's settings: the name lets pg_background_stop() find it.
    PERFORM set_config('application_name', 'pgbg-child:' || p_child, false);
    -- No free worker slot is not a failure of the statement: wait for one.
    LOOP
        BEGIN
            SELECT h.pid, h.cookie INTO pid, cookie FROM @pgbg_ext@.pg_background_launch_v2(p_sql) h;
            EXIT;
        EXCEPTION WHEN insufficient_resources OR configuration_limit_exceeded THEN
            PERFORM pg_sleep(0.1);
        END;
    END LOOP;
    PERFORM set_config('application_name', v_app, false);
    PERFORM @schema@._leave_batch_session();
    RETURN NEXT;
END
$fn$;
COMMENT ON FUNCTION @schema@._start_top_level(text, uuid, interval, jsonb) IS
    'Starts one statement as the top-level statement of a nested pg_background worker with the batch''s '
    'settings, so VACUUM, CONCURRENTLY and procedures that COMMIT work; waits for a free worker slot rather '
    'than failing.';

CREATE FUNCTION @schema@._top_level_result(p_pid int, p_cookie bigint)
RETURNS jsonb
LANGUAGE plpgsql
-- Some pg_background functions are SQL wrappers that resolve their helpers through search_path,
-- while runners use the submitter's. Nothing here runs user SQL.
SET search_path = @pgbg_ext@, pg_catalog
AS $fn$
DECLARE
    o @pgbg_ext@.pg_background_outcome := @pgbg_ext@.pg_background_outcome_v2(p_pid, p_cookie);
    e @pgbg_ext@.pg_background_error;
BEGIN
    IF o.has_error THEN
        e := @pgbg_ext@.pg_background_error_info_v2(p_pid, p_cookie);
    END IF;
    PERFORM @pgbg_ext@.pg_background_detach_v2(p_pid, p_cookie);
    IF o.has_error THEN
        RAISE EXCEPTION USING ERRCODE = coalesce(e.sqlstate, o.sqlstate, 'XX000'),
            MESSAGE = coalesce(e.message, o.error_message, 'statement failed in its worker'),
            DETAIL = coalesce(e.detail, ''), HINT = coalesce(e.hint, '');
    ELSIF coalesce(o.command_tag, '') = '' THEN
        -- Every statement that ran has a tag: a cancel that reached the worker before its statement began
        -- ends it with neither tag nor error.
        RAISE EXCEPTION USING ERRCODE = 'query_canceled',
            MESSAGE = 'canceling statement due to user request (before it began in its worker)';
    END IF;
    RETURN jsonb_build_object(
        'command', CASE WHEN o.command_tag IN ('SELECT', 'UPDATE', 'DELETE', 'MERGE', 'COPY')
                        THEN o.command_tag || ' ' || coalesce(o.row_count, 0)
                        WHEN o.command_tag = 'INSERT' THEN 'INSERT 0 ' || coalesce(o.row_count, 0)
                        ELSE o.command_tag END,
        'rows', coalesce(o.row_count, 0));
END
$fn$;
COMMENT ON FUNCTION @schema@._top_level_result(int, bigint) IS
    'Result document of a finished nested worker; re-raises its error with SQLSTATE, detail and hint, and a cancel that ended it before its statement began as one.';

CREATE PROCEDURE @schema@._run_in_worker(p_sql text, p_child uuid, p_timeout interval, p_settings jsonb,
                                         INOUT p_outcome @schema@.child_outcome)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_pid int;
    v_cookie bigint;
    v_finished boolean;
BEGIN
    p_outcome := NULL;
    BEGIN
        SELECT h.pid, h.cookie INTO v_pid, v_cookie FROM @schema@._start_top_level(p_sql, p_child, p_timeout, p_settings) h;
    EXCEPTION
        WHEN query_canceled THEN
            p_outcome.sqlstate := '57014';  -- cut short before it started
            p_outcome.message := 'canceling statement due to user request';
            RETURN;
        WHEN OTHERS THEN
            -- A setting the role may no longer set (it rolled back with the block).
            GET STACKED DIAGNOSTICS p_outcome.sqlstate = RETURNED_SQLSTATE, p_outcome.message = MESSAGE_TEXT;
            RETURN;
    END;
    -- Wait in short statements with a COMMIT between them: CREATE INDEX CONCURRENTLY in the nested
    -- worker waits for every older snapshot, this runner's too.
    COMMIT;
    LOOP
        BEGIN
            v_finished := @pgbg_ext@.pg_background_wait_v2(v_pid, v_cookie, 250);
        EXCEPTION WHEN query_canceled THEN
            -- A stop, or this runner cancelled from outside: the statement goes down with it.
            PERFORM @pgbg_ext@.pg_background_cancel_v2(v_pid, v_cookie, 0);
        END;
        COMMIT;
        EXIT WHEN v_finished;
    END LOOP;
    BEGIN
        p_outcome.result := @schema@._top_level_result(v_pid, v_cookie);
    EXCEPTION WHEN query_canceled OR OTHERS THEN
        GET STACKED DIAGNOSTICS p_outcome.sqlstate = RETURNED_SQLSTATE, p_outcome.message = MESSAGE_TEXT,
                                p_outcome.detail = PG_EXCEPTION_DETAIL, p_outcome.hint = PG_EXCEPTION_HINT;
    END;
END
$fn$;
COMMENT ON PROCEDURE @schema@._run_in_worker(text, uuid, interval, jsonb, @schema@.child_outcome) IS
    'Runs a child at top level in a nested pg_background worker (with the batch''s settings and statement timeout) and '
    'returns how it ended; a cancel of the runner cancels the statement.';

CREATE FUNCTION @schema@._launch_runner(p_parent uuid, p_starter xid8, p_spawn int)
RETURNS boolean
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_pid int;
    v_cookie bigint;
BEGIN
    SELECT h.pid, h.cookie INTO v_pid, v_cookie FROM @pgbg_ext@.pg_background_submit_v2(
        format('CALL @schema@._runner(%L::uuid, %L::xid8, %s)', p_parent, p_starter, p_spawn)) h;
    -- Detached handles do not count against pg_background.max_workers of this session.
    PERFORM @pgbg_ext@.pg_background_detach_v2(v_pid, v_cookie);
    RETURN true;
EXCEPTION WHEN insufficient_resources OR configuration_limit_exceeded THEN
    -- No worker slot in the server right now: the children stay queued for a later call.
    RETURN false;
END
$fn$;
COMMENT ON FUNCTION @schema@._launch_runner(uuid, xid8, int) IS
    'Starts one runner worker for a batch, which starts p_spawn more (see _runner()); false when the server '
    'has no worker slot free.';

CREATE FUNCTION @schema@._lingerers()
RETURNS int
LANGUAGE sql STABLE
RETURN (SELECT count(*)::int FROM pg_stat_activity a
         WHERE a.application_name = 'pgbg:lingering' AND a.usename = current_user
           AND a.backend_type = 'pg_background' AND a.datname = current_database());
COMMENT ON FUNCTION @schema@._lingerers() IS
    'pg_background runners of the caller''s role that wait for its next batch (see _runner()).';

CREATE PROCEDURE @schema@._runner(p_parent uuid, p_starter xid8, p_spawn int DEFAULT 0)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_ran boolean := false;
    v_left boolean := false;
    v_woken boolean;
    v_linger interval;
    v_planned bigint := pg_relation_size('@schema@.log_background');
BEGIN
    -- The postmaster starts workers one at a time, about 4 ms each here: a launch that started all of a
    -- batch's runners would keep its transaction open, and the batch waiting, for as many. It starts one,
    -- and each runner starts two of the rest before it begins, so eight run after three rounds. Until they
    -- have, its name says how many it stands for (see _runners_of()).
    IF p_spawn > 0 THEN
        PERFORM set_config('application_name', format('pgbg:%s+%s', p_parent, p_spawn), false);
        IF @schema@._launch_runner(p_parent, p_starter, (p_spawn - 1) / 2) AND p_spawn > 1 THEN
            PERFORM @schema@._launch_runner(p_parent, p_starter, p_spawn - 1 - (p_spawn - 1) / 2);
        END IF;
        COMMIT;
    END IF;
    CALL @schema@._work(p_parent, p_starter, v_ran, v_left);
    COMMIT;
    v_linger := (SELECT s.linger FROM @schema@.settings s);
    LOOP
        -- A runner that has run stays for its role's next batch (see _linger()); one that found no slot
        -- leaves at once, or more would linger than ever ran. Ordered against a launch of the role, which
        -- counts the lingering runners it need not start (see _start_runners()).
        EXIT WHEN NOT v_ran OR v_left OR v_linger <= interval '0';
        PERFORM set_config('application_name', 'pgbg:lingering', false);
        CALL @schema@._linger(clock_timestamp() + v_linger, v_woken);
        IF v_woken THEN
            v_planned := @schema@._replan(v_planned);
            CALL @schema@._work_role(v_ran, v_left);
            COMMIT;
            -- Woken for a batch whose slots others took first: it leaves as one that was not woken.
            CONTINUE WHEN v_ran OR v_left;
        END IF;
        PERFORM @schema@._lock_role(0, true);
        PERFORM set_config('application_name', 'pgbg:exiting', false);
        v_woken := @schema@._role_has_queued() AND @schema@._role_slots_free();
        COMMIT;
        EXIT WHEN NOT v_woken;
        v_planned := @schema@._replan(v_planned);
        CALL @schema@._work_role(v_ran, v_left);
        COMMIT;
    END LOOP;
    PERFORM set_config('application_name', 'pgbg:exiting', false);
END
$fn$;
COMMENT ON PROCEDURE @schema@._runner(uuid, xid8, int) IS
    'Body of a pg_background runner worker: starts p_spawn more runners for the batch (two, passing the rest '
    'on), runs the batch (see _work()), then stays for settings.linger to run the next batch of its role.';

CREATE FUNCTION @schema@._launch_runners(p_parent uuid, p_count int)
RETURNS int
LANGUAGE plpgsql
AS $fn$
BEGIN
    -- Runners wait for this transaction to end: it may be queuing what they are started for.
    IF coalesce(p_count, 0) > 0 AND @schema@._launch_runner(p_parent, pg_current_xact_id(), p_count - 1) THEN
        RETURN p_count;
    END IF;
    RETURN 0;
END
$fn$;
COMMENT ON FUNCTION @schema@._launch_runners(uuid, int) IS
    'Starts p_count runners for a batch (one, which starts the others), which begin once the calling '
    'transaction has ended; returns p_count, or 0 when the server has no worker slot free.';

-- The pg_cron launcher (managed services): runners are pg_cron jobs of the submitting role, and a
-- child that must run at top level runs as the command of a job of its own.
--
-- Routines that name the cron schema are PL/pgSQL: a server using pg_background may not have that
-- schema, and PL/pgSQL bodies are not checked against it when they are created.

CREATE FUNCTION @schema@._cron_runner_job(p_n int DEFAULT NULL)
RETURNS text
LANGUAGE sql STABLE
RETURN 'pgbg_runner:' || current_database() || ':@schema@:' || coalesce(p_n::text, '');
COMMENT ON FUNCTION @schema@._cron_runner_job(int) IS
    'Name of runner job n of the caller (job names are per role); without n, the prefix of them all.';

CREATE FUNCTION @schema@._cron_ensure_runners(p_wanted int)
RETURNS int
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_have int;
    v_added int := 0;
BEGIN
    IF coalesce(p_wanted, 0) <= 0 THEN
        RETURN 0;
    END IF;
    SELECT count(*) INTO v_have FROM cron.job
     WHERE starts_with(jobname, @schema@._cron_runner_job()) AND schedule = '1 seconds';
    FOR n IN 1..p_wanted LOOP
        EXIT WHEN v_have + v_added >= p_wanted;
        IF NOT EXISTS (SELECT 1 FROM cron.job WHERE jobname = @schema@._cron_runner_job(n) AND schedule = '1 seconds') THEN
            -- Every second while it works; pg_cron never starts a job again while its run goes on,
            -- so each job is one slot. The same name reactivates a job its last run parked (see
            -- _cron_runner()): pg_cron starts a job it knows as soon as it rereads cron.job (within a
            -- second), a new one only a second after that.
            PERFORM cron.schedule(@schema@._cron_runner_job(n), '1 seconds', 'CALL @schema@._cron_runner()');
            v_added := v_added + 1;
        END IF;
    END LOOP;
    RETURN v_added;
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_ensure_runners(int) IS
    'Schedules runner jobs of the caller''s role until it has p_wanted of them; returns how many it added.';

CREATE FUNCTION @schema@._cron_child_start(p_sql text, p_child uuid)
RETURNS bigint
LANGUAGE plpgsql
AS $fn$
BEGIN
    RETURN cron.schedule('pgbg_child:' || p_child, '1 seconds', p_sql);
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_child_start(text, uuid) IS
    'Schedules the job that runs one child at top level; its runner unschedules it once its run has ended.';

CREATE FUNCTION @schema@._cron_spent_command()
RETURNS text
LANGUAGE sql IMMUTABLE
RETURN 'SELECT ''pgbg: this child has run''';
COMMENT ON FUNCTION @schema@._cron_spent_command() IS
    'The command of a child''s job once its run has begun: pg_cron starts the job again every second until '
    'its runner unschedules it, and those runs must do nothing (nor count as the child running).';

CREATE FUNCTION @schema@._cron_exec_child(p_child uuid, p_settings jsonb, p_sql text)
RETURNS void
LANGUAGE plpgsql
AS $fn$
DECLARE
    o @schema@.child_outcome;
BEGIN
    -- pg_cron runs a job again every second until its runner unschedules it: a run of an attempt that
    -- already ran (a runner that died before it could) does nothing.
    PERFORM 1 FROM @schema@.log_background c
     WHERE c.uuid_child = p_child AND c.status = 'running' AND c.result IS NULL AND c.sqlstate IS NULL;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- The job's session has the role's defaults: the batch's settings for its child.
    o := @schema@._run_inline(p_sql, (SELECT s FROM @schema@.settings s), p_settings);
    PERFORM @schema@._leave_batch_session();
    -- The outcome, with its real SQLSTATE and a preview of its rows, commits with its work.
    UPDATE @schema@.log_background
       SET result = o.result, sqlstate = o.sqlstate, error = o.message, error_detail = o.detail,
           error_hint = o.hint, error_context = o.context
     WHERE uuid_child = p_child;
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_exec_child(uuid, jsonb, text) IS
    'What the pg_cron job of a child that needs no top level runs, as one statement (pg_cron reports a '
    'command as succeeded after its first statement): the child''s statement with the batch''s settings, '
    'its outcome recorded with its work, once per attempt.';

CREATE FUNCTION @schema@._cron_recorded(p_child uuid)
RETURNS @schema@.child_outcome
LANGUAGE sql STABLE
RETURN (SELECT CASE WHEN c.result IS NOT NULL OR c.sqlstate IS NOT NULL
                    THEN ROW(c.result, c.sqlstate, c.error, c.error_detail, c.error_hint, c.error_context)::@schema@.child_outcome
               END
          FROM @schema@.log_background c WHERE c.uuid_child = p_child);
COMMENT ON FUNCTION @schema@._cron_recorded(uuid) IS 'The outcome _cron_exec() recorded for a child, if it ran.';

CREATE FUNCTION @schema@._cron_job_command(p_sql text, p_child uuid, p_settings jsonb)
RETURNS text
LANGUAGE sql VOLATILE
-- A pg_cron job starts a new session of the role, with the role's defaults (those RESET restores here:
-- runners are such sessions too). A statement that must be a top-level statement of its own runs as it
-- is, and can only with those defaults (anything before it would put it in a transaction block); any
-- other runs through _cron_exec_child(), with the batch's settings.
RETURN CASE
    WHEN NOT @schema@._needs_own_worker(p_sql)
        THEN format('SELECT @schema@._cron_exec_child(%L::uuid, %L::jsonb, %L)', p_child, p_settings, p_sql)
    WHEN @schema@._non_default_settings(p_settings) IS NULL THEN p_sql
END;
COMMENT ON FUNCTION @schema@._cron_job_command(text, uuid, jsonb) IS
    'Command of the pg_cron job that runs a child with the batch''s settings; NULL when that cannot be done.';

CREATE FUNCTION @schema@._cron_refuse_settings(p_sql text, p_settings jsonb)
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    RAISE EXCEPTION 'under pg_cron, % runs as a job of its own with the role''s default settings, not the batch''s (%)',
        split_part(@schema@._statement_head(p_sql), ' ', 1), @schema@._non_default_settings(p_settings)
        USING ERRCODE = 'feature_not_supported',
              DETAIL = 'It must be a top-level statement of its own, so the job cannot set anything before it.',
              HINT = 'Schema-qualify the names it uses and launch without those settings, run it in a batch of its '
                     'own without them, or make them the role''s defaults (ALTER ROLE ... SET).';
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_refuse_settings(text, jsonb) IS
    'Raises the error of a child _cron_job_command() cannot run: at launch, or in the runner for a child '
    'whose role''s default differs from the launching session''s.';

CREATE FUNCTION @schema@._cron_run(p_job bigint)
RETURNS @schema@.cron_run
LANGUAGE plpgsql STABLE
AS $fn$
DECLARE
    r @schema@.cron_run;
BEGIN
    SELECT d.status, d.job_pid, d.start_time, d.return_message INTO r
      FROM cron.job_run_details d WHERE d.jobid = p_job ORDER BY d.runid LIMIT 1;
    RETURN r;
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_run(bigint) IS 'The (first) run of a child''s job; NULL fields before it starts.';

CREATE FUNCTION @schema@._cron_child_result(p_job bigint, p_run @schema@.cron_run, p_cancelled boolean,
                                           p_timed_out boolean)
RETURNS jsonb
LANGUAGE plpgsql
AS $fn$
DECLARE
    -- pg_cron's return_message: 'ERROR:  message', then DETAIL:, HINT: and CONTEXT: lines if any.
    v_text text := regexp_replace(coalesce(p_run.return_message, ''), '^(ERROR|FATAL):\s*', '');
    v_message text := (regexp_match(v_text, '^(.*?)(\n(DETAIL|HINT|CONTEXT): |$)'))[1];
    v_detail text := (regexp_match(v_text, '\nDETAIL: (.*?)(\n(HINT|CONTEXT): |$)'))[1];
    v_hint text := (regexp_match(v_text, '\nHINT: (.*?)(\nCONTEXT: |$)'))[1];
    v_state text;
BEGIN
    DELETE FROM cron.job_run_details WHERE jobid = p_job;
    IF p_run.status = 'succeeded' THEN
        -- Even when a stop or the timeout came too late to cut it short: it did its work.
        RETURN jsonb_build_object('command', p_run.return_message,
                                  'rows', coalesce(substring(p_run.return_message FROM '(\d+)$')::bigint, 0));
    ELSIF p_timed_out THEN
        RAISE EXCEPTION 'canceling statement due to statement timeout' USING ERRCODE = 'query_canceled';
    ELSIF p_cancelled OR p_run.status IS NULL THEN
        RAISE EXCEPTION 'canceling statement due to user request' USING ERRCODE = 'query_canceled';
    END IF;
    -- pg_cron keeps the text, not the SQLSTATE: name the common ones by their message (the
    -- transient ones first, so that automatic retries work here too), XX000 for the rest, as
    -- PostgreSQL does for an error raised without a code.
    v_state := CASE
        WHEN v_message LIKE 'deadlock detected%' THEN '40P01'
        WHEN v_message LIKE 'could not serialize access%' THEN '40001'
        WHEN v_message LIKE 'canceling statement due to lock timeout%' THEN '55P03'
        WHEN v_message LIKE 'could not obtain lock%' THEN '55P03'
        WHEN v_message LIKE 'canceling statement due to statement timeout%' THEN '57014'
        WHEN v_message LIKE 'canceling statement due to user request%' OR v_message = 'job canceled' THEN '57014'
        -- What pg_cron records of a run the server's restart cut short, and of one terminated from outside.
        WHEN v_message = 'server restarted' THEN '57P02'
        WHEN v_message ~ '^terminating (background worker|connection) .*due to administrator command' THEN '57P01'
        WHEN v_message LIKE 'permission denied%' OR v_message LIKE 'must be owner of%'
          OR v_message LIKE 'must be superuser%' OR v_message LIKE 'must be a member of%' THEN '42501'
        WHEN v_message ~ '^(relation|table) ".*" does not exist' THEN '42P01'
        WHEN v_message ~ '^index ".*" does not exist' THEN '42704'
        WHEN v_message ~ '^(function|procedure) .* does not exist' THEN '42883'
        WHEN v_message ~ '^column ".*" does not exist' THEN '42703'
        WHEN v_message ~ '^(relation|index) ".*" already exists' THEN '42P07'
        WHEN v_message LIKE 'syntax error%' THEN '42601'
        WHEN v_message LIKE 'could not create unique index%' THEN '23505'
        WHEN v_message LIKE 'division by zero%' THEN '22012'
        WHEN v_message LIKE '% cannot run inside a transaction block' THEN '25001'
        ELSE 'XX000' END;
    RAISE EXCEPTION USING MESSAGE = v_message, ERRCODE = v_state,
        DETAIL = coalesce(v_detail, 'Run at top level by a pg_cron job, which records the error''s text but '
                                    'not its SQLSTATE' || CASE WHEN v_state = 'XX000' THEN '.'
                                    ELSE ': this one is named from the message.' END),
        HINT = coalesce(v_hint, '');
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_child_result(bigint, @schema@.cron_run, boolean, boolean) IS
    'Result document of a child run by a job of its own, or its error re-raised (pg_cron records the '
    'text without the SQLSTATE: common ones are named by their message, XX000 otherwise); forgets the run.';

CREATE PROCEDURE @schema@._run_in_cron_job(p_sql text, p_child uuid, p_settings jsonb, p_timeout interval,
                                           INOUT p_outcome @schema@.child_outcome)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_command text := @schema@._cron_job_command(p_sql, p_child, p_settings);
    v_job bigint;
    v_run @schema@.cron_run;
    v_defused boolean := false;
    v_cancelled boolean := false;
    v_cancelled_pid int;
    v_timed_out boolean := false;
    v_gone_since timestamptz;
BEGIN
    -- The statement is the command of a job of its own, which runs it at top level at the next second.
    -- Unscheduling a job ends its run, so the job stays until the run has ended; once the run has begun
    -- (pg_cron has copied the command by then) the command becomes a no-op for any rerun the schedule
    -- starts meanwhile. This runner enforces the statement timeout and passes a stop on to the run.
    p_outcome := NULL;
    BEGIN
        IF v_command IS NULL THEN
            PERFORM @schema@._cron_refuse_settings(p_sql, p_settings);
        END IF;
        v_job := @schema@._cron_child_start(v_command, p_child);
    EXCEPTION WHEN query_canceled OR OTHERS THEN
        GET STACKED DIAGNOSTICS p_outcome.sqlstate = RETURNED_SQLSTATE, p_outcome.message = MESSAGE_TEXT,
                                p_outcome.detail = PG_EXCEPTION_DETAIL, p_outcome.hint = PG_EXCEPTION_HINT;
        RETURN;  -- refused, or stopped before it was scheduled
    END;
    COMMIT;
    LOOP
        BEGIN
            v_run := @schema@._cron_run(v_job);
            IF v_run.status IS NOT NULL AND NOT v_defused AND NOT v_cancelled THEN
                -- Same name, same job (cron.alter_job is for administrators).
                PERFORM cron.schedule('pgbg_child:' || p_child, '1 seconds', @schema@._cron_spent_command());
                v_defused := true;
            END IF;
            EXIT WHEN v_run.status IN ('succeeded', 'failed');
            -- Stopped before its run began: give pg_cron a moment to start one it had picked.
            EXIT WHEN v_cancelled AND v_run.status IS NULL AND clock_timestamp() > v_gone_since + interval '1.5 s';
            -- The job's own clock: pg_cron's start_time is when it began to start the job, and it learns
            -- of the end a moment late; the backend knows when it began.
            -- A stop that came before pg_cron had started the run, or before it told which backend runs it.
            IF v_cancelled AND v_run.job_pid IS DISTINCT FROM v_cancelled_pid AND v_run.job_pid IS NOT NULL THEN
                PERFORM pg_cancel_backend(v_run.job_pid);
                v_cancelled_pid := v_run.job_pid;
            END IF;
            IF p_timeout IS NOT NULL AND NOT v_timed_out AND v_run.job_pid IS NOT NULL
               AND EXISTS (SELECT 1 FROM pg_stat_activity a
                            WHERE a.pid = v_run.job_pid AND a.state = 'active'
                              AND clock_timestamp() > a.query_start + p_timeout) THEN
                PERFORM pg_cancel_backend(v_run.job_pid);
                v_timed_out := true;
            END IF;
            PERFORM pg_sleep(0.01);
        EXCEPTION WHEN query_canceled THEN
            -- A stop reached this runner: take the child's run down with it (unscheduled, a job's run is
            -- ended by pg_cron).
            v_cancelled := true;
            v_gone_since := coalesce(v_gone_since, clock_timestamp());
            PERFORM cron.unschedule(j.jobid) FROM cron.job j WHERE j.jobid = v_job;
            IF v_run.job_pid IS NOT NULL THEN
                PERFORM pg_cancel_backend(v_run.job_pid);
                v_cancelled_pid := v_run.job_pid;
            END IF;
        END;
        COMMIT;
    END LOOP;
    PERFORM cron.unschedule(j.jobid) FROM cron.job j WHERE j.jobid = v_job;
    BEGIN
        p_outcome.result := @schema@._cron_child_result(v_job, v_run, v_cancelled, v_timed_out);
    EXCEPTION WHEN query_canceled OR OTHERS THEN
        GET STACKED DIAGNOSTICS p_outcome.sqlstate = RETURNED_SQLSTATE, p_outcome.message = MESSAGE_TEXT,
                                p_outcome.detail = PG_EXCEPTION_DETAIL, p_outcome.hint = PG_EXCEPTION_HINT;
    END;
    -- What _cron_exec() recorded, when it ran the statement, rather than what pg_cron makes of it; the
    -- cancel that enforced the timeout was this runner's, so it says so.
    p_outcome := coalesce(@schema@._cron_recorded(p_child), p_outcome);
    IF v_timed_out AND p_outcome.sqlstate = '57014' THEN
        p_outcome.message := 'canceling statement due to statement timeout';
    END IF;
END
$fn$;
COMMENT ON PROCEDURE @schema@._run_in_cron_job(text, uuid, jsonb, interval, @schema@.child_outcome) IS
    'Runs a child at top level as the command of a pg_cron job of its own (with the batch''s settings where '
    'the command can set them, and the batch''s statement timeout) and returns how it ended.';

CREATE FUNCTION @schema@._cron_own_job()
RETURNS bigint
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_job bigint;
    v_deadline timestamptz := clock_timestamp() + interval '2 s';
BEGIN
    -- pg_cron records the pid of a run from its own loop, after the run has begun: a run that
    -- parks at once may get here first.
    LOOP
        SELECT d.jobid INTO v_job FROM cron.job_run_details d
         WHERE d.job_pid = pg_backend_pid() AND d.status IN ('starting', 'running');
        EXIT WHEN v_job IS NOT NULL OR clock_timestamp() > v_deadline;
        PERFORM pg_sleep(0.01);
    END LOOP;
    RETURN v_job;
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_own_job() IS
    'The pg_cron job this session is a run of (NULL if pg_cron has not said so within 2 s).';

CREATE PROCEDURE @schema@._cron_park(INOUT p_parked boolean DEFAULT NULL)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_job bigint := @schema@._cron_own_job();
BEGIN
    -- Ordered against a launch of the role (it queues under this lock, shared, then schedules a job if
    -- none is left): no batch is left with queued work and no job. Parked rather than removed:
    -- '@reboot' runs it only when pg_cron starts (after a server restart, when it resumes the role's
    -- queued work), and the job keeps its id for a fast next start. A role has at most as many as its
    -- largest cap.
    PERFORM @schema@._lock_role(0, true);
    p_parked := NOT (@schema@._role_has_queued() AND @schema@._role_slots_free());
    IF p_parked THEN
        PERFORM cron.schedule(j.jobname, '@reboot', j.command) FROM cron.job j WHERE j.jobid = v_job;
    END IF;
    COMMIT;
END
$fn$;
COMMENT ON PROCEDURE @schema@._cron_park(boolean) IS
    'Parks the pg_cron runner job of this session (schedule @reboot), for the next batch of its role to '
    'wake, and commits; p_parked is false, and nothing parked, when its role has queued work a runner could '
    'start.';

CREATE FUNCTION @schema@._cron_schedule_runners()
RETURNS void
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_wanted int;
BEGIN
    -- A child's job whose runner is gone (its child settled) must not run again.
    PERFORM cron.unschedule(j.jobid) FROM cron.job j
     WHERE starts_with(j.jobname, 'pgbg_child:')
       AND NOT EXISTS (SELECT 1 FROM @schema@.log_background c
                        WHERE c.uuid_child::text = substr(j.jobname, 12) AND c.status = 'running');
    -- Runner jobs pick any batch of their role: as many as its batches can use, up to the cap.
    v_wanted := (SELECT least(@schema@._global_cap(), coalesce(sum(least(n.queued + n.running, bt.max_parallel)), 0))::int
                   FROM @schema@.batch bt
                  CROSS JOIN LATERAL @schema@._batch_counts(bt.uuid_parent, bt.counted) n
                  WHERE bt.role_name = current_user AND bt.stop_requested_at IS NULL AND n.queued > 0);
    IF v_wanted > 0 THEN
        -- The role's jobs are counted on: ordered against one deciding to park (see _cron_park()), which
        -- then sees this work. Only then: a row lock makes a transaction write.
        PERFORM @schema@._lock_role(0, false);
        PERFORM @schema@._cron_ensure_runners(v_wanted);
    END IF;
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_schedule_runners() IS
    'pg_cron housekeeping: unschedules the jobs of children no runner runs any more, and schedules runner '
    'jobs of the caller''s role for its batches with queued children.';

CREATE PROCEDURE @schema@._cron_linger(p_until timestamptz, INOUT p_woken boolean)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_job bigint := @schema@._cron_own_job();
BEGIN
    -- A parked job starts only after pg_cron has seen this run end (up to 2 s). A run of a parked job
    -- does not linger: pg_cron started it for a tick that came while the last run lingered, or at its
    -- own start, and nothing is about to be launched for it.
    p_woken := false;
    IF NOT EXISTS (SELECT 1 FROM cron.job j WHERE j.jobid = v_job AND j.schedule = '@reboot') THEN
        CALL @schema@._linger(p_until, p_woken);
    END IF;
END
$fn$;
COMMENT ON PROCEDURE @schema@._cron_linger(timestamptz, boolean) IS
    'A pg_cron runner with nothing left stays until p_until for its role''s next batch; p_woken when one came.';

CREATE PROCEDURE @schema@._cron_runner()
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_ran boolean;
    v_left boolean;
    v_next_settle timestamptz := '-infinity';
    v_idle_since timestamptz := clock_timestamp();
    v_linger interval := (SELECT s.cron_linger FROM @schema@.settings s);
    v_woken boolean;
    v_parked boolean;
    v_planned bigint := pg_relation_size('@schema@.log_background');
BEGIN
    PERFORM set_config('application_name', 'pgbg:cron', false);
    -- The finished runs of this role's runner jobs (job_run_details would grow every second otherwise).
    DELETE FROM cron.job_run_details WHERE command = 'CALL @schema@._cron_runner()' AND status IN ('succeeded', 'failed');
    COMMIT;
    LOOP
        v_planned := @schema@._replan(v_planned);
        CALL @schema@._work_role(v_ran, v_left);
        EXIT WHEN v_left;  -- cancelled from outside: this run ends (the job runs again next second)
        PERFORM set_config('application_name', 'pgbg:cron', false);
        IF v_ran THEN
            v_next_settle := '-infinity';
            v_idle_since := clock_timestamp();
        END IF;
        -- A runner of this role killed mid-child (its job runs again a second later: this may be it) left
        -- that child 'running': settle it here (rows locked by another session stay theirs), at most once
        -- a second. A wait leaves it to the runner jobs.
        IF clock_timestamp() >= v_next_settle AND EXISTS (SELECT 1 FROM @schema@._orphans(NULL) o WHERE o.role_name = current_user) THEN
            PERFORM @schema@._housekeep(NULL::uuid[]);
            COMMIT;
            v_next_settle := clock_timestamp() + interval '1 s';
            CONTINUE;
        END IF;
        IF NOT v_ran AND @schema@._role_has_queued() THEN
            -- Work, but no free slot. When every batch with queued children has all its slots taken, the
            -- runners holding them run the rest: park, rather than run again every second for as long as
            -- that lasts. Short of a global slot only, this job runs again in a second.
            IF NOT @schema@._role_slots_free() THEN
                CALL @schema@._cron_park(v_parked);
            END IF;
            RETURN;
        END IF;
        IF EXISTS (SELECT 1 FROM @schema@._orphans(NULL) o WHERE o.role_name = current_user) THEN
            -- A child whose own job outlived its runner: it is settled once that job has ended, and
            -- nothing else would (this run stayed for it once, then parked, and the batch never ended).
            CALL @schema@._linger(v_next_settle, v_woken);
            CONTINUE;
        END IF;
        CALL @schema@._cron_linger(v_idle_since + v_linger, v_woken);
        CONTINUE WHEN v_woken;
        -- Nothing left: leave for good, unless work was queued meanwhile.
        CALL @schema@._cron_park(v_parked);
        EXIT WHEN v_parked;
    END LOOP;
END
$fn$;
COMMENT ON PROCEDURE @schema@._cron_runner() IS
    'Body of a pg_cron runner job: runs the batches of its role like a pg_background runner and settles '
    'its children whose runner died, then parks its job (schedule @reboot) once the role has had no queued '
    'work for settings.cron_linger and no such child is left.';

CREATE FUNCTION @schema@._cron_child_pid(p_child uuid)
RETURNS int
LANGUAGE plpgsql STABLE
AS $fn$
DECLARE
    v_pid int;
BEGIN
    IF @schema@._launcher() <> 'pg_cron' THEN
        RETURN NULL;  -- and schema cron may not exist: this body is parsed only when it gets here
    END IF;
    SELECT d.job_pid INTO v_pid FROM cron.job j JOIN cron.job_run_details d USING (jobid)
     WHERE j.jobname = 'pgbg_child:' || p_child AND d.status = 'running'
       AND d.command IS DISTINCT FROM @schema@._cron_spent_command()
     LIMIT 1;
    RETURN v_pid;
END
$fn$;
COMMENT ON FUNCTION @schema@._cron_child_pid(uuid) IS
    'The backend of the pg_cron job that runs a child at top level, while it runs; NULL otherwise.';

-- Runners: one loop for both launchers. A runner holds a global slot and a slot of its batch and
-- repeats: claim the next child (in the transaction that counts the one before), commit, run it
-- (inline here, in a nested worker, or in a pg_cron job), settle its outcome. _verdict() alone decides
-- how a child ended; _settle() records it.

CREATE FUNCTION @schema@._claim(p_parent uuid, p_shard int, p_backend_start timestamptz,
                               p_settled @schema@.child_status, p_claim boolean, p_after int,
                               p_done_id bigint, p_done_attempt int, p_done @schema@.child_outcome,
                               p_done_at timestamptz)
RETURNS TABLE (id bigint, uuid_child uuid, query text, run_mode text, seq int, attempt int, settled boolean)
LANGUAGE plpgsql
AS $fn$
#variable_conflict use_column
DECLARE
    v_done int := 0;
BEGIN
    IF p_done_id IS NOT NULL THEN
        -- A child that ended with a result is done whatever else its row says (see _verdict()): it is
        -- recorded here, as _settle_many() records a done child. Before the claim, in a statement of its
        -- own: a stop holds the rows it marks (this child's among them) while it stops the queued ones, and
        -- a runner that had locked the next queued child first would wait for it as it waits for the runner.
        UPDATE @schema@.log_background d
           SET status = 'done', result = (p_done).result, sqlstate = (p_done).sqlstate, error = (p_done).message,
               error_detail = nullif((p_done).detail, ''), error_hint = nullif((p_done).hint, ''),
               error_context = nullif((p_done).context, ''), end_time_exec = p_done_at, not_before = NULL
         WHERE d.uuid_parent = p_parent AND d.id = p_done_id AND d.status = 'running' AND d.attempt = p_done_attempt;
        v_done := CASE WHEN FOUND THEN 1 ELSE 0 END;
    END IF;
    -- PL/pgSQL, not SQL: its plan is cached for the runner's session, and this runs once per child.
    -- Each row is named by the leading columns of every partial index its status matches: a partial
    -- index is a cheap plan wherever statistics show few rows of that status (a queue analyzed empty),
    -- and one scanned whole, filtered by id, read every queued child of the role for each claim.
    RETURN QUERY
    WITH c AS (
        UPDATE @schema@.log_background c
           SET status = 'running', pid = pg_backend_pid(), backend_start = p_backend_start,
               start_time_exec = clock_timestamp(), end_time_exec = NULL, attempt = c.attempt + 1,
               not_before = NULL, stop_requested = false, requeue_on_stop = false, result = NULL,
               sqlstate = NULL
         WHERE p_claim AND c.status = 'queued' AND c.role_name = current_user AND c.uuid_parent = p_parent
           AND c.seq = (SELECT x.seq FROM @schema@.log_background x
                        WHERE x.uuid_parent = p_parent AND x.status = 'queued' AND x.role_name = current_user
                          AND (x.not_before IS NULL OR x.not_before <= clock_timestamp())
                          AND x.seq > p_after
                        ORDER BY x.seq
                        LIMIT 1
                        FOR UPDATE SKIP LOCKED)
        RETURNING c.id, c.uuid_child, c.query, c.run_mode, c.seq, c.attempt),
    n AS (SELECT count(*) AS claimed FROM c),
    counted AS (
        INSERT INTO @schema@.batch_progress AS p (uuid_parent, shard, role_name, queued, running, done, failed,
                                                  stopped, lost, first_start, last_end)
        SELECT p_parent, p_shard, current_user,
               coalesce((p_settled = 'queued')::int, 0) - n.claimed,
               n.claimed - (p_settled IS NOT NULL)::int - v_done,
               coalesce((p_settled = 'done')::int, 0) + v_done, coalesce((p_settled = 'failed')::int, 0),
               coalesce((p_settled = 'stopped')::int, 0), coalesce((p_settled = 'lost')::int, 0),
               CASE WHEN n.claimed > 0 THEN clock_timestamp() END,
               CASE WHEN p_settled IS NOT NULL OR v_done > 0 THEN clock_timestamp() END
          FROM n
         WHERE n.claimed > 0 OR p_settled IS NOT NULL OR v_done > 0
        ON CONFLICT (uuid_parent, shard) DO UPDATE
           SET queued = p.queued + excluded.queued, running = p.running + excluded.running,
               done = p.done + excluded.done, failed = p.failed + excluded.failed,
               stopped = p.stopped + excluded.stopped, lost = p.lost + excluded.lost,
               first_start = least(p.first_start, excluded.first_start),
               last_end = greatest(p.last_end, excluded.last_end))
    SELECT c.id, c.uuid_child, c.query, c.run_mode, c.seq, c.attempt, v_done > 0 FROM n LEFT JOIN c ON true;
END
$fn$;
COMMENT ON FUNCTION @schema@._claim(uuid, int, timestamptz, @schema@.child_status, boolean, int, bigint, int,
                                    @schema@.child_outcome, timestamptz) IS
    'Once per child for a runner: records the child it just ran as done at p_done_at (p_done_id, claimed as '
    'attempt p_done_attempt, when p_done has a result) or counts one it settled otherwise (p_settled), and, '
    'with p_claim, claims the next queued child that is due, in seq order after p_after. One row: the '
    'child claimed (NULLs for none), and settled: whether p_done_id''s claim still held and it is done. '
    'Starting after the runner''s previous claim skips the index entries of children already claimed, '
    'which stay until no snapshot can see them (a long poll holds one back).';

CREATE FUNCTION @schema@._claim_next(p_parent uuid, p_shard int, p_backend_start timestamptz,
                                    p_settled @schema@.child_status, p_claim boolean, p_after int,
                                    p_done_id bigint DEFAULT NULL, p_done_attempt int DEFAULT NULL,
                                    p_done @schema@.child_outcome DEFAULT NULL, p_done_at timestamptz DEFAULT NULL,
                                    OUT id bigint,
                                    OUT uuid_child uuid, OUT query text, OUT run_mode text, OUT seq int,
                                    OUT attempt int, OUT settled boolean)
LANGUAGE plpgsql
AS $fn$
DECLARE
    c record;
BEGIN
    SELECT * INTO c FROM @schema@._claim(p_parent, p_shard, p_backend_start, p_settled, p_claim, p_after,
                                         p_done_id, p_done_attempt, p_done, p_done_at);
    settled := c.settled;
    IF c.id IS NULL AND p_claim AND p_after > 0 AND (p_done_id IS NULL OR c.settled) THEN
        -- Children queued again behind this runner (retries, a takeover) come after the rest.
        SELECT * INTO c FROM @schema@._claim(p_parent, p_shard, p_backend_start, NULL, true, 0, NULL, NULL, NULL, NULL);
    END IF;
    SELECT c.id, c.uuid_child, c.query, c.run_mode, c.seq, c.attempt INTO id, uuid_child, query, run_mode, seq, attempt;
END
$fn$;
COMMENT ON FUNCTION @schema@._claim_next(uuid, int, timestamptz, @schema@.child_status, boolean, int, bigint, int,
                                         @schema@.child_outcome, timestamptz) IS
    '_claim() after the runner''s previous child, then from the start of the queue.';

CREATE FUNCTION @schema@._verdict(p_outcome @schema@.child_outcome, p_gone boolean, p_child @schema@.log_background,
                                  p_batch @schema@.batch)
RETURNS text
LANGUAGE sql VOLATILE
-- VOLATILE, as clock_timestamp() is: declared STABLE it would never be inlined into the settle, where
-- it runs once per child (5 µs a call instead of 1).
-- Decided from SQLSTATEs and the engine's own state, never from an error's text: 57014 is a cancel
-- (pg_background turns a terminate into one too), 57P01/57P02 a shutdown.
RETURN CASE
    WHEN (p_outcome).result IS NOT NULL THEN 'done'
    WHEN (p_child).stop_requested AND (p_child).requeue_on_stop THEN 'requeued'
    WHEN (p_child).stop_requested THEN 'stopped'
    WHEN (p_outcome).sqlstate = '57014' AND (p_batch).statement_timeout IS NOT NULL
         AND clock_timestamp() - (p_child).start_time_exec >= (p_batch).statement_timeout THEN 'timed out'
    WHEN NOT (p_gone OR (p_outcome).sqlstate IN ('57014', '57P01', '57P02')) THEN
        CASE WHEN @schema@._is_transient((p_outcome).sqlstate) AND (p_child).failures < (p_batch).retries
             THEN 'retry' ELSE 'failed' END
    -- Cut short from outside the engine, or its runner died. A stop of the whole batch is under way; or
    -- an inline child rolled back with its runner's transaction (it never happened: it runs again,
    -- unless it keeps taking its runner down); or the work may have committed in its own worker.
    WHEN (p_batch).stop_requested_at IS NOT NULL THEN 'stopped'
    WHEN (p_child).run_mode = 'inline' AND (p_child).interruptions + 1 < 3 THEN 'interrupted'
    WHEN (p_child).run_mode = 'inline' THEN 'lost'
    WHEN (p_batch).retry_lost AND (p_child).failures < (p_batch).retries THEN 'retry lost'
    ELSE 'lost'
END;
COMMENT ON FUNCTION @schema@._verdict(@schema@.child_outcome, boolean, @schema@.log_background, @schema@.batch) IS
    'How a running child ended: done, requeued (a takeover cut it short), stopped, timed out, retry (a '
    'transient failure with retries left), failed, interrupted (an inline child whose runner was '
    'cancelled, terminated or died: it rolled back and is queued again, 3 times at most), retry lost, or '
    'lost (it may have committed in a worker of its own, or its runner died under it 3 times). p_gone: '
    'its runner died without an outcome.';

CREATE FUNCTION @schema@._status_of_verdict(p_verdict text)
RETURNS @schema@.child_status
LANGUAGE sql IMMUTABLE
-- Each branch a constant of the enum: a cast of text to it (enum_in) is not immutable, and would keep
-- this from being inlined into the settle.
RETURN CASE p_verdict WHEN 'done' THEN 'done'::@schema@.child_status WHEN 'stopped' THEN 'stopped'::@schema@.child_status
                      WHEN 'timed out' THEN 'failed'::@schema@.child_status WHEN 'failed' THEN 'failed'::@schema@.child_status
                      WHEN 'lost' THEN 'lost'::@schema@.child_status ELSE 'queued'::@schema@.child_status END;
COMMENT ON FUNCTION @schema@._status_of_verdict(text) IS 'The status a verdict of _verdict() gives a child.';

CREATE FUNCTION @schema@._settle_many(p_ids bigint[], p_attempts int[], p_outcomes @schema@.child_outcome[],
                                      p_started timestamptz[], p_gone boolean, p_backend_start timestamptz)
RETURNS TABLE (id bigint, uuid_child uuid, status @schema@.child_status, verdict text)
LANGUAGE plpgsql
-- One plan for every call: given the arrays, the planner found custom plans cheaper and planned this
-- statement afresh for each lone child (0.3-0.6 ms, more than running it); the generic plan reaches each
-- row by its key, for one child as for a burst of 2,000.
SET plan_cache_mode = force_generic_plan
AS $fn$
#variable_conflict use_column
BEGIN
    -- A child claimed and committed as running is settled while that claim (its attempt) still holds. A
    -- child of a burst (p_started) was claimed by its row lock alone: still queued, it is settled from
    -- there, as the attempt after its last. The rows first: a stop holds a row while it marks it and
    -- signals the runner, and a stop of the whole batch marks the batch's row first; both are seen as they
    -- committed.
    RETURN QUERY
    WITH d AS (
        -- Each row by its primary key (the arrays side by side), never a scan of the table.
        SELECT c.id, p_outcomes[u.k] AS o, u.started, @schema@._verdict(p_outcomes[u.k], p_gone, c, b) AS v,
               c.failures, c.interruptions, c.errors, c.run_mode, c.stopped_by,
               c.attempt + (u.started IS NOT NULL)::int AS attempt, b.retry_delay, b.retry_backoff
          FROM unnest(p_ids, p_attempts, p_started) WITH ORDINALITY AS u(id, attempt, started, k)
          JOIN @schema@.log_background c ON c.id = u.id
          JOIN @schema@.batch b ON b.uuid_parent = c.uuid_parent
         WHERE c.id = ANY (p_ids)
           AND CASE WHEN u.started IS NULL THEN c.status = 'running' AND c.attempt = u.attempt
                    ELSE c.status = 'queued' END
           FOR UPDATE OF c)
    UPDATE @schema@.log_background x
       SET status = @schema@._status_of_verdict(d.v),
           attempt = d.attempt,
           pid = CASE WHEN d.started IS NOT NULL THEN pg_backend_pid() ELSE x.pid END,
           backend_start = coalesce(p_backend_start, x.backend_start),
           start_time_exec = coalesce(d.started, x.start_time_exec),
           result = (d.o).result,
           sqlstate = (d.o).sqlstate,
           error = CASE d.v
               WHEN 'requeued' THEN 'cut short and queued again: ' || coalesce(d.stopped_by, 'takeover')
               WHEN 'stopped' THEN 'stopped by pg_background_stop()'
               WHEN 'interrupted' THEN 'its runner was interrupted; rolled back and queued again: ' || (d.o).message
               WHEN 'lost' THEN CASE WHEN d.run_mode = 'inline'
                                     THEN 'its runner was interrupted 3 times while running it (each time rolled back)'
                                     WHEN p_gone THEN 'worker process ended without recording an outcome '
                                                      '(terminated, crashed or server restarted)'
                                     ELSE 'worker process was cancelled or terminated from outside: ' || (d.o).message END
               ELSE (d.o).message END,
           error_detail = nullif((d.o).detail, ''),
           error_hint = nullif((d.o).hint, ''),
           error_context = nullif((d.o).context, ''),
           end_time_exec = clock_timestamp(),
           failures = d.failures + (d.v IN ('retry', 'retry lost') OR d.v = 'lost' AND d.run_mode <> 'inline'
                                    OR d.v = 'failed' AND @schema@._is_transient((d.o).sqlstate))::int,
           interruptions = d.interruptions + (d.v IN ('interrupted', 'lost') AND d.run_mode = 'inline')::int,
           not_before = CASE WHEN d.v IN ('retry', 'retry lost')
                             THEN @schema@._retry_at(d.retry_delay, d.retry_backoff, d.failures) END,
           errors = CASE WHEN d.v IN ('done', 'requeued', 'stopped') THEN d.errors
                         ELSE coalesce(d.errors, '[]') || @schema@._attempt_error(
                             d.attempt, CASE WHEN d.v IN ('timed out', 'retry', 'failed') THEN 'failed'
                                             WHEN d.v = 'interrupted' THEN 'interrupted' ELSE 'lost' END,
                             (d.o).sqlstate, coalesce((d.o).message, 'worker process ended without recording an outcome'))
                    END
      FROM d
     WHERE x.id = d.id
    RETURNING x.id, x.uuid_child, x.status, d.v;
END
$fn$;
COMMENT ON FUNCTION @schema@._settle_many(bigint[], int[], @schema@.child_outcome[], timestamptz[], boolean, timestamptz) IS
    'Records how children ended (see _verdict()): status, result or error, retries and interruptions used, '
    'and the attempt in errors; a child whose claim (attempt) no longer holds is left alone, and not '
    'returned. p_started: children of a burst, claimed by their row lock alone and still queued. p_gone: '
    'their runner died; housekeeping settles them.';

CREATE FUNCTION @schema@._settle(p_id bigint, p_attempt int, p_outcome @schema@.child_outcome,
                                 p_gone boolean DEFAULT false)
RETURNS TABLE (status @schema@.child_status, leave boolean)
LANGUAGE plpgsql
AS $fn$
#variable_conflict use_column
DECLARE
    v text;
BEGIN
    SELECT s.verdict INTO v FROM @schema@._settle_many(ARRAY[p_id], ARRAY[p_attempt], ARRAY[p_outcome],
                                                       ARRAY[NULL::timestamptz], p_gone, NULL) s;
    -- A runner cancelled or terminated from outside leaves; others start where work remains. NULL: not
    -- this claim's to record any more (settled meanwhile, or claimed again).
    RETURN QUERY SELECT CASE WHEN v IS NOT NULL THEN @schema@._status_of_verdict(v) END,
                        coalesce(v IN ('interrupted', 'retry lost', 'lost') AND NOT p_gone, false);
END
$fn$;
COMMENT ON FUNCTION @schema@._settle(bigint, int, @schema@.child_outcome, boolean) IS
    '_settle_many() of one child claimed as running (attempt p_attempt): its status, NULL when that claim no '
    'longer holds, and whether its runner should leave.';

CREATE FUNCTION @schema@._run_inline(p_sql text, p_settings @schema@.settings, p_session jsonb DEFAULT NULL)
RETURNS @schema@.child_outcome
LANGUAGE plpgsql
AS $fn$
DECLARE
    o @schema@.child_outcome;
BEGIN
    -- Here, so that a setting the role may no longer set fails the child, not its runner.
    PERFORM set_config(s.key, s.value, false) FROM jsonb_each_text(p_session) s;
    o.result := @schema@._execute_inline(p_sql, p_settings.preview_rows, p_settings.preview_bytes);
    RETURN o;
EXCEPTION WHEN query_canceled OR OTHERS THEN
    -- A cancel (a terminate, in pg_background) can land after the statement, before this block ends: its
    -- work rolled back with the subtransaction, and a result kept here would settle it done without it.
    o.result := NULL;
    GET STACKED DIAGNOSTICS o.sqlstate = RETURNED_SQLSTATE, o.message = MESSAGE_TEXT, o.detail = PG_EXCEPTION_DETAIL,
                            o.hint = PG_EXCEPTION_HINT, o.context = PG_EXCEPTION_CONTEXT;
    RETURN o;
END
$fn$;
COMMENT ON FUNCTION @schema@._run_inline(text, @schema@.settings, jsonb) IS
    'Runs a child in the runner''s own transaction (its effects commit with its outcome, or roll back '
    'with its error) with the batch''s settings (p_session; _leave_batch_session() undoes them, and says '
    'whether the commit needs a WAL flush), and returns how it ended.';

CREATE FUNCTION @schema@._shape(p_sql text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
-- Literals out: one statement per tenant, per id or per day has one shape.
RETURN regexp_replace(p_sql, $re$'(''|[^'])*'|\m[0-9]+(\.[0-9]+)?\M$re$, '?', 'g');
COMMENT ON FUNCTION @schema@._shape(text) IS 'A statement without its string and number literals.';

CREATE FUNCTION @schema@._burst(p_batch @schema@.batch, p_shard int, p_backend_start timestamptz, p_after int,
                               p_settings @schema@.settings, p_like text, OUT after int, OUT cut boolean,
                               OUT failed uuid)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_shape text := @schema@._shape(p_like);
    v_last text := p_like;  -- the same text has the same shape: the regular expression only for another
    v_app text := current_setting('application_name');
    -- None may wait for a lock, whatever the batch's lock_timeout.
    v_session jsonb := p_batch.session_settings || '{"lock_timeout": "1ms"}';
    x record;
    v_ids bigint[] := '{}';
    v_attempts int[] := '{}';
    v_outcomes @schema@.child_outcome[] := '{}';
    v_started timestamptz[] := '{}';
    v_t0 timestamptz;
    v_deadline timestamptz := clock_timestamp() + interval '20 ms';
    o @schema@.child_outcome;
    s record;
BEGIN
    -- Short inline children, one after the other in the runner's transaction, each in a subtransaction of
    -- its own, claimed by their row lock alone and settled together: one commit for them all. Bounded to
    -- 20 ms, so that monitors stay current, and to 40 subtransactions that wrote: those keep an XID that
    -- every snapshot on the server must track, in a cache of 64 per transaction, and one that overflows
    -- it slows them all down (one that only read has none: a burst of reads is bounded by time alone).
    -- Nothing of them is committed before they all are: a runner that dies here leaves them queued, as if
    -- none had run. A child of a burst shows queued while it runs: only statements of the shape of one
    -- that has just taken under a millisecond join it (literals aside), none may wait for a lock, and the
    -- burst ends at a child of another shape, of its own worker, or one that took a millisecond.
    after := p_after;
    cut := false;
    FOR x IN SELECT c.id, c.query, c.run_mode, c.seq, c.attempt FROM @schema@.log_background c
              WHERE c.uuid_parent = p_batch.uuid_parent AND c.status = 'queued' AND c.role_name = current_user
                AND (c.not_before IS NULL OR c.not_before <= clock_timestamp()) AND c.seq > p_after
              ORDER BY c.seq
              LIMIT 2000
                FOR UPDATE SKIP LOCKED
    LOOP
        EXIT WHEN x.run_mode <> 'inline' OR clock_timestamp() >= v_deadline
               OR x.query IS DISTINCT FROM v_last AND @schema@._shape(x.query) <> v_shape
               -- Looked at every 8 children (26 µs a look): at most 47 when it stops, if each wrote once.
               OR cardinality(v_ids) % 8 = 7 AND @schema@._subxact_xids() >= 40;
        v_t0 := clock_timestamp();
        v_last := x.query;
        o := @schema@._run_inline(x.query, p_settings, v_session);
        -- _leave_batch_session() without its commit rule: the runner decides that once for the burst.
        RESET ALL;
        PERFORM set_config('application_name', v_app, false);
        IF o.sqlstate IN ('57014', '57P01', '57P02') THEN
            cut := true;  -- a stop or a terminate: it rolled back and stays queued, for the stop to find
            EXIT;
        ELSIF o.sqlstate = '55P03' THEN
            EXIT;  -- it would wait for a lock: it rolled back, and runs next on its own, with the role's timeout
        END IF;
        v_ids := v_ids || x.id;
        v_attempts := v_attempts || x.attempt;
        v_outcomes := v_outcomes || o;
        v_started := v_started || v_t0;
        after := x.seq;
        EXIT WHEN clock_timestamp() - v_t0 >= interval '1 ms';
    END LOOP;
    IF cardinality(v_ids) = 0 THEN
        RETURN;
    END IF;
    SELECT count(*) FILTER (WHERE m.status = 'queued') AS queued, count(*) FILTER (WHERE m.status = 'done') AS done,
           count(*) FILTER (WHERE m.status = 'failed') AS failed, count(*) AS n,
           (array_agg(m.uuid_child) FILTER (WHERE m.status = 'failed'))[1] AS first_failed
      INTO s FROM @schema@._settle_many(v_ids, v_attempts, v_outcomes, v_started, false, p_backend_start) m;
    PERFORM @schema@._count(p_batch.uuid_parent, current_user, p_shard, s.queued - s.n, 0, s.done, s.failed, 0, 0,
                            v_started[1], clock_timestamp());
    failed := CASE WHEN p_batch.fail_fast THEN s.first_failed END;
END
$fn$;
COMMENT ON FUNCTION @schema@._burst(@schema@.batch, int, timestamptz, int, @schema@.settings, text) IS
    'Runs the next short inline children of the batch of p_like''s shape in the runner''s transaction and '
    'settles them in one statement; after: the seq of the last it ran; cut: a stop or terminate cut it short; failed: the first '
    'that failed for good, when the batch fails fast.';

CREATE FUNCTION @schema@._await_starter(p_starter xid8)
RETURNS void
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_since timestamptz := clock_timestamp();
BEGIN
    -- Whoever starts a runner (a launch, a poll, a retry, housekeeping) may still be writing the work
    -- it started it for; what the runner looks for is visible once that transaction has ended. A launch
    -- ends within milliseconds: look every millisecond for a while (the check costs microseconds).
    WHILE pg_xact_status(p_starter) = 'in progress' LOOP
        PERFORM pg_sleep(CASE WHEN clock_timestamp() - v_since < interval '200 ms' THEN 0.001 ELSE 0.05 END);
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION @schema@._await_starter(xid8) IS
    'Waits until the transaction that started this runner has ended, so that the runner sees its work.';

CREATE FUNCTION @schema@._retry_due(p_parent uuid)
RETURNS timestamptz
LANGUAGE sql STABLE
RETURN (SELECT min(x.not_before) FROM @schema@.log_background x
         WHERE x.uuid_parent = p_parent AND x.status = 'queued' AND x.not_before > clock_timestamp());
COMMENT ON FUNCTION @schema@._retry_due(uuid) IS 'When the next child of the batch waiting for a retry is due; NULL if none waits.';

CREATE FUNCTION @schema@._take_slots(p_batch @schema@.batch, OUT global_slot int, OUT batch_slot int)
LANGUAGE plpgsql
AS $fn$
BEGIN
    global_slot := @schema@._take_slot(@schema@._global_lock_key(), @schema@._global_cap(), NULL);
    IF global_slot IS NOT NULL THEN
        batch_slot := @schema@._take_slot(@schema@._batch_lock_key(p_batch.uuid_parent), p_batch.max_parallel,
                                          p_batch.role_name);
        IF batch_slot IS NULL THEN
            PERFORM pg_advisory_unlock(@schema@._global_lock_key(), global_slot);
            global_slot := NULL;
        END IF;
    END IF;
END
$fn$;
COMMENT ON FUNCTION @schema@._take_slots(@schema@.batch) IS
    'A global slot and a slot of the batch for this runner, or neither (NULLs) when either cap is reached.';

CREATE FUNCTION @schema@._adopt(p_batch @schema@.batch, INOUT p_slot int, OUT next @schema@.batch)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_slot int;
BEGIN
    -- The batch has nothing left to start: keep the global slot busy with another batch of the role
    -- that is short of runners, rather than leave it to the next poll.
    FOR next IN
        SELECT b.* FROM @schema@.batch b
         WHERE b.role_name = current_user AND b.stop_requested_at IS NULL AND b.uuid_parent <> p_batch.uuid_parent
           AND EXISTS (SELECT 1 FROM @schema@.log_background x WHERE x.uuid_parent = b.uuid_parent AND x.status = 'queued')
         ORDER BY b.created_at
         LIMIT 20
    LOOP
        v_slot := @schema@._take_slot(@schema@._batch_lock_key(next.uuid_parent), next.max_parallel, next.role_name);
        IF v_slot IS NOT NULL THEN
            PERFORM pg_advisory_unlock(@schema@._batch_lock_key(p_batch.uuid_parent), p_slot);
            p_slot := v_slot;
            PERFORM set_config('application_name', 'pgbg:' || next.uuid_parent, false);
            RETURN;
        END IF;
    END LOOP;
    next := NULL;
END
$fn$;
COMMENT ON FUNCTION @schema@._adopt(@schema@.batch, int) IS
    'Moves the runner to another batch of its role with queued children and a free slot (its batch '
    'slot swapped in p_slot); next is NULL when there is none.';

CREATE FUNCTION @schema@._start(p_parent uuid, p_starter xid8, OUT batch @schema@.batch, OUT global_slot int,
                               OUT batch_slot int, OUT backend_start timestamptz)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_slots record;
BEGIN
    PERFORM set_config('application_name', 'pgbg:' || p_parent, false);
    -- A pg_background worker starts with its starter's settings: the role's defaults instead.
    PERFORM @schema@._leave_batch_session();
    PERFORM @schema@._await_starter(p_starter);
    SELECT * INTO batch FROM @schema@.batch b WHERE b.uuid_parent = p_parent AND b.role_name = current_user;
    IF FOUND THEN  -- else its starter rolled back
        v_slots := @schema@._take_slots(batch);
        global_slot := v_slots.global_slot;
        batch_slot := v_slots.batch_slot;
        -- This backend's row alone: pg_stat_activity reads every backend's (3 ms of a runner's start).
        SELECT a.backend_start INTO backend_start FROM pg_stat_get_activity(pg_backend_pid()) a;
    END IF;
END
$fn$;
COMMENT ON FUNCTION @schema@._start(uuid, xid8) IS
    'A runner''s start: once its starter has ended, its batch and its slots (global_slot NULL when it got none).';

CREATE FUNCTION @schema@._subxact_xids()
RETURNS int
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_xids int;
BEGIN
    -- Each inline child runs in a subtransaction of its own, which gets an XID only if it writes, and keeps
    -- it in this backend's cache of subtransaction XIDs until the transaction ends (a child that failed
    -- rolled its subtransaction back, and left it). The engine's own writes are made outside them.
    PERFORM pg_stat_clear_snapshot();
    SELECT CASE WHEN s.subxact_overflowed THEN 65 ELSE s.subxact_count END INTO v_xids
      FROM pg_stat_get_backend_idset() b(id), pg_stat_get_backend_subxact(b.id) s
     WHERE pg_stat_get_backend_pid(b.id) = pg_backend_pid();
    RETURN coalesce(v_xids, 65);
END
$fn$;
COMMENT ON FUNCTION @schema@._subxact_xids() IS
    'How many subtransactions of this transaction that have not rolled back hold an XID (they wrote); 65 '
    'once PostgreSQL''s cache of 64 has overflowed.';

CREATE FUNCTION @schema@._children_wrote()
RETURNS boolean
LANGUAGE sql VOLATILE
RETURN @schema@._subxact_xids() > 0;
COMMENT ON FUNCTION @schema@._children_wrote() IS
    'Whether an inline child that ran in this transaction (and did not roll back) wrote: one of its '
    'subtransactions has an XID.';

CREATE PROCEDURE @schema@._run(p_query text, p_child uuid, p_mode text, p_batch @schema@.batch,
                               p_settings @schema@.settings, INOUT p_outcome @schema@.child_outcome)
LANGUAGE plpgsql
AS $fn$
BEGIN
    IF p_mode = 'inline' THEN
        p_outcome := @schema@._run_inline(p_query, p_settings, p_batch.session_settings);
        PERFORM @schema@._leave_batch_session();
    ELSIF p_settings.launcher = 'pg_cron' THEN
        CALL @schema@._run_in_cron_job(p_query, p_child, p_batch.session_settings, p_batch.statement_timeout, p_outcome);
    ELSE
        CALL @schema@._run_in_worker(p_query, p_child, p_batch.statement_timeout, p_batch.session_settings, p_outcome);
    END IF;
END
$fn$;
COMMENT ON PROCEDURE @schema@._run(text, uuid, text, @schema@.batch, @schema@.settings, @schema@.child_outcome) IS
    'Runs one claimed child where its run mode and the launcher say, with its batch''s settings, and returns '
    'how it ended.';

CREATE FUNCTION @schema@._role_has_queued()
RETURNS boolean
LANGUAGE sql STABLE
-- Through the role's own queued children (their index by role), never every role's: a lingering runner
-- asks every 2 ms, and read another role's queue of 50,000 for 400 ms each time, eight runners at once.
-- The batch by its key, once per child looked at: most often the first is the answer.
RETURN EXISTS (SELECT 1 FROM @schema@.log_background x
                WHERE x.role_name = current_user AND x.status = 'queued'
                  AND (SELECT bt.stop_requested_at IS NULL FROM @schema@.batch bt WHERE bt.uuid_parent = x.uuid_parent));
COMMENT ON FUNCTION @schema@._role_has_queued() IS 'Whether a batch of the caller''s role, not stopped, has queued children.';

CREATE FUNCTION @schema@._role_slots_free()
RETURNS boolean
LANGUAGE sql VOLATILE
-- The batches with queued children first, behind a fence: a condition on the batch alone is checked as
-- the batch table is read, so the slot holders were counted for every batch the role had ever run (a
-- look at pg_locks each: 20 ms for a role with 26 batches, at each wake of each lingering runner).
RETURN EXISTS (
    WITH waiting AS MATERIALIZED (
        SELECT bt.uuid_parent, bt.max_parallel FROM @schema@.batch bt
         WHERE bt.role_name = current_user AND bt.stop_requested_at IS NULL
           AND EXISTS (SELECT 1 FROM @schema@.log_background x
                        WHERE x.uuid_parent = bt.uuid_parent AND x.status = 'queued'))
    SELECT 1 FROM waiting w
     WHERE @schema@._slot_holders(@schema@._batch_lock_key(w.uuid_parent), current_user) < w.max_parallel);
COMMENT ON FUNCTION @schema@._role_slots_free() IS
    'Whether a batch of the caller''s role with queued children has a batch slot no runner holds.';

CREATE FUNCTION @schema@._replan(p_planned bigint)
RETURNS bigint
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_size bigint := pg_relation_size('@schema@.log_background');
BEGIN
    -- A runner's cached plans were made for the children's table as it was then (p_planned: its size in
    -- bytes): a seq scan chosen on a queue of 400 children would run once per child on one of 100,000 (a
    -- lingering runner took W2 at 600 children/s instead of 20,000). Planned afresh once the table has
    -- doubled, not at every batch: re-planning cost each of W1's eight lingering runners a few ms of CPU
    -- at its start, two cores for all eight, and the last one started 20 ms after the first.
    IF v_size > 2 * greatest(p_planned, 8192) THEN
        DISCARD PLANS;
        RETURN v_size;
    END IF;
    RETURN p_planned;
END
$fn$;
COMMENT ON FUNCTION @schema@._replan(bigint) IS
    'Discards this session''s cached plans if the children''s table has more than doubled since they were '
    'made (p_planned: its size then, in bytes); returns the size they are made for from now on.';

CREATE PROCEDURE @schema@._linger(p_until timestamptz, INOUT p_woken boolean)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_since timestamptz := clock_timestamp();
    -- Work the role had queued as this runner began to wait is work it found no slot for.
    v_full boolean := @schema@._role_has_queued();
BEGIN
    -- The role's next batch often follows soon (a script's next launch, a DAG's next task): a runner still
    -- here takes it within 20 ms, where a new one waits for the server to start it and compiles the
    -- engine's routines first; one launched right after the last batch ended (a script's loop) within
    -- 2 ms. It holds no slot meanwhile; the probe reads the small index of queued children. Only where the
    -- role had work queued already does it count the slots' holders too (pg_locks, 0.15-0.5 ms a look):
    -- a runner that woke for a batch whose slots are all taken would find none, and leave without the
    -- order against a launch that _runner() keeps, which may have counted on it. A batch queued since
    -- has its slots free, or the launch that started runners for it counted this one out; counted at
    -- each wake of each of W1's eight runners, two cores for all, the last started 3 ms later.
    p_woken := false;
    WHILE NOT p_woken AND clock_timestamp() < p_until LOOP
        COMMIT;
        PERFORM pg_sleep(CASE WHEN clock_timestamp() - v_since < interval '200 ms' THEN 0.002 ELSE 0.02 END);
        p_woken := @schema@._role_has_queued() AND (NOT v_full OR @schema@._role_slots_free());
    END LOOP;
END
$fn$;
COMMENT ON PROCEDURE @schema@._linger(timestamptz, boolean) IS
    'A runner with nothing left stays until p_until for its role''s next batch (looking every 2 ms for the '
    'first 200 ms, then every 20 ms); p_woken when one came (with a batch slot free, where the role had '
    'work queued already as it began to wait).';

CREATE PROCEDURE @schema@._work_role(INOUT p_ran boolean DEFAULT false, INOUT p_left boolean DEFAULT false)
LANGUAGE plpgsql
AS $fn$
DECLARE
    b record;
BEGIN
    p_ran := false;
    p_left := false;
    FOR b IN SELECT bt.uuid_parent, bt.enqueue_xid FROM @schema@.batch bt
              WHERE bt.role_name = current_user AND bt.stop_requested_at IS NULL
                AND EXISTS (SELECT 1 FROM @schema@.log_background x
                             WHERE x.uuid_parent = bt.uuid_parent AND x.status = 'queued')
              ORDER BY bt.created_at LIMIT 20
    LOOP
        -- It adopts other batches of the role from there, until none needs a runner.
        CALL @schema@._work(b.uuid_parent, b.enqueue_xid, p_ran, p_left);
        EXIT WHEN p_ran;
    END LOOP;
END
$fn$;
COMMENT ON PROCEDURE @schema@._work_role(boolean, boolean) IS
    'Runs the batches of the caller''s role that have queued children (_work()); p_ran: it got slots for one; '
    'p_left: it was cancelled or terminated from outside, and must go.';

CREATE PROCEDURE @schema@._work(p_parent uuid, p_starter xid8, INOUT p_ran boolean DEFAULT false,
                                INOUT p_left boolean DEFAULT false)
LANGUAGE plpgsql
AS $fn$
DECLARE
    r record := @schema@._start(p_parent, p_starter);
    v_batch @schema@.batch := r.batch;
    v_settings @schema@.settings := (SELECT s FROM @schema@.settings s);
    c record;
    v_after int := 0;
    v_outcome @schema@.child_outcome;
    v_settled @schema@.child_status;
    v_leave boolean := false;
    v_fail_fast uuid;
    v_adopted record;
    v_t0 timestamptz;
    v_ended timestamptz;
    v_quiet boolean := false;
    v_next boolean := false;
BEGIN
    p_ran := false;
    p_left := false;
    IF r.global_slot IS NULL THEN
        RETURN;  -- its starter rolled back, or the caps are reached
    END IF;
    p_ran := true;
    COMMIT;
    LOOP
        -- One transaction per child (or burst of inline children): the outcome of the one before (and an
        -- inline one's work), its count, and the claim of the next. Unless a child's work is in it (or it
        -- may end the batch, below), it need not wait for a WAL flush: lost in a crash, it leaves children
        -- that never ran (or did nothing) queued, to run again. The RESET ALL after each child undid any
        -- earlier SET LOCAL of it.
        IF NOT v_next THEN
            IF v_settled IS NULL OR v_quiet THEN
                PERFORM set_config('synchronous_commit', 'off', true);
            END IF;
            v_quiet := false;
            SELECT * INTO c FROM @schema@._claim_next(v_batch.uuid_parent, r.global_slot, r.backend_start, v_settled,
                                                      v_fail_fast IS NULL AND NOT v_leave, v_after);
            v_settled := NULL;
        END IF;
        v_next := false;
        IF v_fail_fast IS NOT NULL THEN
            RESET synchronous_commit;  -- the failure may be the batch's last child: its end (see below)
            COMMIT;  -- the failure is recorded: now take the rest of the batch down
            PERFORM @schema@._stop(v_batch.uuid_parent, format('stopped: fail_fast after child %s failed', v_fail_fast),
                                   false, NULL);
            COMMIT;
            v_fail_fast := NULL;
        ELSIF v_leave THEN
            -- pg_background turns a terminate into a cancel: a server shutting down waits for this process.
            COMMIT;
            p_left := true;
            EXIT;
        ELSIF c.id IS NULL AND @schema@._retry_due(v_batch.uuid_parent) IS NOT NULL THEN
            COMMIT;  -- children waiting for an automatic retry keep this runner on the batch
            PERFORM pg_sleep(least(greatest(extract(epoch FROM @schema@._retry_due(v_batch.uuid_parent) - clock_timestamp()),
                                            0.001), 0.2));
        ELSIF c.id IS NULL THEN
            -- This commit may end the batch, and a waiter that sees the end ends its task: it waits for
            -- its WAL flush (and so for every commit before it) even where no child wrote, or a crash
            -- could put children of a batch that Airflow took for ended back in the queue. Once a
            -- runner per batch: W2's two runners and W1's eight add a flush each.
            RESET synchronous_commit;
            COMMIT;  -- whoever commits the last outcome of a batch sees every other one: it tells the waiters
            PERFORM @schema@._notify_if_ended(ARRAY[v_batch.uuid_parent]);
            COMMIT;
            v_adopted := @schema@._adopt(v_batch, r.batch_slot);
            COMMIT;
            EXIT WHEN v_adopted.next IS NULL;
            DISCARD PLANS;  -- see _replan(): rare enough not to bother
            v_batch := v_adopted.next;
            r.batch_slot := v_adopted.p_slot;
            v_after := 0;
        ELSE
            v_after := c.seq;
            COMMIT;
            v_t0 := clock_timestamp();
            CALL @schema@._run(c.query, c.uuid_child, c.run_mode, v_batch, v_settings, v_outcome);
            v_ended := clock_timestamp();
            IF (v_outcome).result IS NOT NULL AND (c.run_mode <> 'inline' OR v_ended - v_t0 >= interval '1 ms') THEN
                -- Done, and too long to start a burst: recorded with the claim of the next, in one statement.
                SELECT * INTO c FROM @schema@._claim_next(v_batch.uuid_parent, r.global_slot, r.backend_start, NULL,
                                                          true, v_after, c.id, c.attempt, v_outcome, v_ended);
                IF NOT c.settled THEN
                    ROLLBACK;  -- housekeeping took this runner for dead and queued the child again: its work goes
                ELSE
                    v_next := true;
                END IF;
                CONTINUE;
            END IF;
            SELECT s.status, s.leave INTO v_settled, v_leave FROM @schema@._settle(c.id, c.attempt, v_outcome) s;
            IF v_settled IS NULL THEN
                ROLLBACK;  -- housekeeping took this runner for dead and queued the child again: its work goes
            ELSIF v_settled = 'failed' AND v_batch.fail_fast THEN
                v_fail_fast := c.uuid_child;  -- only a final failure; a retry is not one
            ELSIF c.run_mode = 'inline' AND NOT v_leave AND clock_timestamp() - v_t0 < interval '1 ms' THEN
                -- Short: the next ones in a burst, in this transaction.
                SELECT b.after, b.cut, b.failed INTO v_after, v_leave, v_fail_fast
                  FROM @schema@._burst(v_batch, r.global_slot, r.backend_start, v_after, v_settings, c.query) b;
            END IF;
            -- A lone child's _leave_batch_session() has decided already; a burst's RESET ALL undid that.
            IF v_settled IS NOT NULL AND c.run_mode = 'inline' AND current_setting('synchronous_commit') <> 'off' THEN
                v_quiet := NOT @schema@._children_wrote();
            END IF;
        END IF;
    END LOOP;
    -- Leave the name first, so that nobody counts this process once its slots are free.
    PERFORM set_config('application_name', 'pgbg:exiting', false);
    PERFORM pg_advisory_unlock_all();
END
$fn$;
COMMENT ON PROCEDURE @schema@._work(uuid, xid8, boolean, boolean) IS
    'The runner''s loop: holds one global and one batch slot and runs queued children until none is left '
    '(waiting for children due for a retry, adopting other batches of the role), recording each outcome in '
    'the transaction of its work together with the claim of the next child. p_starter: the transaction '
    'that started the runner, awaited first. p_ran: it got its slots. p_left: a cancel or terminate from '
    'outside the engine cut its child short: the runner goes (its child is queued again).';

-- Housekeeping: children of runners that died, and runners where slots are free. Every poll, monitor,
-- wait, launch and retry does it, so polling is enough to drive a batch. Runners it starts begin once
-- its transaction has ended; a call that stays in its transaction (a wait) has it done apart.

CREATE FUNCTION @schema@._cancel_run(p_pid int)
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM pg_cancel_backend(p_pid);
EXCEPTION WHEN insufficient_privilege THEN
    NULL;  -- another role's child (an administrator's poll): that role's own polls pass the stop on
END
$fn$;
COMMENT ON FUNCTION @schema@._cancel_run(int) IS 'Cancels the statement of a child''s own process, where the caller may.';

CREATE FUNCTION @schema@._orphan_outcome(p_child @schema@.log_background, OUT running boolean,
                                         OUT outcome @schema@.child_outcome)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_job bigint;
    v_spent boolean;
    v_own boolean;
    v_run @schema@.cron_run;
    v_pid int;
BEGIN
    -- Whether a child whose runner died still runs somewhere, or how it ended there. Only a statement of
    -- its own worker or job can have outlived its runner; an inline one rolled back with it. A stop its
    -- runner could not pass on (it died, maybe of the very cancel that brought the stop) is passed on here.
    running := false;
    IF p_child.run_mode = 'inline' THEN
        RETURN;
    ELSIF @schema@._launcher() = 'pg_background' THEN
        SELECT a.pid INTO v_pid FROM pg_stat_activity a
         WHERE a.application_name = 'pgbg-child:' || p_child.uuid_child
           AND a.usename = p_child.role_name AND a.backend_type = 'pg_background';
        running := v_pid IS NOT NULL;
        IF running AND p_child.stop_requested THEN
            PERFORM @schema@._cancel_run(v_pid);
        END IF;
        RETURN;
    END IF;
    -- Under pg_cron, how the child's job ended is recorded: it is not lost with the runner.
    outcome := @schema@._cron_recorded(p_child.uuid_child);
    SELECT j.jobid, j.command = @schema@._cron_spent_command(), j.username = current_user INTO v_job, v_spent, v_own
      FROM cron.job j WHERE j.jobname = 'pgbg_child:' || p_child.uuid_child AND j.username = p_child.role_name;
    IF v_own AND NOT v_spent THEN
        -- Its runner died before it made the job's later runs no-ops (see _run_in_cron_job()): each would
        -- run the statement again, a second after the last (a stop cancelled one after the other, and the
        -- child was never settled). A run that has begun goes on, and is waited for. (An administrator's
        -- housekeeping would schedule a job of its own by that name: it leaves this to the role's.)
        PERFORM cron.schedule('pgbg_child:' || p_child.uuid_child, '1 seconds', @schema@._cron_spent_command());
    END IF;
    -- A run of the spent command (see _cron_spent_command()) is not the child's: one found running kept
    -- the child from being settled.
    SELECT d.job_pid INTO v_pid FROM cron.job_run_details d
     WHERE d.jobid = v_job AND d.status IN ('starting', 'running')
       AND d.command IS DISTINCT FROM @schema@._cron_spent_command()
     ORDER BY d.runid LIMIT 1;
    running := outcome IS NULL AND FOUND;
    IF running AND p_child.stop_requested AND v_pid IS NOT NULL THEN
        PERFORM @schema@._cancel_run(v_pid);
    END IF;
    v_run := @schema@._cron_run(v_job);
    IF outcome IS NULL AND NOT running AND v_run.status IN ('succeeded', 'failed') THEN
        BEGIN
            outcome.result := @schema@._cron_child_result(v_job, v_run, false, false);
        EXCEPTION WHEN query_canceled OR OTHERS THEN
            GET STACKED DIAGNOSTICS outcome.sqlstate = RETURNED_SQLSTATE, outcome.message = MESSAGE_TEXT,
                                    outcome.detail = PG_EXCEPTION_DETAIL, outcome.hint = PG_EXCEPTION_HINT;
        END;
    END IF;
    IF NOT running AND v_job IS NOT NULL THEN
        PERFORM cron.unschedule(v_job);  -- it must not run again
    END IF;
END
$fn$;
COMMENT ON FUNCTION @schema@._orphan_outcome(@schema@.log_background) IS
    'For a running child whose runner died: whether its nested worker or pg_cron job still runs it (a stop '
    'of the child is passed on to it), or how that job ended (pg_cron records it); neither for an inline '
    'child, which rolled back with its runner.';

CREATE FUNCTION @schema@._orphans(p_parents uuid[])
RETURNS SETOF @schema@.log_background
LANGUAGE sql STABLE
AS $fn$
    SELECT x.* FROM @schema@.log_background x
     WHERE x.status = 'running'
       AND (p_parents IS NULL OR x.uuid_parent = ANY (p_parents))
       AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                        WHERE a.pid = x.pid AND (a.backend_start = x.backend_start OR a.backend_start IS NULL))
$fn$;
COMMENT ON FUNCTION @schema@._orphans(uuid[]) IS
    'Running children whose runner (the same pid with the same backend_start) is gone.';

CREATE FUNCTION @schema@._settle_orphans(p_parents uuid[])
RETURNS uuid[]
LANGUAGE plpgsql
AS $fn$
DECLARE
    c @schema@.log_background;
    v_orphan record;
    v_status @schema@.child_status;
    v_touched uuid[] := '{}';
BEGIN
    -- Rows locked by someone else are left to that someone. The claim judged is the claim locked: a row
    -- claimed again since this statement's snapshot is locked in its newest version, which the recheck
    -- of (id, attempt) drops; by id alone a live runner's new claim was settled as gone.
    FOR c IN SELECT x.* FROM @schema@.log_background x
              WHERE (x.id, x.attempt) IN (SELECT o.id, o.attempt FROM @schema@._orphans(p_parents) o)
                AND x.status = 'running'
                FOR UPDATE SKIP LOCKED
    LOOP
        v_orphan := @schema@._orphan_outcome(c);
        CONTINUE WHEN v_orphan.running;
        SELECT s.status INTO v_status
          FROM @schema@._settle(c.id, c.attempt, v_orphan.outcome, v_orphan.outcome IS NULL) s;
        CONTINUE WHEN v_status IS NULL;
        PERFORM @schema@._count(c.uuid_parent, c.role_name, -pg_backend_pid(), (v_status = 'queued')::int, -1,
                                (v_status = 'done')::int, (v_status = 'failed')::int, (v_status = 'stopped')::int,
                                (v_status = 'lost')::int, NULL, clock_timestamp());
        v_touched := v_touched || c.uuid_parent;
    END LOOP;
    PERFORM @schema@._notify_if_ended(v_touched);
    RETURN v_touched;
END
$fn$;
COMMENT ON FUNCTION @schema@._settle_orphans(uuid[]) IS
    'Settles the running children whose runner died (see _orphans(), _orphan_outcome(), _settle()); returns '
    'their batches.';

CREATE FUNCTION @schema@._runners_of(p_parent uuid)
RETURNS int
LANGUAGE sql STABLE
-- Runners still starting hold no slot yet, but are named after their batch already; one still starting
-- others counts them too ('pgbg:<batch>+<n>', see _runner()).
-- (least() skips a NULL: a runner without a '+<n>' counted as 1,001, and one running batch kept every other
-- batch of the database from getting runners of its own.)
RETURN (SELECT coalesce(sum(1 + least(coalesce(substring(a.application_name FROM '\+([0-9]{1,4})$')::int, 0),
                                      1000)), 0)::int
          FROM pg_stat_activity a
         WHERE CASE WHEN p_parent IS NULL
                    THEN a.application_name LIKE 'pgbg:%-%' AND pg_has_role(a.usesysid, 'pgbg_user', 'MEMBER')
                    ELSE split_part(a.application_name, '+', 1) = 'pgbg:' || p_parent AND a.usename = current_user END
           AND a.backend_type = 'pg_background' AND a.datname = current_database());
COMMENT ON FUNCTION @schema@._runners_of(uuid) IS
    'pg_background runners of the caller''s batch p_parent (NULL: of every batch of the database), as '
    'only runners can show themselves (see _is_runner()).';

CREATE FUNCTION @schema@._runners_wanted(p_parents uuid[])
RETURNS TABLE (uuid_parent uuid, wanted int)
LANGUAGE sql STABLE
AS $fn$
    -- Only the caller's own batches: a runner runs as the role that starts it, and children must run
    -- as the role that submitted them.
    SELECT bt.uuid_parent, least(n.queued, bt.max_parallel - @schema@._runners_of(bt.uuid_parent))::int
      FROM @schema@.batch bt
     CROSS JOIN LATERAL @schema@._batch_counts(bt.uuid_parent, bt.counted) n
     WHERE bt.role_name = current_user AND bt.stop_requested_at IS NULL
       AND (p_parents IS NULL OR bt.uuid_parent = ANY (p_parents))
       AND n.queued > 0
     ORDER BY bt.created_at
$fn$;
COMMENT ON FUNCTION @schema@._runners_wanted(uuid[]) IS
    'For each of the caller''s batches with queued children, how many more pg_background runners it could use.';

CREATE FUNCTION @schema@._start_runners(p_parents uuid[])
RETURNS void
LANGUAGE plpgsql
AS $fn$
DECLARE
    b record;
    v_free int;
    v_lingering int;
    v_taken int;
    v_want int;
    v_started int;
BEGIN
    FOR b IN SELECT * FROM @schema@._runners_wanted(p_parents) w WHERE w.wanted > 0 LOOP
        IF v_lingering IS NULL THEN
            -- Runners of the role waiting for its next batch take this one within 20 ms, and are counted
            -- on: ordered against one deciding to leave (see _runner()), which then sees this work. Only
            -- here: a row lock makes a transaction write, and a poll with nothing to start need not.
            PERFORM @schema@._lock_role(0, false);
            PERFORM pg_stat_clear_snapshot();
            v_free := @schema@._global_cap() - @schema@._runners_of(NULL);
            v_lingering := @schema@._lingerers();
        END IF;
        EXIT WHEN v_free <= 0;
        v_want := least(b.wanted, v_free);
        v_taken := least(v_want, v_lingering);
        v_lingering := v_lingering - v_taken;
        v_free := v_free - v_taken;
        v_want := v_want - v_taken;
        v_started := @schema@._launch_runners(b.uuid_parent, v_want);
        v_free := v_free - v_started;
        EXIT WHEN v_started < v_want;  -- the server has no worker slot free
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION @schema@._start_runners(uuid[]) IS
    'Starts pg_background runners for the caller''s batches (every one when p_parents is NULL) where their '
    'caps and the global cap leave room.';

CREATE FUNCTION @schema@._get_runners(p_parents uuid[])
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    -- pg_stat_activity is otherwise frozen for the rest of the transaction.
    PERFORM pg_stat_clear_snapshot();
    IF @schema@._launcher() = 'pg_cron' THEN
        PERFORM @schema@._cron_schedule_runners();
    ELSE
        PERFORM @schema@._start_runners(p_parents);
    END IF;
END
$fn$;
COMMENT ON FUNCTION @schema@._get_runners(uuid[]) IS
    'Starts runners for the caller''s batches where slots are free (pg_cron: schedules runner jobs); every '
    'batch when p_parents is NULL. The runners begin once the calling transaction has ended.';

CREATE FUNCTION @schema@._housekeep(p_parents uuid[])
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM pg_stat_clear_snapshot();
    PERFORM @schema@._settle_orphans(p_parents);
    PERFORM @schema@._get_runners(p_parents);
END
$fn$;
COMMENT ON FUNCTION @schema@._housekeep(uuid[]) IS
    'Settles children of runners that died (see _settle_orphans()) and starts runners for the caller''s '
    'batches where slots are free (see _get_runners()); every batch when p_parents is NULL.';

CREATE FUNCTION @schema@._housekeep(p_parent uuid DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM @schema@._housekeep(CASE WHEN p_parent IS NOT NULL THEN ARRAY[p_parent] END);
END
$fn$;
COMMENT ON FUNCTION @schema@._housekeep(uuid) IS '_housekeep() of one batch, or of every batch when NULL.';

CREATE FUNCTION @schema@._housekeeping_due(p_parents uuid[])
RETURNS boolean
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM pg_stat_clear_snapshot();
    RETURN EXISTS (SELECT 1 FROM @schema@._orphans(p_parents) o WHERE NOT (@schema@._orphan_outcome(o)).running)
        OR (@schema@._global_cap() > @schema@._runners_of(NULL)
            AND (SELECT coalesce(sum(w.wanted), 0) FROM @schema@._runners_wanted(p_parents) w WHERE w.wanted > 0)
                > @schema@._lingerers());
END
$fn$;
COMMENT ON FUNCTION @schema@._housekeeping_due(uuid[]) IS
    'Whether _housekeep() has anything to do for these batches (pg_background).';

CREATE FUNCTION @schema@._housekeep_apart(p_parents uuid[])
RETURNS void
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_pid int;
    v_cookie bigint;
BEGIN
    -- For a caller that stays in its transaction (a wait): what housekeeping writes, and the runners it
    -- starts for it, must not wait for that transaction to end. Done by a worker of its own, in a
    -- transaction that commits at once, and only when there is something to do. Under pg_cron the
    -- runner jobs settle their role's orphans and stay scheduled while work is queued.
    IF @schema@._launcher() <> 'pg_background' THEN
        RETURN;
    ELSIF NOT @schema@._housekeeping_due(p_parents) THEN
        RETURN;
    END IF;
    BEGIN
        SELECT h.pid, h.cookie INTO v_pid, v_cookie
          FROM @pgbg_ext@.pg_background_launch_v2(format('SELECT @schema@._housekeep(%L::uuid[])', p_parents)) h;
    EXCEPTION WHEN insufficient_resources OR configuration_limit_exceeded THEN
        RETURN;  -- no worker slot right now: the next round tries again
    END;
    PERFORM @pgbg_ext@.pg_background_wait_v2(v_pid, v_cookie);
    PERFORM @schema@._top_level_result(v_pid, v_cookie);  -- raises what made it fail, rather than loop on it
END
$fn$;
COMMENT ON FUNCTION @schema@._housekeep_apart(uuid[]) IS
    '_housekeep() in a transaction of its own (a pg_background worker), when it has anything to do: for '
    'callers that wait in one long statement.';

-- Heartbeats: how a waiter without a session of its own shows it is alive.
--
-- Behind a pooler in transaction mode (PgBouncer) a client has a server session only for one
-- transaction: a watch lock (pg_background_watch) would stay with the server connection after its
-- client died, and look alive for ever. Such a waiter keeps a row in waiter alive instead, refreshed
-- by its polls, and lists the batches it waits for in waiter_watch; pg_background_watched() counts it
-- while alive_until is in the future. A dead waiter is dead for everyone at most one ttl later.

CREATE FUNCTION @schema@.pg_background_heartbeat(
    p_waiter uuid,
    p_ttl interval,
    p_watch uuid[] DEFAULT '{}',
    p_watch_claims text[] DEFAULT '{}',
    p_unwatch uuid[] DEFAULT '{}',
    p_unwatch_claims text[] DEFAULT '{}')
RETURNS boolean
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_known boolean;
BEGIN
    IF p_waiter IS NULL OR p_ttl IS NULL OR p_ttl <= interval '0' THEN
        RAISE EXCEPTION 'pg_background_heartbeat() needs a waiter and a positive ttl'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(p_watch) IS DISTINCT FROM cardinality(p_watch_claims)
       OR cardinality(p_unwatch) IS DISTINCT FROM cardinality(p_unwatch_claims) THEN
        RAISE EXCEPTION 'pg_background_heartbeat(): one claim per batch'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Waiters of this role that died: their rows say nothing any more.
    DELETE FROM @schema@.waiter
     WHERE role_name = current_user AND alive_until < clock_timestamp() AND waiter_id <> p_waiter;
    UPDATE @schema@.waiter SET alive_until = clock_timestamp() + p_ttl
     WHERE waiter_id = p_waiter AND alive_until >= clock_timestamp();
    v_known := FOUND;
    IF NOT v_known THEN
        -- New, or back after its ttl ran out: what it watched before was forgotten with it.
        DELETE FROM @schema@.waiter WHERE waiter_id = p_waiter;
        INSERT INTO @schema@.waiter (waiter_id, alive_until) VALUES (p_waiter, clock_timestamp() + p_ttl);
    END IF;
    DELETE FROM @schema@.waiter_watch w
     USING unnest(p_unwatch, p_unwatch_claims) AS u(parent, claim)
     WHERE w.waiter_id = p_waiter AND w.uuid_parent = u.parent AND w.claimed_by = u.claim;
    -- Only batches the role may see (a purged one is not watched).
    INSERT INTO @schema@.waiter_watch (waiter_id, uuid_parent, claimed_by)
    SELECT p_waiter, u.parent, u.claim
      FROM unnest(p_watch, p_watch_claims) AS u(parent, claim)
     WHERE u.claim IS NOT NULL AND EXISTS (SELECT 1 FROM @schema@.batch b WHERE b.uuid_parent = u.parent)
    ON CONFLICT DO NOTHING;
    RETURN v_known;
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_heartbeat(uuid, interval, uuid[], text[], uuid[], text[]) IS
    'A waiter (any UUID it chose) is alive for p_ttl from now, and waits for the batches of p_watch on '
    'behalf of the claims of p_watch_claims, no longer for those of p_unwatch. Returns false when the '
    'waiter was not alive before this call (new, or its ttl ran out): it must then name everything it '
    'watches again. What a session-less client (a pooler in transaction mode) uses instead of '
    'pg_background_watch().';

CREATE FUNCTION @schema@.pg_background_heartbeat_end(p_waiter uuid)
RETURNS boolean
LANGUAGE sql
AS $fn$
    WITH gone AS (DELETE FROM @schema@.waiter WHERE waiter_id = p_waiter RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM gone)
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_heartbeat_end(uuid) IS
    'The waiter waits for nothing any more (its watches end with it).';

CREATE FUNCTION @schema@._heartbeat_watched(p_parent uuid, p_except_claim text)
RETURNS boolean
LANGUAGE sql STABLE
AS $fn$
    SELECT EXISTS (
        SELECT 1 FROM @schema@.waiter_watch w
          JOIN @schema@.waiter h USING (waiter_id)
         WHERE w.uuid_parent = p_parent
           AND (p_except_claim IS NULL OR w.claimed_by <> p_except_claim)
           AND h.alive_until > clock_timestamp())
$fn$;
COMMENT ON FUNCTION @schema@._heartbeat_watched(uuid, text) IS
    'Whether a live heartbeat waiter waits for the batch on behalf of a claim other than p_except_claim.';

CREATE FUNCTION @schema@.pg_background_watched_by(uuid_father uuid, p_claim text, p_except_waiter uuid DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $fn$
BEGIN
    -- PL/pgSQL: the watch keys are defined after this file (91_watch.sql).
    RETURN EXISTS (
               SELECT 1 FROM pg_locks l
                WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                  AND l.classid = @schema@._watch_key(uuid_father)::oid
                  AND l.objid = @schema@._claim_key(p_claim)::oid
                  AND l.pid <> pg_backend_pid())
        OR EXISTS (
               SELECT 1 FROM @schema@.waiter_watch w
                 JOIN @schema@.waiter h USING (waiter_id)
                WHERE w.uuid_parent = uuid_father AND w.claimed_by = p_claim
                  AND w.waiter_id IS DISTINCT FROM p_except_waiter
                  AND h.alive_until > clock_timestamp());
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_watched_by(uuid, text, uuid) IS
    'Whether another session (a watch lock) or another live heartbeat waiter than p_except_waiter waits for '
    'the batch on behalf of p_claim itself: a second waiter of the same claim (Airflow: the trigger of the '
    'same try, moved to another triggerer).';

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

-- Summaries: the outcome of a batch as one bounded document.

CREATE FUNCTION @schema@._summary_row(c @schema@.log_background)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
RETURN jsonb_build_object(
    'seq', c.seq, 'uuid_child', c.uuid_child, 'status', c.status, 'attempt', c.attempt,
    'query', left(c.query, 500), 'command', c.result ->> 'command', 'sqlstate', c.sqlstate,
    'error', left(c.error, 500),
    'seconds', extract(epoch FROM c.end_time_exec - c.start_time_exec)::float8,
    'failed_attempts', coalesce(jsonb_array_length(c.errors), 0));
COMMENT ON FUNCTION @schema@._summary_row(@schema@.log_background) IS 'One child in a summary, texts cut to 500 characters.';

CREATE FUNCTION @schema@.pg_background_summary(uuid_father uuid, p_rows int DEFAULT 20, p_problems int DEFAULT 5)
RETURNS jsonb
LANGUAGE sql STABLE
AS $fn$
    SELECT jsonb_build_object(
        'uuid_parent', b.uuid_parent,
        'status', b.status,
        'children', b.children,
        'counts', jsonb_build_object('queued', b.queued, 'running', b.running, 'done', b.done,
                                     'failed', b.failed, 'stopped', b.stopped, 'lost', b.lost),
        'wall_seconds', extract(epoch FROM b.ended_at - b.started_at)::float8,
        'settings', b.session_settings,
        'retried', (SELECT count(*) FROM @schema@.log_background c
                     WHERE c.uuid_parent = b.uuid_parent AND c.errors IS NOT NULL),
        'rows_included', least(p_rows, b.children),
        'rows', (SELECT coalesce(jsonb_agg(@schema@._summary_row(c) ORDER BY c.seq), '[]'::jsonb)
                   FROM (SELECT * FROM @schema@.log_background c
                          WHERE c.uuid_parent = b.uuid_parent ORDER BY c.seq LIMIT p_rows) c),
        'problems', (SELECT coalesce(jsonb_agg(@schema@._summary_row(c) ORDER BY c.seq), '[]'::jsonb)
                       FROM (SELECT * FROM @schema@.log_background c
                              WHERE c.uuid_parent = b.uuid_parent AND c.status IN ('failed', 'lost', 'stopped')
                              ORDER BY c.seq LIMIT p_problems) c))
      FROM @schema@.batches b
     WHERE b.uuid_parent = uuid_father
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_summary(uuid, int, int) IS
    'The outcome of a batch as JSON: status, counts, wall time, its first p_rows children and its first '
    'p_problems failed, lost or stopped ones (texts cut to 500 characters), so its size does not grow with '
    'the batch. NULL for a batch the caller cannot see.';

CREATE FUNCTION @schema@.pg_background_take_outcome(uuid_father uuid, p_claimed_by text, p_rows int DEFAULT 20,
                                                    p_problems int DEFAULT 5)
RETURNS jsonb
LANGUAGE plpgsql
AS $fn$
BEGIN
    -- Only the claim that holds an ended batch takes its outcome: a late call of an earlier try
    -- (a zombie worker) records nothing.
    UPDATE @schema@.batch b
       SET outcome_taken_by = p_claimed_by, outcome_taken_at = clock_timestamp()
     WHERE b.uuid_parent = uuid_father AND b.claimed_by = p_claimed_by
       AND b.outcome_taken_by IS DISTINCT FROM p_claimed_by
       AND @schema@.batch_status(uuid_father) NOT IN ('queued', 'running');
    RETURN @schema@.pg_background_summary(uuid_father, p_rows, p_problems);
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_take_outcome(uuid, text, int, int) IS
    'pg_background_summary() of an ended batch, recording that p_claimed_by took its outcome: what a waiter '
    'calls as it ends its task. pg_background_submit() launches a succeeded batch anew only once a claim '
    'took its success (the task completed); a success nobody took (its waiter died first) is taken by the '
    'next claim instead.';

CREATE FUNCTION @schema@.pg_background_summaries(uuid_fathers uuid[], p_rows int DEFAULT 20, p_problems int DEFAULT 5)
RETURNS TABLE (uuid_parent uuid, summary jsonb)
LANGUAGE sql STABLE
AS $fn$
    SELECT u, x.summary
      FROM unnest(uuid_fathers) AS u
     CROSS JOIN LATERAL (SELECT @schema@.pg_background_summary(u, p_rows, p_problems) AS summary) x
     WHERE x.summary IS NOT NULL
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_summaries(uuid[], int, int) IS
    'pg_background_summary() of several batches in one round trip (a watcher''s batches that just ended).';

-- The batch console: pages of children and figures that cost the same at any batch size.

CREATE FUNCTION @schema@._console_sorts()
RETURNS text[]
LANGUAGE sql IMMUTABLE
RETURN ARRAY['seq', 'status', 'start', 'duration', 'queue_wait'];
COMMENT ON FUNCTION @schema@._console_sorts() IS 'The orders pg_background_children_page() accepts.';

CREATE FUNCTION @schema@.pg_background_children_page(
    p_parent uuid,
    p_statuses text[] DEFAULT NULL,
    p_text text DEFAULT NULL,
    p_sqlstate text DEFAULT NULL,
    p_sort text DEFAULT 'seq',
    p_descending boolean DEFAULT false,
    p_limit int DEFAULT 100,
    p_offset int DEFAULT 0)
RETURNS TABLE (
    matching bigint, seq int, uuid_child uuid, status text, attempt int, query text, query_length int,
    command text, row_count bigint, has_preview boolean, sqlstate text, error text, error_detail text,
    error_hint text, stopped_by text, queued_time timestamptz, start_time_exec timestamptz,
    end_time_exec timestamptz, queue_seconds float8, run_seconds float8)
LANGUAGE plpgsql STABLE
AS $fn$
DECLARE
    v_matching bigint;
    v_now timestamptz := clock_timestamp();
BEGIN
    IF p_sort IS NULL OR NOT p_sort = ANY (@schema@._console_sorts()) THEN
        RAISE EXCEPTION 'unknown sort %', coalesce(quote_literal(p_sort), 'NULL') USING ERRCODE = 'invalid_parameter_value',
            HINT = 'One of ' || array_to_string(@schema@._console_sorts(), ', ') || '.';
    END IF;
    IF p_statuses IS NOT NULL AND EXISTS (
            SELECT 1 FROM unnest(p_statuses) s
             WHERE s IS NULL OR NOT s = ANY (enum_range(NULL::@schema@.child_status)::text[])) THEN
        RAISE EXCEPTION 'unknown status in %', p_statuses USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Statuses are ' || array_to_string(enum_range(NULL::@schema@.child_status)::text[], ', ') || '.';
    END IF;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 OR p_offset IS NULL OR p_offset < 0 THEN
        RAISE EXCEPTION 'a page is 1 to 1000 children from offset 0 or more, not % from %', p_limit, p_offset
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Text filters are bound values (LIKE metacharacters in them match themselves), never SQL. The
    -- count and the sort read narrow columns, and the sort keeps only the rows up to the page's end
    -- (top-N); only the page's own rows are read whole.
    SELECT count(*) INTO v_matching
      FROM @schema@.log_background c
     WHERE c.uuid_parent = p_parent
       AND (p_statuses IS NULL OR c.status::text = ANY (p_statuses))
       AND (p_sqlstate IS NULL OR c.sqlstate = upper(p_sqlstate))
       AND (p_text IS NULL OR strpos(lower(c.query), lower(p_text)) > 0);
    RETURN QUERY
    WITH page AS (
        SELECT h.id, h.waited, h.ran, row_number() OVER () AS position
          FROM (SELECT c.id, c.seq, c.status,
                       extract(epoch FROM c.start_time_exec - c.queued_time)::float8 AS waited,
                       extract(epoch FROM coalesce(c.end_time_exec, v_now) - c.start_time_exec)::float8 AS ran,
                       c.start_time_exec AS started
                  FROM @schema@.log_background c
                 WHERE c.uuid_parent = p_parent
                   AND (p_statuses IS NULL OR c.status::text = ANY (p_statuses))
                   AND (p_sqlstate IS NULL OR c.sqlstate = upper(p_sqlstate))
                   AND (p_text IS NULL OR strpos(lower(c.query), lower(p_text)) > 0)
                 -- An enum sorts in the order it declares its values: queued, running, done, failed, ...
                 ORDER BY
                   CASE WHEN p_sort = 'status' AND NOT p_descending THEN c.status END ASC,
                   CASE WHEN p_sort = 'status' AND p_descending THEN c.status END DESC,
                   CASE WHEN p_sort = 'start' AND NOT p_descending THEN c.start_time_exec END ASC NULLS LAST,
                   CASE WHEN p_sort = 'start' AND p_descending THEN c.start_time_exec END DESC NULLS LAST,
                   CASE WHEN NOT p_descending THEN
                       CASE p_sort WHEN 'duration' THEN coalesce(c.end_time_exec, v_now) - c.start_time_exec
                                   WHEN 'queue_wait' THEN c.start_time_exec - c.queued_time END END ASC NULLS LAST,
                   CASE WHEN p_descending THEN
                       CASE p_sort WHEN 'duration' THEN coalesce(c.end_time_exec, v_now) - c.start_time_exec
                                   WHEN 'queue_wait' THEN c.start_time_exec - c.queued_time END END DESC NULLS LAST,
                   CASE WHEN p_descending AND p_sort = 'seq' THEN c.seq END DESC,
                   c.seq
                 LIMIT p_limit OFFSET p_offset) h
    )
    SELECT v_matching, c.seq, c.uuid_child, c.status::text, c.attempt, left(c.query, 300), length(c.query),
           c.result->>'command', (c.result->>'rows')::bigint, coalesce(c.result ? 'preview', false),
           c.sqlstate, left(c.error, 2000), left(c.error_detail, 2000), left(c.error_hint, 2000), c.stopped_by,
           c.queued_time, c.start_time_exec, c.end_time_exec, p.waited, p.ran
      FROM page p
      JOIN @schema@.log_background c ON c.id = p.id
     ORDER BY p.position;
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_children_page(uuid, text[], text, text, text, boolean, int, int) IS
    'One page of a batch''s children for a console: filtered by status, by text in the query (case-insensitive, '
    'literal) and by SQLSTATE; sorted by seq, status, start, duration or queue_wait; without result previews '
    '(pg_background_child() has one child''s). matching counts the children that pass the filters. Unknown '
    'sorts or statuses and pages outside 1..1000 are errors (22023).';

CREATE FUNCTION @schema@.pg_background_child(p_child uuid)
RETURNS TABLE (uuid_parent uuid, seq int, status text, attempt int, query text, result jsonb, sqlstate text,
               error text, error_detail text, error_hint text, error_context text, errors jsonb, stopped_by text,
               pid int, queued_time timestamptz, start_time_exec timestamptz, end_time_exec timestamptz)
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT c.uuid_parent, c.seq, c.status::text, c.attempt, c.query, c.result, c.sqlstate, c.error, c.error_detail,
           c.error_hint, c.error_context, c.errors, c.stopped_by, c.pid, c.queued_time, c.start_time_exec,
           c.end_time_exec
      FROM @schema@.log_background c WHERE c.uuid_child = p_child;
END;
COMMENT ON FUNCTION @schema@.pg_background_child(uuid) IS
    'Everything about one child, with its result preview and every failed attempt (what a console loads on demand).';

CREATE FUNCTION @schema@.pg_background_figures(p_parent uuid, p_bins int DEFAULT 60)
RETURNS jsonb
LANGUAGE plpgsql STABLE
AS $fn$
DECLARE
    v_first timestamptz;
    v_last timestamptz;
    v_now timestamptz := clock_timestamp();
    v_width float8;
    v_out jsonb;
BEGIN
    IF p_bins IS NULL OR p_bins NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'bins must be 1 to 1000, not %', p_bins USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT min(c.start_time_exec), max(coalesce(c.end_time_exec, v_now)) INTO v_first, v_last
      FROM @schema@.log_background c WHERE c.uuid_parent = p_parent AND c.start_time_exec IS NOT NULL;
    IF v_first IS NULL THEN
        RETURN jsonb_build_object('started', false, 'bins', '[]'::jsonb);
    END IF;
    v_width := greatest(extract(epoch FROM v_last - v_first)::float8, 0.001) / p_bins;
    -- Running children at the end of each bin: starts so far minus ends so far (one pass, O(children)).
    WITH c AS (
        SELECT extract(epoch FROM x.start_time_exec - v_first)::float8 AS s,
               extract(epoch FROM x.end_time_exec - v_first)::float8 AS e,
               extract(epoch FROM x.start_time_exec - x.queued_time)::float8 AS waited,
               x.status
          FROM @schema@.log_background x
         WHERE x.uuid_parent = p_parent AND x.start_time_exec IS NOT NULL
    ), starts AS (
        SELECT least(floor(s / v_width)::int, p_bins - 1) AS b, count(*) AS n FROM c GROUP BY 1
    ), ends AS (
        SELECT least(floor(e / v_width)::int, p_bins - 1) AS b, count(*) AS n FROM c WHERE e IS NOT NULL GROUP BY 1
    ), series AS (
        SELECT g.b,
               sum(coalesce(st.n, 0)) OVER (ORDER BY g.b) - sum(coalesce(en.n, 0)) OVER (ORDER BY g.b) AS running,
               coalesce(en.n, 0) AS ended
          FROM generate_series(0, p_bins - 1) AS g(b)
          LEFT JOIN starts st ON st.b = g.b LEFT JOIN ends en ON en.b = g.b
    )
    SELECT jsonb_build_object(
               'started', true,
               'first_start', v_first,
               'span_seconds', extract(epoch FROM v_last - v_first)::float8,
               'bin_seconds', v_width,
               'bins', (SELECT jsonb_agg(jsonb_build_array(s.running, s.ended) ORDER BY s.b) FROM series s),
               'run_p50', (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY e - s) FROM c WHERE e IS NOT NULL),
               'run_p95', (SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY e - s) FROM c WHERE e IS NOT NULL),
               'queue_wait_p50', (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY waited) FROM c),
               'queue_wait_p95', (SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY waited) FROM c),
               'ended', (SELECT count(*) FROM c WHERE e IS NOT NULL),
               'per_second', (SELECT count(*) FROM c WHERE e IS NOT NULL)
                             / greatest(extract(epoch FROM v_last - v_first)::float8, 0.001))
      INTO v_out;
    RETURN v_out;
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_figures(uuid, int) IS
    'A batch''s figures for a console, in one pass over its started children: running children at the end of '
    'each of p_bins time bins and children ended in it (the timeline at any size), p50/p95 run time and queue '
    'wait, and throughput (ended children per second since the first start).';

CREATE FUNCTION @schema@.pg_background_progress(p_parent uuid)
RETURNS TABLE (uuid_child uuid, pid int, command text, phase text, percent numeric)
LANGUAGE plpgsql STABLE
AS $fn$
BEGIN
    -- The backends of a batch's running children: the runner that runs a child itself, the nested
    -- worker that runs it at top level (named after the child), or on pg_cron the child's own job.
    -- Only processes of the batch's role are considered, and what the views show depends on the
    -- caller's rights, as for any reader of pg_stat_progress_*.
    RETURN QUERY
    WITH running AS (
        SELECT c.uuid_child, c.pid, c.backend_start, c.role_name, @schema@._cron_child_pid(c.uuid_child) AS cron_pid
          FROM @schema@.log_background c
         WHERE c.uuid_parent = p_parent AND c.status = 'running'
    ), backends AS (
        SELECT r.uuid_child, a.pid
          FROM running r
          JOIN pg_stat_activity a
            ON a.usename = r.role_name
           AND ((a.pid = r.pid AND a.backend_start = r.backend_start)
                OR a.application_name = 'pgbg-child:' || r.uuid_child
                OR a.pid = r.cron_pid)
    ), progress AS (
        SELECT p.pid, 'VACUUM'::text AS command, p.phase::text AS phase,
               round(100.0 * p.heap_blks_scanned / nullif(p.heap_blks_total, 0), 1) AS percent
          FROM pg_stat_progress_vacuum p
        UNION ALL
        SELECT p.pid, p.command, p.phase,
               round(100.0 * coalesce(nullif(p.blocks_done, 0)::numeric / nullif(p.blocks_total, 0),
                                      p.tuples_done::numeric / nullif(p.tuples_total, 0)), 1)
          FROM pg_stat_progress_create_index p
        UNION ALL
        SELECT p.pid, p.command, p.phase, round(100.0 * p.heap_blks_scanned / nullif(p.heap_blks_total, 0), 1)
          FROM pg_stat_progress_cluster p
        UNION ALL
        SELECT p.pid, 'COPY ' || p.type, p.command, round(100.0 * p.bytes_processed / nullif(p.bytes_total, 0), 1)
          FROM pg_stat_progress_copy p
        UNION ALL
        SELECT p.pid, 'ANALYZE', p.phase, round(100.0 * p.sample_blks_scanned / nullif(p.sample_blks_total, 0), 1)
          FROM pg_stat_progress_analyze p
    )
    SELECT DISTINCT ON (b.uuid_child) b.uuid_child, b.pid, g.command, g.phase, g.percent
      FROM backends b JOIN progress g ON g.pid = b.pid
     ORDER BY b.uuid_child, g.percent DESC NULLS LAST;
END
$fn$;
COMMENT ON FUNCTION @schema@.pg_background_progress(uuid) IS
    'Phase and percent of the running children of a batch that PostgreSQL reports progress for (VACUUM, '
    'CREATE INDEX incl. CONCURRENTLY, CLUSTER / VACUUM FULL, COPY, ANALYZE), from pg_stat_progress_*; one row '
    'per such child, none for the others. Bounded by the batch''s cap.';

-- Privileges: nothing for PUBLIC; pgbg_user submits and manages its own batches; pgbg_admin all.
-- Run by every install and upgrade, after the routines are (re)created.

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
GRANT SELECT, INSERT, UPDATE ON @schema@.batch_progress TO pgbg_user;
GRANT UPDATE (claimed_at, requeue_on_takeover, stop_requested_by, notes, outcome_taken_by, outcome_taken_at)
    ON @schema@.batch TO pgbg_user;
GRANT UPDATE (not_before, failures, errors, requeue_on_stop, stopped_by, interruptions)
    ON @schema@.log_background TO pgbg_user;
GRANT SELECT, INSERT, DELETE, UPDATE (alive_until) ON @schema@.waiter TO pgbg_user;
GRANT SELECT, INSERT, DELETE ON @schema@.waiter_watch TO pgbg_user;
-- A row lock needs UPDATE on a column; the policy keeps every row its role's own.
GRANT SELECT, INSERT, UPDATE (lock_key) ON @schema@.role_lock TO pgbg_user;
