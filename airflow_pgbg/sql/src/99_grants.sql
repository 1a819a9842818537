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
