-- Cluster-wide roles of airflow_pgbg, created or completed on every install (idempotent).
-- Grant pgbg_user to the roles that submit batches, pgbg_admin to those who watch and stop all.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgbg_user') THEN
        CREATE ROLE pgbg_user NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgbg_admin') THEN
        CREATE ROLE pgbg_admin NOLOGIN;
    END IF;
END
$roles$;
COMMENT ON ROLE pgbg_user IS 'airflow_pgbg: submit, watch and stop your own batches';
COMMENT ON ROLE pgbg_admin IS 'airflow_pgbg: watch and stop every batch, change engine settings';
-- Members may launch pg_background workers, which run as the member itself (where the server has
-- pg_background: under the pg_cron launcher the installer grants USAGE on schema cron instead).
DO $grant$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgbackground_role') THEN
        GRANT pgbackground_role TO pgbg_user;
    END IF;
END
$grant$;
GRANT pgbg_user TO pgbg_admin;
-- To see other roles' workers in pg_stat_activity and cancel them.
GRANT pg_read_all_stats, pg_signal_backend TO pgbg_admin;
