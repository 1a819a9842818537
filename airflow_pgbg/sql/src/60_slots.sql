-- The launcher in use, the caps, and slots: session advisory locks held by runners, freed when a
-- runner dies.

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
    'Advisory lock of the caller''s role under pg_cron: work is queued under it (shared) and a runner job '
    'decides to unschedule itself under it (exclusive), so no batch is left with queued work and no job.';

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

CREATE FUNCTION @schema@._slots_held(p_key int)
RETURNS int
LANGUAGE sql VOLATILE
RETURN (SELECT count(*)::int FROM pg_locks
        WHERE locktype = 'advisory' AND granted AND objsubid = 2
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND classid = p_key::oid);
COMMENT ON FUNCTION @schema@._slots_held(int) IS 'Slots of one kind currently held by live runners.';

CREATE FUNCTION @schema@._take_slot(p_key int, p_slots int)
RETURNS int
LANGUAGE plpgsql VOLATILE
AS $fn$
BEGIN
    FOR s IN 1..p_slots LOOP
        IF pg_try_advisory_lock(p_key, s) THEN
            RETURN s;
        END IF;
    END LOOP;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION @schema@._take_slot(int, int) IS
    'Takes the first free slot 1..p_slots as a session advisory lock; NULL when all are taken.';

CREATE FUNCTION @schema@._try_slot(p_key int, p_slots int)
RETURNS int
LANGUAGE sql VOLATILE
RETURN NULL::int;
COMMENT ON FUNCTION @schema@._try_slot(int, int) IS
    'Slot taking of engine 0.1.0, refused since 1.0.0: a 0.1.0 runner still running after the upgrade '
    'finishes its own batch but adopts no other, whose counters it would not keep.';
