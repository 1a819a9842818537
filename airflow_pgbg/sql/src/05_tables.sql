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
