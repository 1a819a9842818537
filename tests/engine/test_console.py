"""The engine's console API: pages of children, one child, figures and progress (engine 1.0.0)."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.rows import dict_row

from airflow_pgbg.status import CONSOLE_SORTS
from tests.helpers import gate, launch, poll_until, wait


def _page(conn: psycopg.Connection, parent: str, **kwargs: object) -> list[dict]:
    args = ", ".join(f"{k} => %({k})s" for k in kwargs)
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"SELECT * FROM pgbg.pg_background_children_page(%(parent)s{', ' + args if args else ''})",
            {"parent": parent, **kwargs},
        ).fetchall()


@pytest.fixture
def mixed(user: psycopg.Connection) -> str:
    """Ten children: sleeps of different lengths, two failures (22012, 42P01) and a long query."""
    statements = [f"select pg_sleep({n / 50})" for n in range(1, 8)]
    statements += ["select 1/0", "select * from no_such_table", "select '" + "x" * 1000 + "' as long"]
    parent = launch(user, statements, max_parallel=2)
    assert wait(user, parent) == "failed"
    return parent


def test_the_sorts_are_the_shared_vocabulary(user: psycopg.Connection) -> None:
    assert tuple(user.execute("SELECT pgbg._console_sorts()").fetchone()[0]) == CONSOLE_SORTS


def test_pages_filter_and_sort_in_the_engine(user: psycopg.Connection, mixed: str) -> None:
    rows = _page(user, mixed)
    assert [r["seq"] for r in rows] == list(range(1, 11))
    assert {r["matching"] for r in rows} == {10}
    assert "result" not in rows[0]  # previews only through pg_background_child()
    assert rows[9]["query_length"] == len("select '' as long") + 1000
    assert len(rows[9]["query"]) == 300
    assert rows[0]["command"] == "SELECT 1"
    assert rows[9]["has_preview"] is True
    # Problems first, then the rest in order.
    by_status = _page(user, mixed, p_sort="status", p_descending=True)
    assert [r["status"] for r in by_status[:2]] == ["failed", "failed"]
    assert [r["seq"] for r in by_status[:2]] == [8, 9]
    # Against the durations recorded, not the sleeps asked for: 0.14 s outlasted 0.12 s by 20 ms only.
    ran = {r["seq"]: r["run_seconds"] for r in rows}
    longest = _page(user, mixed, p_sort="duration", p_descending=True, p_limit=1)[0]
    assert ran[longest["seq"]] == max(ran.values())
    assert longest["matching"] == 10
    by_duration = [r["run_seconds"] for r in _page(user, mixed, p_sort="duration", p_descending=True)]
    assert by_duration == sorted(ran.values(), reverse=True)
    assert [r["seq"] for r in _page(user, mixed, p_statuses=["failed"])] == [8, 9]
    assert [r["seq"] for r in _page(user, mixed, p_sqlstate="42p01")] == [9]
    assert [r["seq"] for r in _page(user, mixed, p_text="NO_SUCH")] == [9]
    assert _page(user, mixed, p_text="%") == []  # literal text, not a pattern
    assert [r["seq"] for r in _page(user, mixed, p_limit=3, p_offset=3)] == [4, 5, 6]
    assert _page(user, mixed, p_offset=50) == []
    waits = [r["queue_seconds"] for r in _page(user, mixed, p_sort="queue_wait")]
    assert waits == sorted(waits)


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"p_sort": "pid; drop table x"}, "unknown sort"),
        ({"p_statuses": ["done", "finished"]}, "unknown status"),
        ({"p_limit": 0}, "a page is 1 to 1000"),
        ({"p_limit": 1001}, "a page is 1 to 1000"),
        ({"p_offset": -1}, "a page is 1 to 1000"),
    ],
)
def test_bad_pages_are_clear_errors(user: psycopg.Connection, mixed: str, kwargs: dict, says: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=says):
        _page(user, mixed, **kwargs)


def test_one_child_with_everything(user: psycopg.Connection, mixed: str) -> None:
    child = user.execute("SELECT uuid_child FROM pgbg.log_background WHERE uuid_parent = %s AND seq = 10", (mixed,))
    with user.cursor(row_factory=dict_row) as cur:
        row = cur.execute("SELECT * FROM pgbg.pg_background_child(%s)", child.fetchone()).fetchone()
    assert row["result"]["preview"] == [{"long": "x" * 1000}]
    assert len(row["query"]) == len("select '' as long") + 1000
    assert str(row["uuid_parent"]) == mixed


def test_figures_aggregate_the_timeline(user: psycopg.Connection, mixed: str) -> None:
    figures = user.execute("SELECT pgbg.pg_background_figures(%s, 20)", (mixed,)).fetchone()[0]
    assert figures["started"] is True
    assert len(figures["bins"]) == 20
    assert max(running for running, _ in figures["bins"]) <= 2  # the cap
    assert sum(ended for _, ended in figures["bins"]) == 10 == figures["ended"]
    assert figures["bins"][-1][0] == 0  # nothing runs at the end
    # The percentiles of the run times the children recorded (the page's run_seconds), whatever the load
    # made them, instead of below 1 s.
    ran = sorted(r["run_seconds"] for r in _page(user, mixed))
    assert figures["run_p50"] == pytest.approx((ran[4] + ran[5]) / 2)
    assert figures["run_p95"] == pytest.approx(ran[8] + 0.55 * (ran[9] - ran[8]))
    assert 0 < figures["run_p50"] <= figures["run_p95"]
    assert figures["per_second"] > 0
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        user.execute("SELECT pgbg.pg_background_figures(%s, 0)", (mixed,))
    assert user.execute("SELECT pgbg.pg_background_figures(gen_random_uuid())").fetchone()[0] == {
        "started": False,
        "bins": [],
    }


def test_progress_of_a_running_create_index(dsn: str, user: psycopg.Connection, scratch: str) -> None:
    # The index expression waits at a gate at row 200, and the other child at the start: CREATE INDEX
    # reports its progress, and the other child runs, for as long as the test looks (a 4-s build and a
    # 3-s sleep had to be caught by a 50-ms poll).
    with gate(dsn) as g:
        user.execute(
            f"CREATE FUNCTION {scratch}.slow(x int) RETURNS int LANGUAGE plpgsql IMMUTABLE "
            f"AS $$ BEGIN IF x = 200 THEN PERFORM {g.sql}; END IF; RETURN x; END $$"
        )
        user.execute(f"CREATE TABLE {scratch}.t AS SELECT g AS a FROM generate_series(1, 400) g")
        parent = launch(user, [f"create index on {scratch}.t ({scratch}.slow(a))", f"select {g.sql}"], max_parallel=2)

        def progress() -> list[tuple]:
            return user.execute(
                "SELECT command, phase, percent FROM pgbg.pg_background_progress(%s)", (parent,)
            ).fetchall()

        g.wait_for(2)
        (row,) = poll_until(progress, 20, 0.05, "progress of the CREATE INDEX child")
        assert row[0] == "CREATE INDEX"
        assert row[1]  # a phase, e.g. "building index: scanning table"
        g.open()
        assert wait(user, parent) == "done"
    assert progress() == []


def test_a_retry_records_who_and_when(user: psycopg.Connection) -> None:
    parent = launch(user, ["select 1/0", "select 1"])
    assert wait(user, parent) == "failed"
    assert user.execute("SELECT pgbg.pg_background_retry(%s, 'airflow user ada')", (parent,)).fetchone()[0] == 1
    wait(user, parent)
    notes = user.execute("SELECT notes FROM pgbg.batch WHERE uuid_parent = %s", (parent,)).fetchone()[0]
    assert "1 children queued again by airflow user ada at " in notes
