"""The SQL API as a psql user sees it: launching, splitting, results, errors, bad input."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from airflow_pgbg.status import MONITOR_COLUMNS, ChildStatus
from tests.helpers import gate, launch, monitor, statuses, wait

SEED_DEMO = (
    "select version();,select version(),select version(),select version(),"
    "select version(),select version(),select version();  "
)


@pytest.mark.pg_background_only  # p_monitor defaults to true, which needs pg_background
def test_seed_demo_call_runs_seven_children(user: psycopg.Connection) -> None:
    # The seed's own call, with the delimiter spelled out (ours defaults to ';').
    parent = user.execute("SELECT pgbg.pg_background_launch_num(%s, p_delimiter => ',')", (SEED_DEMO,)).fetchone()[0]
    rows = monitor(user, str(parent))
    assert len(rows) == 7
    assert statuses(rows) == ["done"] * 7  # p_monitor defaults to true: the call returned at the end
    version = user.execute("SELECT version()").fetchone()[0]
    for row in rows:
        assert row["query"] == "select version()"
        assert row["result"]["command"] == "SELECT 1"
        assert row["result"]["preview"] == [{"version": version}]
        assert row["start_time_exec"] <= row["end_time_exec"]
        assert row["duration"] is not None


def test_asynchronous_launch_returns_before_the_batch_ends(dsn: str, user: psycopg.Connection) -> None:
    with gate(dsn) as g:  # the batch cannot end before the test has looked
        parent = launch(user, [f"select {g.sql}"], monitor=False)
        assert statuses(monitor(user, parent))[0] in ("queued", "running")
        g.open()
    assert wait(user, parent) == "done"


def test_purge_deletes_old_finished_batches_with_their_children(
    dsn: str, user: psycopg.Connection, admin: psycopg.Connection
) -> None:
    finished = launch(user, ["select 1", "select 2"])
    assert wait(user, finished) == "done"
    with gate(dsn) as g:
        unfinished = launch(user, [f"select {g.sql}", "select 3"], max_parallel=1)
        admin.execute(
            "UPDATE pgbg.batch SET created_at = created_at - interval '31 days' WHERE uuid_parent = ANY (%s::uuid[])",
            ([finished, unfinished],),
        )
        assert user.execute("SELECT pgbg.pg_background_purge()").fetchone()[0] == 1
        children = "SELECT count(*) FROM pgbg.log_background WHERE uuid_parent = %s"
        assert admin.execute(children, (finished,)).fetchone()[0] == 0
        assert admin.execute(children, (unfinished,)).fetchone()[0] == 2
        g.open()
    assert wait(user, unfinished) == "done"
    # A batch deleted by hand takes its children too, as the foreign key's cascade did up to engine 1.1.7.
    assert user.execute("DELETE FROM pgbg.batch WHERE uuid_parent = %s", (unfinished,)).rowcount == 1
    assert admin.execute(children, (unfinished,)).fetchone()[0] == 0


def test_children_ids_are_time_ordered_on_postgresql_18(user: psycopg.Connection) -> None:
    parent = launch(user, ["select 1"] * 3)
    assert wait(user, parent) == "done"
    ids = [uuid.UUID(str(r["uuid_child"])) for r in monitor(user, parent)]
    if user.info.server_version >= 180000:
        assert [i.version for i in ids] == [7, 7, 7]
        assert ids == sorted(ids)  # in seq order, as they were queued
    else:
        assert [i.version for i in ids] == [4, 4, 4]


def test_text_form_splits_only_outside_quotes_and_comments(user: psycopg.Connection) -> None:
    text = """
        select 'a;b' as s;
        select $$c;d$$ as s;  -- a comment; with a semicolon
        select $tag$ e;$$;f $tag$ as s;
        /* block; /* nested; */ comment */ select E'g\\';h' as s;
        select "x;y" from (select 1 as "x;y") t;
        values (1), (2);
        -- only a comment;
        ;;
    """
    parts = user.execute("SELECT pgbg.split_statements(%s)", (text,)).fetchone()[0]
    assert len(parts) == 6
    assert parts[0] == "select 'a;b' as s"
    assert parts[5] == "values (1), (2)"
    parent = user.execute("SELECT pgbg.pg_background_launch_num(%s, p_monitor => false)", (text,)).fetchone()[0]
    assert wait(user, str(parent)) == "done"
    rows = monitor(user, str(parent))
    assert statuses(rows) == ["done"] * 6
    previews = [r["result"]["preview"] for r in rows]
    assert previews[0] == [{"s": "a;b"}]
    assert previews[1] == [{"s": "c;d"}]
    assert previews[2] == [{"s": " e;$$;f "}]
    assert previews[3] == [{"s": "g';h"}]
    assert previews[4] == [{"x;y": 1}]
    assert previews[5] == [{"column1": 1}, {"column1": 2}]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("SELECT pgbg.pg_background_launch_num('')", "empty"),
        ("SELECT pgbg.pg_background_launch_num('  ;  ; ')", "empty"),
        ("SELECT pgbg.pg_background_launch_num('-- nothing here\n/* nor here */')", "empty"),
        ("SELECT pgbg.pg_background_launch_num('{}'::text[])", "empty"),
        ("SELECT pgbg.pg_background_launch_num(ARRAY['select 1', '-- just a comment'])", "only blanks or comments"),
        ("SELECT pgbg.pg_background_launch_num(ARRAY['select 1', NULL])", "NULL"),
        ("SELECT pgbg.pg_background_launch_num('select 1; select ''oops')", "unterminated quoted string"),
        ("SELECT pgbg.pg_background_launch_num('select 1; select $x$ oops')", "unterminated dollar-quoted"),
        ("SELECT pgbg.pg_background_launch_num('select 1; /* oops')", r"unterminated /\* comment"),
        ("SELECT pgbg.pg_background_launch_num('select \"oops')", "unterminated quoted identifier"),
        ("SELECT pgbg.pg_background_launch_num('select 1', p_max_parallel => 0)", "p_max_parallel"),
        ("SELECT pgbg.pg_background_launch_num(ARRAY['select 1'], p_max_parallel => -3)", "p_max_parallel"),
        ("SELECT pgbg.pg_background_launch_num('select 1', p_delimiter => '')", "delimiter"),
    ],
)
def test_bad_input_is_refused_before_anything_is_recorded(user: psycopg.Connection, call: str, message: str) -> None:
    before = user.execute("SELECT count(*) FROM pgbg.batch").fetchone()[0]
    with pytest.raises(psycopg.Error, match=message):
        user.execute(call)
    assert user.execute("SELECT count(*) FROM pgbg.batch").fetchone()[0] == before
    assert user.execute("SELECT count(*) FROM pgbg.log_background").fetchone()[0] == 0


def test_results_carry_command_tags_and_a_bounded_preview(user: psycopg.Connection, scratch: str) -> None:
    parent = launch(
        user,
        [
            f"create table {scratch}.r (a int, b text)",
            f"insert into {scratch}.r select g, repeat('x', 1000) from generate_series(1, 300) g",
            f"update {scratch}.r set a = a + 1 where a <= 10",
            f"delete from {scratch}.r where a > 290 returning a",
            f"select * from {scratch}.r order by a",
        ],
        max_parallel=1,
    )
    assert wait(user, parent) == "done"
    rows = monitor(user, parent)
    results = [r["result"] for r in rows]
    assert results[0]["command"] == "CREATE TABLE"
    assert results[1] == {"command": "INSERT 0 300", "rows": 300}
    assert results[2] == {"command": "UPDATE 10", "rows": 10}
    assert results[3]["command"] == "DELETE 10"
    assert results[3]["truncated"] is False
    assert len(results[3]["preview"]) == 10
    select = results[4]
    assert select["command"] == "SELECT 290"
    assert select["rows"] == 290
    # 100 rows at most, and about 1 KB each cannot all fit in 64 KB either.
    assert select["truncated"] is True
    assert 0 < len(select["preview"]) < 100
    assert len(str(select["preview"]).encode()) <= 65536 + 4096
    quiet = monitor(user, parent, verbose=False)
    assert "preview" not in quiet[4]["result"]


def test_errors_keep_sqlstate_message_detail_and_hint(user: psycopg.Connection, scratch: str, launcher: str) -> None:
    user.execute(
        f"""CREATE FUNCTION {scratch}.boom() RETURNS int LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'it broke' USING ERRCODE = '22023', DETAIL = 'the detail', HINT = 'the hint';
            END $$"""
    )
    parent = launch(
        user,
        [
            "select 1/0",
            f"select {scratch}.boom()",
            "do $$ begin raise exception 'in a do' using detail = 'do detail', hint = 'do hint'; end $$",
            "select * from no_such_table",
        ],
    )
    assert wait(user, parent) == "failed"
    rows = {r["seq"]: r for r in monitor(user, parent)}
    assert (rows[1]["status"], rows[1]["sqlstate"], rows[1]["error"]) == ("failed", "22012", "division by zero")
    detail = user.execute(
        "SELECT sqlstate, error, error_detail, error_hint FROM pgbg.log_background WHERE uuid_parent = %s ORDER BY seq",
        (parent,),
    ).fetchall()
    assert detail[1] == ("22023", "it broke", "the detail", "the hint")
    # A DO runs at top level; pg_cron, which runs it in a job of its own, records its text but not
    # its SQLSTATE.
    assert detail[2] == ("P0001" if launcher == "pg_background" else "XX000", "in a do", "do detail", "do hint")
    assert detail[3][0] == "42P01"


def test_a_failed_child_leaves_none_of_its_work_behind(user: psycopg.Connection, scratch: str) -> None:
    user.execute(f"CREATE TABLE {scratch}.a (x int primary key)")
    parent = launch(
        user,
        [f"with i as (insert into {scratch}.a values (1), (2) returning x) select 1/(count(*) - 2) from i"],
    )
    assert wait(user, parent) == "failed"
    assert user.execute(f"SELECT count(*) FROM {scratch}.a").fetchone()[0] == 0


def test_statements_that_need_top_level_run_as_children(user: psycopg.Connection, scratch: str) -> None:
    user.execute(f"CREATE TABLE {scratch}.big AS SELECT g AS a FROM generate_series(1, 1000) g")
    user.execute(
        f"""CREATE PROCEDURE {scratch}.committing() LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO {scratch}.big VALUES (-1); COMMIT;
                INSERT INTO {scratch}.big VALUES (-2); COMMIT;
            END $$"""
    )
    parent = launch(
        user,
        [
            f"vacuum (analyze) {scratch}.big",
            f"create index concurrently big_a on {scratch}.big (a)",
            f"call {scratch}.committing()",
            f"select * into {scratch}.copy_of_big from {scratch}.big",
            f"vacuum {scratch}.does_not_exist",
            f"create index concurrently big_a on {scratch}.big (a)",
        ],
        # One at a time: VACUUM ANALYZE and CREATE INDEX CONCURRENTLY on one table can deadlock.
        max_parallel=1,
    )
    # Polling from short statements (as Airflow does): CONCURRENTLY waits for older snapshots.
    from tests.helpers import poll_until

    poll_until(lambda: all(r["status"] not in ("queued", "running") for r in monitor(user, parent)), 60)
    rows = monitor(user, parent)
    assert [(r["status"], r["run_mode"]) for r in rows] == [
        ("done", "worker"),
        ("done", "worker"),
        ("done", "worker"),
        ("done", "worker"),
        ("failed", "worker"),
        ("failed", "worker"),
    ], [(r["query"], r["error"]) for r in rows]
    assert rows[0]["result"]["command"] == "VACUUM"
    assert rows[1]["result"]["command"] == "CREATE INDEX"
    assert rows[2]["result"]["command"] == "CALL"
    assert rows[4]["sqlstate"] == "42P01"
    assert rows[5]["sqlstate"] == "42P07"  # the index already exists
    assert user.execute(f"SELECT count(*) FROM {scratch}.big WHERE a < 0").fetchone()[0] == 2
    assert (
        user.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", (f"{scratch}.big_a",)
        ).fetchone()[0]
        is True
    )


@pytest.mark.pg_background_only
def test_synchronous_launch_refuses_concurrently(user: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="CONCURRENTLY"):
        launch(user, ["create index concurrently on x (a)"], monitor=True)
    assert user.execute("SELECT count(*) FROM pgbg.batch").fetchone()[0] == 0


def test_wait_returns_null_on_timeout_and_batch_keeps_running(dsn: str, user: psycopg.Connection) -> None:
    # The child waits at a gate until the wait has timed out (a 1-s child had to outlast a 0.1-s wait).
    with gate(dsn) as g:
        parent = launch(user, [f"select {g.sql}"])
        assert wait(user, parent, "0.1s") is None
        g.open()
        assert wait(user, parent) == "done"


def test_unknown_uuid_monitor_is_empty_wait_and_stop_raise(user: psycopg.Connection) -> None:
    unknown = "00000000-0000-4000-8000-000000000000"
    assert monitor(user, unknown) == []
    with pytest.raises(psycopg.errors.NoDataFound, match="no batch"):
        wait(user, unknown)
    with pytest.raises(psycopg.errors.NoDataFound, match="no batch or child"):
        user.execute("SELECT pgbg.pg_background_stop(%s)", (unknown,))


@pytest.mark.parametrize("timeout", [None, "1 min"], ids=["in-runner", "own-worker"])
def test_children_run_with_the_submitters_search_path(
    user: psycopg.Connection, scratch: str, launcher: str, timeout: str | None
) -> None:
    user.execute(f"CREATE TABLE {scratch}.t (a int)")
    # Without public, where pg_background lives: runners, nested workers and pg_cron jobs must not
    # depend on it. A timeout puts every child in a worker (pg_cron: a job) of its own.
    user.execute(f"SET search_path = {scratch}")
    statements = ["insert into t values (1)", "select count(*) as n from t"]
    if launcher == "pg_background":
        statements.append("vacuum t")  # pg_cron: see test_cron_top_level_statement_needs_the_default_search_path
    parent = launch(user, statements, max_parallel=1, statement_timeout=timeout)
    assert wait(user, parent) == "done"
    assert user.execute(f"SELECT count(*) FROM {scratch}.t").fetchone()[0] == 1
    assert [r["result"]["command"] for r in monitor(user, parent)] == ["INSERT 0 1", "SELECT 1", "VACUUM"][
        : len(statements)
    ]


def test_cron_top_level_statement_needs_the_default_search_path(
    user: psycopg.Connection, user_dsn: str, scratch: str, launcher: str
) -> None:
    if launcher != "pg_cron":
        pytest.skip("pg_background workers inherit the batch's search_path")
    user.execute(f"CREATE TABLE {scratch}.t (a int)")
    # SET in the session: refused at launch, nothing recorded.
    user.execute(f"SET search_path = {scratch}")
    before = user.execute("SELECT count(*) FROM pgbg.batch").fetchone()[0]
    with pytest.raises(
        psycopg.errors.FeatureNotSupported, match="VACUUM runs as a job of its own with the role's default"
    ):
        launch(user, ["insert into t values (1)", "vacuum t"])
    assert user.execute("SELECT count(*) FROM pgbg.batch").fetchone()[0] == before
    # Given at connection time, the launching session's default is not the job's: the runner, a
    # session like the job's, refuses that child alone, with the same message.
    with psycopg.connect(user_dsn, autocommit=True, options=f"-c search_path={scratch}") as other:
        parent = launch(other, ["insert into t values (1)", "vacuum t"], max_parallel=1)
        assert wait(other, parent) == "failed"
        rows = monitor(other, parent)
    assert statuses(rows) == ["done", "failed"]
    assert rows[1]["sqlstate"] == "0A000"
    assert "runs as a job of its own with the role's default settings" in rows[1]["error"]
    assert f"search_path = {scratch}" in rows[1]["error"]
    # Schema-qualified, with the default search_path, it runs.
    user.execute("RESET search_path")
    parent = launch(user, [f"vacuum {scratch}.t"])
    assert wait(user, parent) == "done"


def test_vocabulary_and_monitor_shape_match_python(user: psycopg.Connection) -> None:
    labels = user.execute("SELECT enum_range(NULL::pgbg.child_status)::text[]").fetchone()[0]
    assert labels == [s.value for s in ChildStatus]
    cols = user.execute(
        "SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute "
        "WHERE attrelid = 'pgbg.monitor_row'::regclass AND attnum > 0"
    ).fetchone()[0]
    assert tuple(cols) == MONITOR_COLUMNS
