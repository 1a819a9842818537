-- Migration of the tables of engine 1.0.1 to those of 1.1.0 (the routines are built from src/).
--
-- pg_cron jobs scheduled by 1.0.1 may still run its command for a child during the upgrade; an upgrade
-- from 0.1.0 passes through here in the same transaction, and its runners still call its two routines.
-- keep: _cron_exec(uuid,text,text)
-- keep: _launch_top_level(text,uuid,interval)
-- keep: _top_level_result(pg_background_handle)

-- A batch's settings: its search_path was the only one, and stays its setting.
ALTER TABLE @schema@.batch ADD COLUMN session_settings jsonb NOT NULL DEFAULT '{}';
UPDATE @schema@.batch SET session_settings = jsonb_build_object('search_path', search_path);
COMMENT ON COLUMN @schema@.batch.search_path IS 'The batch''s search_path (also in session_settings).';
COMMENT ON COLUMN @schema@.batch.session_settings IS
    'Settings every child runs with on top of its role''s defaults, whoever runs it: the submitter''s '
    'search_path unless the batch named one, the launch''s p_settings and the batch''s leading SET statements.';
