"""PgBackgroundBatchOperator and its trigger under real Airflow (dag.test) on the real database."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from airflow.sdk.exceptions import AirflowException

from airflow_pgbg.compat import CAN_START_FROM_TRIGGER
from airflow_pgbg.hooks.pgbg import PgBackgroundHook
from airflow_pgbg.identity import XCOM_BATCH_KEY
from airflow_pgbg.operators.batch import PgBackgroundBatchOperator
from tests.helpers import gate, monitor, poll_until, statuses


def _ti(dr: Any) -> Any:
    (ti,) = dr.get_task_instances()
    return ti


def _batch_of(user: psycopg.Connection, dag_id: str) -> str:
    row = user.execute(
        "SELECT uuid_parent FROM pgbg.batch WHERE origin LIKE %s ORDER BY created_at DESC LIMIT 1", (f"{dag_id}/%",)
    ).fetchone()
    assert row, f"no batch launched by {dag_id}"
    return str(row[0])


@pytest.mark.parametrize("dag_id", ["ok_deferrable", "ok_blocking"])
def test_success_deferrable_and_blocking(
    run_dag: Callable[..., Any], marks: Callable[[], list[int]], user: psycopg.Connection, dag_id: str
) -> None:
    dr = run_dag(dag_id)
    ti = _ti(dr)
    assert (dr.state, ti.state) == ("success", "success")
    assert marks() == [1, 2]
    parent = _batch_of(user, f"pgbg_{dag_id}")
    assert statuses(monitor(user, parent)) == ["done"] * (4 if dag_id == "ok_deferrable" else 3)
    xcom = ti.xcom_pull(task_ids="batch", key=XCOM_BATCH_KEY)
    claim = "try 1 deferred" if dag_id == "ok_deferrable" else "try 1"
    assert xcom == {
        "uuid_parent": parent,
        "postgres_conn_id": "pgbg_test",
        "database": None,
        "engine_schema": "pgbg",
        "claim": claim,
    }
    summary = ti.xcom_pull(task_ids="batch")
    assert summary["uuid_parent"] == parent
    assert summary["status"] == "done"
    assert summary["counts"]["done"] == summary["children"]


@pytest.fixture
def inline_triggers(caplog: pytest.LogCaptureFixture) -> Callable[[], int]:
    """How many triggers dag.test() has run in line (it logs each, from the module of DAG.test)."""
    from airflow.sdk import DAG

    caplog.set_level(logging.INFO, logger=DAG.test.__module__)
    return lambda: sum(r.getMessage() == "[DAG TEST] running trigger in line" for r in caplog.records)


def test_a_batch_that_ends_within_defer_after_ends_its_task_on_the_worker(
    run_dag: Callable[..., Any],
    marks: Callable[[], list[int]],
    user: psycopg.Connection,
    inline_triggers: Callable[[], int],
) -> None:
    dr = run_dag("waits_on_worker")
    ti = _ti(dr)
    assert (dr.state, ti.state) == ("success", "success")
    assert inline_triggers() == 0  # never deferred
    assert marks() == [1, 2]
    parent = _batch_of(user, "pgbg_waits_on_worker")
    assert statuses(monitor(user, parent)) == ["done"] * 3
    assert ti.xcom_pull(task_ids="batch")["status"] == "done"
    # Deferrable all the same: its claim is the one a trigger would wait under.
    assert ti.xcom_pull(task_ids="batch", key=XCOM_BATCH_KEY)["claim"] == "try 1 deferred"


def test_a_batch_still_running_after_defer_after_defers(
    run_dag: Callable[..., Any],
    marks: Callable[[], list[int]],
    dsn: str,
    user: psycopg.Connection,
    inline_triggers: Callable[[], int],
) -> None:
    # Its gated child runs until the trigger runs, however slow the machine: only then does the valve open
    # the gate (after 2 min regardless, so that a task that never defers fails the test, not hangs it).
    with gate(dsn) as g:

        def valve() -> None:
            until = time.monotonic() + 120
            while not inline_triggers() and time.monotonic() < until:
                time.sleep(0.05)
            g.open()

        opener = threading.Thread(target=valve, daemon=True)
        opener.start()
        dr = run_dag("defers_after_waiting", {"gate": g.key})
        opener.join()
    ti = _ti(dr)
    assert (dr.state, ti.state) == ("success", "success")
    assert inline_triggers() == 1
    assert marks() == [1]
    assert statuses(monitor(user, _batch_of(user, "pgbg_defers_after_waiting"))) == ["done", "done"]


def test_defer_after_needs_a_worker_launch() -> None:
    # Before Airflow 3.3 every task starts on a worker: start_from_trigger=True is refused for that.
    refused = "defer_after waits on a worker" if CAN_START_FROM_TRIGGER else "start_from_trigger needs"
    with pytest.raises(ValueError, match=refused):
        PgBackgroundBatchOperator(task_id="t", sql="select 1", deferrable=True, start_from_trigger=True, defer_after=1)
    with pytest.raises(ValueError, match="defer_after must be 0 or more"):
        PgBackgroundBatchOperator(task_id="t", sql="select 1", deferrable=True, defer_after=-1)
    op = PgBackgroundBatchOperator(task_id="t", sql="select 1", deferrable=True, defer_after=timedelta(seconds=3))
    assert op.defer_after == 3.0
    assert not getattr(op, "start_from_trigger", False)


def test_a_failing_child_fails_the_task_with_its_sqlstate(
    run_dag: Callable[..., Any], user: psycopg.Connection, pgbg_conn: str
) -> None:
    dr = run_dag("failing")
    assert _ti(dr).state == "failed"
    parent = _batch_of(user, "pgbg_failing")
    assert statuses(monitor(user, parent)) == ["done", "failed", "failed"]
    # The message the task failed with names the children, their SQLSTATE and error.
    op = PgBackgroundBatchOperator(task_id="t", sql="select 1", postgres_conn_id="pgbg_test")
    op.uuid_parent = parent
    with pytest.raises(AirflowException) as failure:
        op._finish()
    message = str(failure.value)
    assert "2 of 3 statements did not succeed" in message
    assert "[22012] division by zero" in message
    assert "[42P01]" in message


def test_fail_fast_stops_the_rest(run_dag: Callable[..., Any], dsn: str, user: psycopg.Connection) -> None:
    # The rest wait at a gate: only fail_fast's stop can end them (30-s children had to be unfinished when
    # the first failed). Without the stop the task would wait for ever: the gate opens after 2 min, so the
    # test fails on their "done" instead of hanging.
    with gate(dsn) as g:
        valve = threading.Timer(120, g.open)
        valve.start()
        try:
            dr = run_dag("fail_fast", {"gate": g.key})
            assert _ti(dr).state == "failed"
            rows = monitor(user, _batch_of(user, "pgbg_fail_fast"))
            assert statuses(rows)[0] == "failed"
            assert set(statuses(rows)[1:]) == {"stopped"}
        finally:
            valve.cancel()


def test_a_retry_reruns_only_what_failed(
    run_dag: Callable[..., Any], user: psycopg.Connection, scratch: str, marks: Callable[[], list[int]]
) -> None:
    # Fails on its first call, succeeds on the second: the sequence survives the rollback.
    user.execute(f"CREATE SEQUENCE {scratch}.calls")
    user.execute(
        f"""CREATE FUNCTION {scratch}.flaky() RETURNS void LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('{scratch}.calls') = 1 THEN RAISE EXCEPTION 'first call fails'; END IF;
                INSERT INTO {scratch}.marks VALUES (2);
            END $$"""
    )
    dr = run_dag("retried")
    ti = _ti(dr)
    assert (ti.state, ti.try_number) == ("success", 2)
    assert marks() == [1, 2, 3]  # every child's effect exactly once
    parents = user.execute("SELECT count(*) FROM pgbg.batch WHERE origin LIKE 'pgbg_retried/%'").fetchone()[0]
    assert parents == 1  # the second try resumed the first try's batch
    rows = monitor(user, _batch_of(user, "pgbg_retried"))
    assert [(r["status"], r["attempt"]) for r in rows] == [("done", 1), ("done", 2), ("done", 1)]


@pytest.mark.parametrize("dag_id", ["timed_out", "timed_out_waiting"])
def test_execution_timeout_stops_the_batch(
    run_dag: Callable[..., Any], dsn: str, user: psycopg.Connection, inline_triggers: Callable[[], int], dag_id: str
) -> None:
    # The children wait at a gate that never opens: they outlast the 2-s execution_timeout however slow the
    # machine, and only the timeout's stop ends them (30-s children had to). timed_out_waiting's worker
    # is still waiting for the batch (defer_after) when the timeout comes.
    with gate(dsn) as never:
        dr = run_dag(dag_id, {"gate": never.key})
        assert _ti(dr).state == "failed"
        assert inline_triggers() == (0 if dag_id == "timed_out_waiting" else 1)
        parent = _batch_of(user, f"pgbg_{dag_id}")
        poll_until(lambda: set(statuses(monitor(user, parent))) == {"stopped"}, 20)


def test_a_new_try_reconnects_to_a_running_batch(
    run_dag: Callable[..., Any],
    pgbg_conn: str,
    admin: psycopg.Connection,
    user: psycopg.Connection,
    marks: Callable[[], list[int]],
    scratch: str,
) -> None:
    logical_date = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    run_id = f"manual__{logical_date.isoformat()}"
    # The child waits for this lock, so the batch is still running whenever the task starts.
    admin.execute("SELECT pg_advisory_lock(4242)")
    release = threading.Timer(10, lambda: admin.execute("SELECT pg_advisory_unlock(4242)"))
    release.start()
    try:
        # As if an earlier try had launched it and died: same origin, same statements, still running.
        hook = PgBackgroundHook(postgres_conn_id="pgbg_test")
        earlier = hook.launch(
            [f"insert into {scratch}.marks select 7 from pg_advisory_xact_lock(4242)"],
            origin=f"pgbg_reconnecting/{run_id}/batch/-1",
        )
        dr = run_dag("reconnecting", logical_date=logical_date, run_after=logical_date)
    finally:
        release.join()
    assert dr.run_id == run_id
    assert _ti(dr).state == "success"
    assert marks() == [7]
    assert _batch_of(user, "pgbg_reconnecting") == earlier


@pytest.mark.parametrize("dag_id", ["concurrent_blocking", "concurrent_deferrable"])
def test_a_wait_never_holds_back_a_build_that_waits_for_older_snapshots(
    run_dag: Callable[..., Any], user: psycopg.Connection, scratch: str, dag_id: str
) -> None:
    """CREATE INDEX, REINDEX and DETACH PARTITION CONCURRENTLY wait for every older snapshot: the task's
    wait, on a worker or in the triggerer, holds none, so none of them waits for it (a poll that held a
    snapshot for its 8 s would hold each back that long), and the end is taken within one poll."""
    user.execute(f"CREATE TABLE {scratch}.big AS SELECT g AS a FROM generate_series(1, 50000) g")
    user.execute(f"CREATE TABLE {scratch}.parted (a int) PARTITION BY RANGE (a)")
    user.execute(f"CREATE TABLE {scratch}.parted_1 PARTITION OF {scratch}.parted FOR VALUES FROM (0) TO (10)")
    dr = run_dag(dag_id)
    ti = _ti(dr)
    assert (dr.state, ti.state) == ("success", "success")
    parent = _batch_of(user, f"pgbg_{dag_id}")
    rows = monitor(user, parent)
    assert statuses(rows) == ["done"] * 3
    # Held back by the poll's snapshot, a build would take over 8 s. Under pg_cron each child is a job
    # that starts on pg_cron's tick of every second: 2 s here, 3 s when a loaded machine misses a tick.
    assert all(r["duration"].total_seconds() < 6 for r in rows), [r["duration"] for r in rows]
    # When the task took the outcome, not its end_date: Airflow's own wrap-up after that (XComs, the
    # state's commit) took over 5 s on a loaded machine, and says nothing about the wait.
    (taken,) = user.execute("SELECT outcome_taken_at FROM pgbg.batch WHERE uuid_parent = %s", (parent,)).fetchone()
    noticed = (taken - max(r["end_time_exec"] for r in rows)).total_seconds()
    assert noticed < 8 + 4, noticed


def test_sql_from_a_templated_file(
    run_dag: Callable[..., Any], user: psycopg.Connection, scratch: str, marks: Callable[[], list[int]]
) -> None:
    dr = run_dag("from_file")
    assert _ti(dr).state == "success"
    assert len(monitor(user, _batch_of(user, "pgbg_from_file"))) == 3
    assert user.execute(f"SELECT {scratch}.twice(2), {scratch}.thrice(2)").fetchone() == (4, 6)


def test_operator_on_kill_stops_its_batch(pgbg_conn: str, dsn: str, user: psycopg.Connection) -> None:
    # The gate never opens: only on_kill can end the children (30-s ones had to outlast the test).
    with gate(dsn) as never:
        op = PgBackgroundBatchOperator(
            task_id="t",
            sql=f"select {never.sql}; select {never.sql}",
            postgres_conn_id="pgbg_test",
            max_parallel=1,
        )
        op.uuid_parent = op.hook.launch(op.statements(), max_parallel=1)
        poll_until(lambda: "running" in statuses(monitor(user, op.uuid_parent)))
        op.on_kill()
        poll_until(lambda: statuses(monitor(user, op.uuid_parent)) == ["stopped", "stopped"], 20)


def test_summary_stays_small_for_ten_thousand_children(pgbg_conn: str, user: psycopg.Connection) -> None:
    op = PgBackgroundBatchOperator(task_id="t", sql=["select 1"] * 10_000, postgres_conn_id="pgbg_test", max_parallel=4)
    parent = op.hook.launch(op.statements(), max_parallel=4)
    assert op.hook.wait(parent, 120) == "done"
    op.uuid_parent = parent
    summary = op._finish()
    assert summary["children"] == 10_000
    assert summary["counts"]["done"] == 10_000
    assert len(json.dumps(summary)) < 64 * 1024


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sql": ""}, "sql is empty"),
        ({"sql": []}, "non-empty list"),
        ({"sql": 42}, "string or a list"),
        ({"sql": "select 1", "max_parallel": 0}, "max_parallel"),
        ({"sql": "select 1", "delimiter": ""}, "delimiter"),
        ({"sql": "select 1", "poll_interval": 0}, "poll_interval"),
        ({"sql": "select 1", "statement_timeout": -1}, "statement_timeout"),
        ({"sql": "select 1", "statement_retries": -1}, "statement_retries"),
        ({"sql": "select 1", "statement_retry_backoff": 0.5}, "statement_retry_backoff"),
        ({"sql": "select 1", "session_settings": "work_mem=1MB"}, "session_settings must be a dict"),
        ({"sql": "select 1", "session_settings": {"work mem": "1MB"}}, "not the name of a PostgreSQL setting"),
        ({"sql": "select 1", "session_settings": {"work_mem": ["1MB"]}}, "must be text, a number or a boolean"),
    ],
)
def test_bad_parameters_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        PgBackgroundBatchOperator(task_id="t", **kwargs)


def test_other_delimiters_split_in_the_engine(pgbg_conn: str) -> None:
    op = PgBackgroundBatchOperator(
        task_id="t", sql="select 'a,b',select 2,", delimiter=",", postgres_conn_id="pgbg_test"
    )
    assert op.statements() == ["select 'a,b'", "select 2"]


def test_the_provider_is_registered() -> None:
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    assert "airflow-provider-pgbg" in manager.providers
    assert "airflow_pgbg.triggers.batch" in {t.trigger_class_name for t in manager.trigger}


@pytest.mark.parametrize("dag_id", ["settings_deferrable", "settings_blocking"])
def test_every_statement_runs_with_the_tasks_session_settings(
    run_dag: Callable[..., Any], user: psycopg.Connection, scratch: str, dag_id: str
) -> None:
    user.execute(f"CREATE TABLE {scratch}.seen (work_mem text, mwm text, lock_timeout text)")
    dr = run_dag(dag_id, {"lock_timeout": "2500ms"})
    ti = _ti(dr)
    assert ti.state == "success"
    seen = user.execute(f"SELECT * FROM {scratch}.seen").fetchall()
    assert seen == [("12MB", "96MB", "2500ms")] * 2
    parent = _batch_of(user, f"pgbg_{dag_id}")
    assert len(monitor(user, parent)) == 2  # the SET became a setting, not a statement
    settings = ti.xcom_pull(task_ids="batch")["settings"]
    assert {k: settings[k] for k in ("work_mem", "maintenance_work_mem", "lock_timeout")} == {
        "work_mem": "12MB",
        "maintenance_work_mem": "96MB",
        "lock_timeout": "2500ms",
    }


def test_a_set_in_the_middle_of_a_batch_fails_the_task_with_nothing_launched(
    run_dag: Callable[..., Any], user: psycopg.Connection, scratch: str
) -> None:
    user.execute(f"CREATE TABLE {scratch}.seen (work_mem text, mwm text, lock_timeout text)")
    dr = run_dag("settings_refused")
    assert _ti(dr).state == "failed"
    assert (
        user.execute("SELECT count(*) FROM pgbg.batch WHERE origin LIKE 'pgbg_settings_refused/%'").fetchone()[0] == 0
    )
