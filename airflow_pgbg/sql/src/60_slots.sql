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
