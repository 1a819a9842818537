-- Migration of the tables of engine 1.1.5 to those of 1.1.6 (the routines are built from src/): the
-- queued children get an index by role, for the look of a lingering runner (_role_has_queued()), in
-- seq order within each batch, as a runner's claim reads them; the index of running children gets
-- their id, by which a runner records its child done (see _claim()).
-- Building it reads the children's table once and holds back their writes meanwhile: runners wait,
-- and go on when the upgrade commits.
--
-- An upgrade from an older engine passes through here in the same transaction: the routines that its
-- runners and pg_cron jobs still call (see 1.0.1--1.1.0.sql) stay for them here too.
-- keep: _cron_exec(uuid,text,text)
-- keep: _launch_top_level(text,uuid,interval)
-- keep: _top_level_result(pg_background_handle)

CREATE INDEX ON @schema@.log_background (role_name, uuid_parent, seq) WHERE status = 'queued';
DROP INDEX @schema@.log_background_uuid_parent_idx;
CREATE INDEX ON @schema@.log_background (uuid_parent, id) WHERE status = 'running';
