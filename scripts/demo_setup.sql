-- The demo role pgbg_demo (a member of pgbg_user) and the tables the example DAGs use.
-- Run by make demo, and by the tests that run the example DAGs. Idempotent.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgbg_demo') THEN
        CREATE ROLE pgbg_demo LOGIN;
    END IF;
END $$;
GRANT pgbg_user TO pgbg_demo;
CREATE SCHEMA IF NOT EXISTS pgbg_demo AUTHORIZATION pgbg_demo;
ALTER ROLE pgbg_demo SET search_path = pgbg_demo;
SET ROLE pgbg_demo;
SET search_path = pgbg_demo;
CREATE TABLE IF NOT EXISTS pgbg_demo_numbers (n int);
CREATE TABLE IF NOT EXISTS pgbg_demo_events (id bigint GENERATED ALWAYS AS IDENTITY, at timestamptz, payload text);
