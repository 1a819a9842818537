"""A batch's settings: every child runs with them on top of its role's defaults, whoever runs it, and
with nothing an earlier child left behind; SETs at the start of a batch become them; anything that
would change a runner's session is refused at launch."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.helpers import launch, monitor, poll_until, statuses, wait

# Over a millisecond: not run in a burst of short children, which try their locks with a 1 ms timeout
# (a child that would wait rolls back and runs on its own with the batch's).
PROBE = (
    "select current_setting('work_mem') as work_mem, current_setting('maintenance_work_mem') as mwm, "
    "current_setting('lock_timeout') as lock_timeout, current_setting('search_path') as search_path "
    "from pg_sleep(0.002)"
)


def _defaults(user_dsn: str) -> dict[str, Any]:
    """What a fresh session of the role has."""
    with psycopg.connect(user_dsn, autocommit=True) as conn, conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(PROBE).fetchone()
        assert row is not None
        return row


def _seen(conn: psycopg.Connection, parent: str) -> list[dict[str, Any]]:
    rows = monitor(conn, parent)
    assert statuses(rows) == ["done"] * len(rows), rows
    return [r["result"]["preview"][0] for r in rows if r["result"].get("preview")]


@pytest.mark.parametrize("timeout", [None, "1 min"], ids=["in-runner", "own-worker"])
def test_every_child_runs_with_its_batchs_settings_whoever_started_its_runner(
    user: psycopg.Connection, user_dsn: str, scratch: str, timeout: str | None
) -> None:
    defaults = _defaults(user_dsn)
    # The submitter's own settings are not the batch's (its search_path aside): runners it starts
    # inherit them as pg_background workers, and must not pass them on.
    user.execute("SET work_mem = '77MB'")
    user.execute("SET lock_timeout = '7s'")
    user.execute(f"SET search_path = {scratch}, public")
    settings = {"maintenance_work_mem": "123MB", "lock_timeout": "3s"}
    first = launch(user, [PROBE] * 6, max_parallel=2, statement_timeout=timeout, settings=settings)
    # A batch without settings, run by the same role's runners right after (those of the first batch
    # adopt it, or linger for it): nothing of the first batch's settings, nor the submitter's.
    user.execute("RESET search_path")
    second = launch(user, [PROBE] * 6, max_parallel=2, statement_timeout=timeout)
    assert wait(user, first) == "done"
    assert wait(user, second) == "done"
    for row in _seen(user, first):
        assert row == {
            "work_mem": defaults["work_mem"],
            "mwm": "123MB",
            "lock_timeout": "3s",
            "search_path": f"{scratch}, public",
        }
    for row in _seen(user, second):
        assert row == defaults
    stored = user.execute("SELECT session_settings FROM pgbg.batch WHERE uuid_parent = %s", (first,)).fetchone()[0]
    assert stored == {**settings, "search_path": f"{scratch}, public"}
    summary = user.execute("SELECT pgbg.pg_background_summary(%s)", (first,)).fetchone()[0]
    assert summary["settings"] == stored


def test_what_a_child_sets_itself_does_not_reach_the_next(
    user: psycopg.Connection, user_dsn: str, scratch: str
) -> None:
    defaults = _defaults(user_dsn)
    # set_config() in a function: the launch cannot see it, the runner undoes it.
    user.execute(
        f"CREATE FUNCTION {scratch}.sneaky(n int) RETURNS int LANGUAGE sql AS $$ "
        "SELECT (set_config('work_mem', '99MB', false) IS NOT NULL)::int "
        "+ (set_config('search_path', 'pg_catalog', false) IS NOT NULL)::int + n $$"
    )
    statements = [f"select {scratch}.sneaky({k})" for k in range(4)] + [PROBE] * 4
    parent = launch(user, statements, max_parallel=1, settings={"lock_timeout": "5s"})
    assert wait(user, parent) == "done"
    for row in _seen(user, parent)[4:]:
        assert row == {**defaults, "lock_timeout": "5s"}


def test_leading_set_statements_become_the_batchs_settings(user: psycopg.Connection, scratch: str) -> None:
    user.execute(f"CREATE TABLE {scratch}.t (a int)")
    script = f"""
        -- as a migration script starts
        SET maintenance_work_mem = '256MB';
        set lock_timeout to 2500;
        SET search_path TO {scratch}, public;
        SET TIME ZONE 'Asia/Tokyo';
        insert into t values (1);
        select current_setting('TimeZone') as tz, s.* from ({PROBE}) s;
    """
    parent = str(user.execute("SELECT pgbg.pg_background_launch_num(%s, p_monitor => false)", (script,)).fetchone()[0])
    assert wait(user, parent) == "done"
    rows = monitor(user, parent)
    assert [r["query"].split()[0] for r in rows] == ["insert", "select"]
    seen = rows[1]["result"]["preview"][0]
    assert (seen["mwm"], seen["lock_timeout"], seen["search_path"], seen["tz"]) == (
        "256MB",
        "2500ms",
        f"{scratch}, public",
        "Asia/Tokyo",
    )
    assert user.execute(f"SELECT count(*) FROM {scratch}.t").fetchone()[0] == 1
    stored = user.execute("SELECT session_settings FROM pgbg.batch WHERE uuid_parent = %s", (parent,)).fetchone()[0]
    assert stored == {
        "maintenance_work_mem": "256MB",
        "lock_timeout": "2500ms",
        "search_path": f"{scratch}, public",
        "timezone": "Asia/Tokyo",
    }


def test_a_statement_timeout_setting_is_the_batchs_statement_timeout(user: psycopg.Connection) -> None:
    parent = launch(user, ["select pg_sleep(30)"], settings={"statement_timeout": "300ms"})
    assert wait(user, parent) == "failed"
    row = monitor(user, parent)[0]
    assert row["sqlstate"] == "57014"
    timeout = user.execute("SELECT statement_timeout FROM pgbg.batch WHERE uuid_parent = %s", (parent,)).fetchone()[0]
    assert timeout.total_seconds() == pytest.approx(0.3)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="statement timeout is given twice"):
        launch(user, ["select 1"], statement_timeout="1 min", settings={"statement_timeout": "2min"})


REFUSED = [
    (
        ["select 1", "SET work_mem = '1MB'"],
        None,
        psycopg.errors.FeatureNotSupported,
        "statement 2 .* changes the session",
    ),
    (["RESET ALL", "select 1"], None, psycopg.errors.FeatureNotSupported, "statement 1 .* changes the session"),
    (["select 1", "DISCARD ALL"], None, psycopg.errors.FeatureNotSupported, "changes the session"),
    (["SET ROLE postgres", "select 1"], None, psycopg.errors.FeatureNotSupported, "changes the session"),
    (
        ["SET SESSION AUTHORIZATION postgres", "select 1"],
        None,
        psycopg.errors.FeatureNotSupported,
        "changes the session",
    ),
    (["SET LOCAL work_mem = '1MB'", "select 1"], None, psycopg.errors.FeatureNotSupported, "changes the session"),
    (
        ["select 1", "select set_config('work_mem', '1MB', false)"],
        None,
        psycopg.errors.FeatureNotSupported,
        "changes the session",
    ),
    (["select 1"], {"no_such_setting": "1"}, psycopg.errors.UndefinedObject, "no_such_setting"),
    (["select 1"], {"work_mem": "lots"}, psycopg.errors.InvalidParameterValue, "batch setting work_mem"),
    (["SET work_mem = 'lots'", "select 1"], None, psycopg.errors.InvalidParameterValue, "batch setting work_mem"),
    (
        ["select 1"],
        {"log_min_duration_statement": "0"},
        psycopg.errors.InsufficientPrivilege,
        "batch setting log_min_duration_statement",
    ),
    (["select 1"], {"shared_buffers": "1GB"}, psycopg.errors.CantChangeRuntimeParam, "batch setting shared_buffers"),
    (["select 1"], {"role": "postgres"}, psycopg.errors.InvalidParameterValue, "the engine sets it"),
    (["select 1"], {"application_name": "x"}, psycopg.errors.InvalidParameterValue, "the engine sets it"),
    (["select 1"], {"work_mem": ["1MB"]}, psycopg.errors.InvalidParameterValue, "string, number or boolean"),
    (["SET work_mem = '1MB'"], None, psycopg.errors.InvalidParameterValue, "only SET statements"),
]


@pytest.mark.parametrize(("statements", "settings", "error", "match"), REFUSED)
def test_what_would_change_a_runners_session_is_refused_with_nothing_recorded(
    user: psycopg.Connection, statements: list[str], settings: dict[str, Any] | None, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        launch(user, statements, settings=settings)
    assert user.execute("SELECT count(*) FROM pgbg.batch").fetchone()[0] == 0
    assert user.execute("SELECT count(*) FROM pgbg.log_background").fetchone()[0] == 0


def test_set_config_in_a_function_body_or_a_literal_is_not_refused(user: psycopg.Connection, scratch: str) -> None:
    statements = [
        f"create function {scratch}.f() returns text language sql as $f$ select set_config('a.b', 'c', false) $f$",
        "select 'set_config(' as s -- set_config(",
    ]
    assert wait(user, launch(user, statements, max_parallel=1)) == "done"


def test_pg_cron_refuses_settings_it_cannot_give_a_top_level_statement(
    user: psycopg.Connection, scratch: str, launcher: str
) -> None:
    if launcher != "pg_cron":
        pytest.skip("a nested pg_background worker starts with its runner's settings")
    user.execute(f"CREATE TABLE {scratch}.t (a int)")
    with pytest.raises(
        psycopg.errors.FeatureNotSupported, match="VACUUM runs as a job of its own with the role's default settings"
    ):
        launch(
            user,
            [f"insert into {scratch}.t values (1)", f"vacuum {scratch}.t"],
            settings={"maintenance_work_mem": "100MB"},
        )
    assert user.execute("SELECT count(*) FROM pgbg.batch").fetchone()[0] == 0
    # With the role's defaults it runs; a child that needs no top level gets the batch's settings in its
    # own job (a statement timeout gives each child one).
    assert wait(user, launch(user, [f"vacuum {scratch}.t"])) == "done"
    parent = launch(user, [PROBE], statement_timeout="1 min", settings={"lock_timeout": "4s"})
    assert wait(user, parent) == "done"
    assert monitor(user, parent)[0]["result"]["preview"][0]["lock_timeout"] == "4s"


def test_ddl_with_a_lock_timeout_never_queues_readers_behind_it(
    user: psycopg.Connection, user_dsn: str, scratch: str, launcher: str
) -> None:
    """The maintenance recipe: lock_timeout and retries. An ALTER TABLE or a VACUUM FULL waiting for its
    lock would queue every later reader of the table behind it for as long as the blocker runs; with a
    lock_timeout it gives up, lets them pass and tries again until it gets the lock. (On pg_cron a
    VACUUM runs as a job of its own, without the batch's settings: refused at launch, see above.)"""
    tables = ["busy", "also_busy"] if launcher == "pg_background" else ["busy"]
    ddl = [f"alter table {scratch}.busy add column b int", f"vacuum full {scratch}.also_busy"][: len(tables)]
    for table in tables:
        user.execute(f"CREATE TABLE {scratch}.{table} (a int)")
        user.execute(f"INSERT INTO {scratch}.{table} VALUES (1)")
    blocker = psycopg.connect(user_dsn)
    for table in tables:
        blocker.execute(f"SELECT count(*) FROM {scratch}.{table}")  # ACCESS SHARE until it commits
    waits: list[float] = []
    done = threading.Event()

    def read() -> None:
        with psycopg.connect(user_dsn, autocommit=True) as reader:
            while not done.is_set():
                for table in tables:
                    started = time.monotonic()
                    reader.execute(f"SELECT count(*) FROM {scratch}.{table}")
                    waits.append(time.monotonic() - started)
                time.sleep(0.02)

    parent = str(
        user.execute(
            "SELECT pgbg.pg_background_launch_num(%s::text[], p_monitor => false, p_retries => 100, "
            "p_retry_delay => '100 ms', p_retry_backoff => 1, p_settings => '{\"lock_timeout\": \"200ms\"}')",
            (ddl,),
        ).fetchone()[0]
    )
    thread = threading.Thread(target=read)
    thread.start()

    def give_ups() -> int:
        """How often the statement that gave up least often has given up on its lock."""
        return user.execute(
            "SELECT min(coalesce(jsonb_array_length(errors), 0)) FROM pgbg.log_background WHERE uuid_parent = %s",
            (parent,),
        ).fetchone()[0]

    try:
        # Each statement has tried and given up at least twice while the blocker holds its table.
        poll_until(lambda: give_ups() >= 2, 60, 0.05, "each statement to give up on its lock twice")
        # The reader goes on while the statements try again (and give up twice more): the blocker is held
        # until then, so a reader queued behind a statement waiting for its lock for as long as the blocker
        # ran would stop it, however long the test waited. (Its waits were bounded to 0.9 s instead, which
        # a stall of the reader's thread could pass.)
        reads, tries = len(waits), give_ups()
        poll_until(
            lambda: len(waits) >= reads + 20 and give_ups() >= tries + 2,
            60,
            0.05,
            "20 more reads while the statements try twice more",
        )
        assert set(statuses(monitor(user, parent))) <= {"queued", "running"}
        blocker.commit()
        assert wait(user, parent) == "done"
    finally:
        done.set()
        blocker.close()  # first: a reader stuck behind the blocker would never let the join return
        thread.join()
    for row in monitor(user, parent):
        assert {e["sqlstate"] for e in row["errors"]} == {"55P03"}
    assert (
        user.execute(
            f"SELECT count(*) FROM information_schema.columns WHERE table_schema = '{scratch}' AND column_name = 'b'"
        ).fetchone()[0]
        == 1
    )


def test_a_setting_the_role_may_no_longer_set_fails_its_children_not_their_runner(
    admin: psycopg.Connection, user: psycopg.Connection
) -> None:
    role = user.execute("SELECT current_user").fetchone()[0]
    admin.execute(f"GRANT SET ON PARAMETER log_min_duration_statement TO {role}")
    try:
        with user.transaction():
            # Checked at launch, with the grant; the runners start once this commits, without it.
            parent = launch(user, [PROBE] * 3, max_parallel=1, settings={"log_min_duration_statement": "250"})
            admin.execute(f"REVOKE SET ON PARAMETER log_min_duration_statement FROM {role}")
        assert wait(user, parent) == "failed"
        rows = monitor(user, parent)
        assert {(r["status"], r["sqlstate"], r["attempt"]) for r in rows} == {("failed", "42501", 1)}
    finally:
        admin.execute(f"REVOKE SET ON PARAMETER log_min_duration_statement FROM {role}")
