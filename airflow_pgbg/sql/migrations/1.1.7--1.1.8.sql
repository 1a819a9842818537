-- Migration of the tables of engine 1.1.7 to those of 1.1.8 (the routines are built from src/): the
-- children's foreign key to their batch goes (a trigger deletes them with it instead), and on
-- PostgreSQL 18 and later new children get a time-ordered uuid_child; the insert policies become
-- restrictive, as meant (see src/05_tables.sql).
--
-- An upgrade from an older engine passes through here in the same transaction: the routines that its
-- runners and pg_cron jobs still call (see 1.0.1--1.1.0.sql) stay for them here too.
-- keep: _cron_exec(uuid,text,text)
-- keep: _launch_top_level(text,uuid,interval)
-- keep: _top_level_result(pg_background_handle)

DO $fk$
DECLARE
    v_name name;
BEGIN
    FOR v_name IN SELECT c.conname FROM pg_constraint c
                   WHERE c.conrelid = '@schema@.log_background'::regclass AND c.contype = 'f'
                     AND c.confrelid = '@schema@.batch'::regclass LOOP
        EXECUTE format('ALTER TABLE @schema@.log_background DROP CONSTRAINT %I', v_name);
    END LOOP;
END
$fk$;

DO $v7$
BEGIN
    IF current_setting('server_version_num')::int >= 180000 THEN
        ALTER TABLE @schema@.log_background ALTER COLUMN uuid_child SET DEFAULT uuidv7();
    END IF;
END
$v7$;
COMMENT ON COLUMN @schema@.log_background.uuid_child IS
    'The child''s public id: uuidv7() on PostgreSQL 18 and later (time-ordered), gen_random_uuid() before.';

CREATE FUNCTION @schema@._delete_children()
RETURNS trigger
LANGUAGE plpgsql
AS $fn$
BEGIN
    DELETE FROM @schema@.log_background c USING deleted_batch d WHERE c.uuid_parent = d.uuid_parent;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION @schema@._delete_children() IS
    'Trigger of batch: deletes the children of the batches a statement deleted.';
CREATE TRIGGER delete_children AFTER DELETE ON @schema@.batch
    REFERENCING OLD TABLE AS deleted_batch FOR EACH STATEMENT EXECUTE FUNCTION @schema@._delete_children();

DROP POLICY submit_own ON @schema@.batch;
CREATE POLICY submit_own ON @schema@.batch AS RESTRICTIVE FOR INSERT WITH CHECK (role_name = current_user);
DROP POLICY submit_own ON @schema@.log_background;
CREATE POLICY submit_own ON @schema@.log_background AS RESTRICTIVE FOR INSERT WITH CHECK (
    role_name = current_user
    AND EXISTS (SELECT 1 FROM @schema@.batch b
                WHERE b.uuid_parent = log_background.uuid_parent AND b.role_name = current_user));
