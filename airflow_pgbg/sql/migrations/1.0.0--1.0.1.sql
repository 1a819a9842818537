-- Migration of the tables of engine 1.0.0 to those of 1.0.1 (the routines are built from src/).
--
-- An upgrade from 0.1.0 passes through 1.0.0 in the same transaction: the routines its runners still
-- call (see 0.1.0--1.0.0.sql) stay for them here too.
-- keep: _launch_top_level(text,uuid,interval)
-- keep: _top_level_result(pg_background_handle)

-- The role's locks become rows only it can lock (1.0.0 took advisory locks that any session could hold).
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
