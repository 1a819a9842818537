-- Migration of the tables of engine 0.1.0 to those of 1.0.0 (the rest of the upgrade is built from
-- src/). Runs in the installer's transaction, after the old routines have gone.
--
-- Batches running during the upgrade: runners of 0.1.0 finish the child they hold and the batch they
-- run (such batches are marked counted = false and are counted row by row, as 0.1.0 did), but adopt no
-- other batch (_try_slot() refuses since 1.0.0), so they never touch a batch whose counters they would
-- not keep. These routines of 0.1.0 stay for them until the next upgrade:
-- keep: _launch_top_level(text,uuid,interval)
-- keep: _top_level_result(pg_background_handle)

ALTER TABLE @schema@.batch
    ADD COLUMN retries int NOT NULL DEFAULT 0 CHECK (retries >= 0),
    ADD COLUMN retry_delay interval NOT NULL DEFAULT interval '1 second' CHECK (retry_delay >= interval '0'),
    ADD COLUMN retry_backoff float8 NOT NULL DEFAULT 2 CHECK (retry_backoff >= 1),
    ADD COLUMN retry_lost boolean NOT NULL DEFAULT false,
    ADD COLUMN claimed_at timestamptz,
    ADD COLUMN requeue_on_takeover boolean NOT NULL DEFAULT false,
    ADD COLUMN stop_requested_by text,
    ADD COLUMN counted boolean NOT NULL DEFAULT true;
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

ALTER TABLE @schema@.log_background
    ADD COLUMN not_before timestamptz,
    ADD COLUMN failures int NOT NULL DEFAULT 0,
    ADD COLUMN errors jsonb,
    ADD COLUMN requeue_on_stop boolean NOT NULL DEFAULT false,
    ADD COLUMN stopped_by text,
    ADD COLUMN interruptions int NOT NULL DEFAULT 0;
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
-- Failed, lost and stopped children in order, for summaries and the batch page.
CREATE INDEX ON @schema@.log_background (uuid_parent, seq) WHERE status IN ('failed', 'lost', 'stopped');
-- 0.1.0's index on (status, uuid_parent) for queued and running children let the planner claim a
-- child by reading every queued child of the batch and sorting them (what it picks when its statistics
-- say few are queued), once per child. Claims now have only indexes in seq order to choose from;
-- housekeeping finds running children through an index of their own.
DROP INDEX @schema@.log_background_status_uuid_parent_idx;
CREATE INDEX ON @schema@.log_background (uuid_parent) WHERE status = 'running';

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

-- Counters of every existing batch, while no runner can change a child (ALTER TABLE above holds
-- log_background). Batches still running keep being counted row by row: 0.1.0 runners finish them.
INSERT INTO @schema@.batch_progress (uuid_parent, shard, role_name, queued, running, done, failed, stopped, lost,
                                     first_start, last_end)
SELECT uuid_parent, 0, role_name,
       count(*) FILTER (WHERE status = 'queued'), count(*) FILTER (WHERE status = 'running'),
       count(*) FILTER (WHERE status = 'done'), count(*) FILTER (WHERE status = 'failed'),
       count(*) FILTER (WHERE status = 'stopped'), count(*) FILTER (WHERE status = 'lost'),
       min(start_time_exec), max(end_time_exec)
  FROM @schema@.log_background
 GROUP BY uuid_parent, role_name;
UPDATE @schema@.batch SET counted = false
 WHERE uuid_parent IN (SELECT uuid_parent FROM @schema@.log_background WHERE status IN ('queued', 'running'));

ALTER TABLE @schema@.settings
    ADD COLUMN launcher text NOT NULL DEFAULT 'pg_background' CHECK (launcher IN ('pg_background', 'pg_cron')),
    ADD COLUMN cron_max_running_jobs int CHECK (cron_max_running_jobs > 0),
    ADD COLUMN cron_linger interval NOT NULL DEFAULT '5 s' CHECK (cron_linger >= interval '0'),
    ADD COLUMN linger interval NOT NULL DEFAULT '2 s' CHECK (linger >= interval '0');
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

ALTER TABLE @schema@.batch ADD COLUMN notes text, ADD COLUMN outcome_taken_by text, ADD COLUMN outcome_taken_at timestamptz;
COMMENT ON COLUMN @schema@.batch.notes IS 'What the engine wants the submitter to know, e.g. a cap it lowered.';
COMMENT ON COLUMN @schema@.batch.outcome_taken_by IS
    'The claim that took the batch''s outcome (pg_background_take_outcome()) as it ended its wait: a task '
    'that completed. A success nobody took is taken by the next claim instead of being run again.';
COMMENT ON COLUMN @schema@.batch.outcome_taken_at IS 'When outcome_taken_by took it.';

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
