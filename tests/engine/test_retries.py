"""Automatic retries of transient failures and of lost children (engine 1.0.0)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.helpers import gate, monitor, poll_until, statuses, wait


def _launch(conn: psycopg.Connection, statements: list[str], **options: Any) -> str:
    names = ", ".join(f"p_{k} => %({k})s" for k in options)
    return str(
        conn.execute(
            f"SELECT pgbg.pg_background_launch_num(%(q)s::text[], p_monitor => false{', ' + names if names else ''})",
            {"q": statements, **options},
        ).fetchone()[0]
    )


@pytest.fixture
def flaky(user: psycopg.Connection, scratch: str) -> str:
    """``{scratch}.flaky(key, n, sqlstate)``: raises ``sqlstate`` on the first ``n`` calls of the test."""
    # The count must survive the failed attempt's rollback: a sequence does.
    user.execute(f"CREATE SEQUENCE {scratch}.attempts")
    user.execute(f"""
        CREATE FUNCTION {scratch}.flaky(p_key text, p_failures int, p_sqlstate text) RETURNS int
        LANGUAGE plpgsql AS $$
        DECLARE v int := nextval('{scratch}.attempts');
        BEGIN
            IF v <= p_failures THEN
                RAISE EXCEPTION 'flaky % call %', p_key, v USING ERRCODE = p_sqlstate;
            END IF;
            RETURN v;
        END $$""")
    return scratch


def test_a_transient_failure_is_retried_until_it_succeeds(user: psycopg.Connection, flaky: str) -> None:
    parent = _launch(user, [f"select {flaky}.flaky('a', 2, '40001')"], retries=3, retry_delay="0.1 s")
    assert wait(user, parent) == "done"
    (row,) = monitor(user, parent)
    assert (row["status"], row["attempt"], row["sqlstate"], row["error"]) == ("done", 3, None, None)
    assert [(e["attempt"], e["status"], e["sqlstate"]) for e in row["errors"]] == [
        (1, "failed", "40001"),
        (2, "failed", "40001"),
    ]


def test_retries_are_used_up_then_the_child_fails(user: psycopg.Connection, flaky: str) -> None:
    parent = _launch(user, [f"select {flaky}.flaky('b', 9, '40P01')"], retries=2, retry_delay="0 s")
    assert wait(user, parent) == "failed"
    (row,) = monitor(user, parent)
    assert (row["attempt"], row["sqlstate"]) == (3, "40P01")
    assert len(row["errors"]) == 3
    summary = user.execute("SELECT pgbg.pg_background_summary(%s)", (parent,)).fetchone()[0]
    assert summary["problems"][0]["failed_attempts"] == 3
    assert summary["retried"] == 1


def test_other_failures_are_not_retried(user: psycopg.Connection, flaky: str) -> None:
    parent = _launch(user, [f"select {flaky}.flaky('c', 1, '22012')"], retries=5, retry_delay="0 s")
    assert wait(user, parent) == "failed"
    (row,) = monitor(user, parent)
    assert (row["attempt"], row["sqlstate"], len(row["errors"])) == (1, "22012", 1)


def test_the_delay_grows_by_the_backoff(user: psycopg.Connection, flaky: str) -> None:
    parent = _launch(user, [f"select {flaky}.flaky('d', 2, '55P03')"], retries=2, retry_delay="0.3 s", retry_backoff=2)
    assert wait(user, parent) == "done"
    (row,) = monitor(user, parent)
    first, second = (e["at"] for e in row["errors"])
    gaps = user.execute(
        "SELECT extract(epoch FROM %s::timestamptz - %s::timestamptz), extract(epoch FROM %s - %s::timestamptz)",
        (second, first, row["start_time_exec"], second),
    ).fetchone()
    assert gaps[0] >= 0.3, gaps  # the delay,
    assert gaps[1] >= 0.6, gaps  # then twice the delay


def test_fail_fast_acts_only_on_a_final_failure(user: psycopg.Connection, flaky: str) -> None:
    parent = _launch(
        user,
        [f"select {flaky}.flaky('e', 1, '40001')", "select pg_sleep(0.5)", "select 1"],
        retries=1,
        retry_delay="0 s",
        fail_fast=True,
        max_parallel=1,
    )
    assert wait(user, parent) == "done"
    assert statuses(monitor(user, parent)) == ["done"] * 3


def test_counts_follow_every_transition(dsn: str, user: psycopg.Connection, flaky: str) -> None:
    # One runner in seq order; the retried first child goes back in the queue behind the others. Child 3
    # waits at a gate until the stop has ended it (a 2-s child had to be caught running), and runs through
    # on the retry.
    with gate(dsn) as g:
        parent = _launch(
            user,
            [f"select {flaky}.flaky('f', 1, '40001')", "select 1/0", f"select {g.sql}", "select 2"],
            retries=1,
            retry_delay="0 s",
            max_parallel=1,
        )
        poll_until(lambda: monitor(user, parent)[2]["status"] == "running", 20)
        g.wait_for(1)
        user.execute("SELECT pgbg.pg_background_stop(%s)", (parent,))
        assert wait(user, parent) == "failed"

    def counts() -> dict[str, int]:
        row = user.execute(
            "SELECT queued, running, done, failed, stopped, lost, children FROM pgbg.batches WHERE uuid_parent = %s",
            (parent,),
        ).fetchone()
        return dict(zip(("queued", "running", "done", "failed", "stopped", "lost", "children"), row, strict=True))

    actual = {
        s: statuses(monitor(user, parent)).count(s) for s in ("queued", "running", "done", "failed", "stopped", "lost")
    }
    assert (
        counts()
        == {**actual, "children": 4}
        == {"queued": 0, "running": 0, "done": 0, "failed": 1, "stopped": 3, "lost": 0, "children": 4}
    )
    assert user.execute("SELECT pgbg.pg_background_retry(%s)", (parent,)).fetchone()[0] == 4
    assert wait(user, parent) == "failed"  # 1/0 again
    assert counts() == {"queued": 0, "running": 0, "done": 3, "failed": 1, "stopped": 0, "lost": 0, "children": 4}


def _terminate_runners(admin: psycopg.Connection, parent: str) -> None:
    """Terminates the runners of the batch's running children (by their pid: a runner renames itself
    for a moment while it starts a nested worker)."""
    assert admin.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pgbg.log_background "
        "WHERE uuid_parent = %s AND status = 'running'",
        (parent,),
    ).fetchone()[0]


def test_a_lost_child_is_retried_only_when_the_batch_allows_it(
    dsn: str, admin: psycopg.Connection, user: psycopg.Connection, scratch: str
) -> None:
    def lose_one(retry_lost: bool) -> list[dict[str, Any]]:
        # With a statement timeout, the child runs in a worker (or job) of its own, where its work may
        # have committed before its runner died: lost, unless the batch says it may run again. Both die
        # here, once the child's own process runs it (a pg_cron job left alone would finish it, and be
        # recorded done, or not have begun yet, depending on the second it was due in). Its first
        # attempt waits at a gate that never opens (a 30-s sleep had to outlast the kills), a second one
        # not at all.
        marker = f"lost_{retry_lost}".lower()
        user.execute(f"CREATE SEQUENCE {scratch}.{marker}")
        with gate(dsn) as never:
            statement = f"select case when nextval('{scratch}.{marker}') = 1 then {never.sql} end as {marker}"
            parent = _launch(
                user, [statement], retries=1, retry_delay="0 s", retry_lost=retry_lost, statement_timeout="1 min"
            )
            running = (
                "SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND query LIKE '%%nextval%%' "
                "AND pid <> pg_backend_pid()"
            )
            # Killed at the gate: after it drew its number, so that a run pg_cron starts again goes through.
            never.wait_for(1)
            poll_until(lambda: admin.execute(f"SELECT is_called FROM {scratch}.{marker}").fetchone()[0], 30)
            poll_until(lambda: admin.execute(running, (f"%{marker}%",)).fetchone() is not None, 30)
            _terminate_runners(admin, parent)
            admin.execute(f"SELECT pg_terminate_backend(pid) FROM ({running}) own", (f"%{marker}%",))
            wait(user, parent)
        return monitor(user, parent)

    (kept,) = lose_one(retry_lost=False)
    assert (kept["status"], kept["attempt"]) == ("lost", 1)
    (again,) = lose_one(retry_lost=True)
    assert (again["status"], again["attempt"]) == ("done", 2)
    assert [e["status"] for e in again["errors"]] == ["lost"]


def test_an_inline_child_whose_runner_was_interrupted_runs_again_without_using_a_retry(
    dsn: str, admin: psycopg.Connection, user: psycopg.Connection, scratch: str
) -> None:
    """Run inline, a child's work rolls back with its runner: it never happened, so it is queued again
    (no retry used, even with none allowed), and its history says so."""
    user.execute(f"CREATE TABLE {scratch}.effects (n int)")
    with gate(dsn) as g:
        parent = _launch(user, [f"insert into {scratch}.effects select 1 from {g.sql}"])
        g.wait_for(1)  # its runner is in the middle of it when it is terminated
        _terminate_runners(admin, parent)
        g.open()  # for the run again
        assert wait(user, parent) == "done"
    (row,) = monitor(user, parent)
    assert row["attempt"] == 2
    assert [(e["attempt"], e["status"]) for e in row["errors"]] == [(1, "interrupted")]
    assert user.execute(f"SELECT count(*) FROM {scratch}.effects").fetchone()[0] == 1
    failures, interruptions = user.execute(
        "SELECT failures, interruptions FROM pgbg.log_background WHERE uuid_parent = %s", (parent,)
    ).fetchone()
    assert (failures, interruptions) == (0, 1)


def test_a_child_that_keeps_taking_its_runner_down_ends_lost(
    dsn: str, admin: psycopg.Connection, user: psycopg.Connection
) -> None:
    # Each attempt waits at a gate that never opens, so each one is still running when its runner is
    # terminated (30-s sleeps had to outlast the polls).
    with gate(dsn) as never:
        parent = _launch(user, [f"select {never.sql}"])
        for attempt in (1, 2, 3):
            poll_until(
                lambda attempt=attempt: (
                    [(r["status"], r["attempt"]) for r in monitor(user, parent)] == [("running", attempt)]
                ),
                30,
                what=f"attempt {attempt} running",
            )
            never.wait_for(1)
            _terminate_runners(admin, parent)
        assert wait(user, parent) == "lost"
    (row,) = monitor(user, parent)
    assert row["attempt"] == 3
    assert [e["status"] for e in row["errors"]] == ["interrupted", "interrupted", "lost"]
    assert "interrupted 3 times" in row["error"]


def test_deadlock_victims_are_retried(
    dsn: str, admin: psycopg.Connection, user: psycopg.Connection, scratch: str
) -> None:
    user.execute(f"CREATE TABLE {scratch}.acct (id int PRIMARY KEY, v int)")
    user.execute(f"INSERT INTO {scratch}.acct SELECT g, 0 FROM generate_series(1, 2) g")
    admin.execute(f"ALTER ROLE {user.info.user} SET deadlock_timeout = '100ms'")  # runners take it up

    def crossing(first: int, second: int, wait_here: str) -> str:
        return (
            f"with a as (update {scratch}.acct set v = v + 1 where id = {first} returning 1), "
            f"s as (select {wait_here} from a) "
            f"update {scratch}.acct set v = v + 1 where id = {second} and exists (select 1 from s)"
        )

    # Each holds its first row at the gate: let through together, they deadlock, whatever the timing.
    with gate(dsn) as g:
        pair = [crossing(1, 2, g.sql), crossing(2, 1, g.sql)]
        parent = _launch(user, pair, retries=3, retry_delay="0.05 s", max_parallel=2)
        g.wait_for(2)
        g.open()
        assert wait(user, parent) == "done"
    rows = monitor(user, parent)
    assert any(e["sqlstate"] == "40P01" for r in rows for e in (r["errors"] or []))
    assert user.execute(f"SELECT sum(v) FROM {scratch}.acct").fetchone()[0] == 4  # both ran once in the end


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retries": -1}, "p_retries must be 0 or more"),
        ({"retries": 2, "retry_delay": None}, "p_retry_delay must be 0 or more"),
        ({"retries": 2, "retry_delay": "-1 s"}, "p_retry_delay must be 0 or more"),
        ({"retry_backoff": 0.5}, "p_retry_backoff must be 1 or more"),
    ],
)
def test_bad_retry_options_record_nothing(user: psycopg.Connection, options: dict[str, Any], message: str) -> None:
    before = user.execute("SELECT count(*) FROM pgbg.batch").fetchone()[0]
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
        _launch(user, ["select 1"], **options)
    assert user.execute("SELECT count(*) FROM pgbg.batch").fetchone()[0] == before
