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
