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
