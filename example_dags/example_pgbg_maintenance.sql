-- Rendered by Jinja before splitting; {{ params.days }} days of history are kept.
-- The statements are independent: a batch runs them in parallel in no promised order.
create or replace function pgbg_demo_purge(keep interval) returns bigint language plpgsql as $$
declare
    gone bigint;
begin
    delete from pgbg_demo_events where at < now() - keep;  -- a semicolon inside a body
    get diagnostics gone = row_count;
    return gone;
end $$;
insert into pgbg_demo_events (at, payload) select now() - g * interval '1 hour', 'event ' || g from generate_series(1, 500) g;
select count(*) as events_in_window from pgbg_demo_events where at >= now() - interval '{{ params.days }} days';
create index concurrently if not exists pgbg_demo_events_at on pgbg_demo_events (at);
