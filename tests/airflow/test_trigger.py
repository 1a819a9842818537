"""PgBackgroundBatchTrigger on a real event loop against the real database."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import threading

import psycopg
from airflow.triggers.base import TaskSuccessEvent

from airflow_pgbg.compat import CAN_START_FROM_TRIGGER
from airflow_pgbg.hooks.watcher import WATCHER_APPLICATION_NAME
from airflow_pgbg.identity import XCOM_BATCH_KEY
from airflow_pgbg.triggers.batch import PgBackgroundBatchTrigger
from tests.helpers import ends_task_in_failure, gate, launch, monitor, poll_until, statuses, wait


def _trigger(parent: str, **kwargs) -> PgBackgroundBatchTrigger:
    return PgBackgroundBatchTrigger(parent, "pgbg_test", poll_interval=kwargs.pop("poll_interval", 0.05), **kwargs)


def test_serialization_round_trip() -> None:
    trigger = PgBackgroundBatchTrigger(
        "6f1c5d0e-0000-4000-8000-000000000000",
        "c",
        database="db",
        engine_schema="s",
        poll_interval=2.5,
        deadline=123.0,
        claim="try 3",
    )
    path, kwargs = trigger.serialize()
    module, _, name = path.rpartition(".")
    again = getattr(importlib.import_module(module), name)(**kwargs)
    assert again.serialize() == (path, kwargs)


def test_a_launching_trigger_serialized_by_release_0_2_still_runs() -> None:
    """A trigger waiting in the triggerer's table across the upgrade comes back with its options."""
    old_kwargs = {
        "uuid_parent": None,
        "postgres_conn_id": "c",
        "database": None,
        "engine_schema": "pgbg",
        "poll_interval": 1.0,
        "deadline": None,
        "claim": None,
        "reconnect_timeout": 900.0,
        "sql": "select 1",
        "delimiter": ";",
        "batch_label": "nightly",
        "max_parallel": 3,
        "fail_fast": True,
        "statement_timeout": 60.0,
        "retries": 2,
        "retry_delay": 0.5,
        "retry_backoff": 3.0,
        "retry_lost": True,
        "execution_timeout": None,
        "max_result_rows": 20,
        "resume_on_success": False,
        "resume_on_failure": False,
    }
    trigger = PgBackgroundBatchTrigger(**old_kwargs)
    assert trigger.options == {
        "max_parallel": 3,
        "fail_fast": True,
        "statement_timeout": 60.0,
        "retries": 2,
        "retry_delay": 0.5,
        "retry_backoff": 3.0,
        "retry_lost": True,
    }
    path, kwargs = trigger.serialize()
    assert kwargs["batch_label"] == "nightly"
    assert kwargs["session_settings"] is None
    again = PgBackgroundBatchTrigger(**kwargs)
    assert again.serialize() == (path, kwargs)


def test_the_trigger_ends_the_task_when_the_batch_ends(pgbg_conn: str, user: psycopg.Connection) -> None:
    ok = launch(user, ["select pg_sleep(0.3)", "select 42 as answer"])
    bad = launch(user, ["select pg_sleep(0.3)", "select 1/0"])

    async def first_event(parent: str):
        async for event in _trigger(parent).run():
            return event

    success = asyncio.run(first_event(ok))
    assert isinstance(success, TaskSuccessEvent)
    summary = success.xcoms["return_value"]
    assert summary["status"] == "done"
    assert summary["counts"]["done"] == 2
    assert summary["rows"][1]["command"] == "SELECT 1"
    assert success.xcoms[XCOM_BATCH_KEY]["uuid_parent"] == ok
    failure = asyncio.run(first_event(bad))
    assert ends_task_in_failure(failure)
    assert "return_value" not in (getattr(failure, "xcoms", None) or {})


def test_a_task_with_a_success_callback_ends_on_a_worker(pgbg_conn: str, user: psycopg.Connection) -> None:
    from airflow.sdk import DAG

    from airflow_pgbg.operators.batch import PgBackgroundBatchOperator

    with DAG("callbacks", schedule=None):
        plain = PgBackgroundBatchOperator(task_id="plain", sql="select 1", deferrable=True)
        called = PgBackgroundBatchOperator(
            task_id="called", sql="select 1", deferrable=True, on_success_callback=lambda context: None
        )
    assert not plain._resume_on_success()
    assert called._resume_on_success()
    if CAN_START_FROM_TRIGGER:
        assert called.start_trigger_args.trigger_kwargs["resume_on_success"] is True
    parent = launch(user, ["select pg_sleep(0.2)", "select 1"])

    async def first_event():
        async for event in _trigger(parent, resume_on_success=True).run():
            return event

    # Resumed on a worker (execute_complete), where Airflow runs success callbacks; a failure still
    # ends the task from the triggerer, whose failure callbacks Airflow runs.
    event = asyncio.run(first_event())
    assert not isinstance(event, TaskSuccessEvent)
    assert event.payload == {"uuid_parent": parent, "status": "success", "claim": None}


def not_stopped(user: psycopg.Connection, parent: str) -> bool:
    # Still queued on pg_cron, whose first start takes about a second.
    return statuses(monitor(user, parent)) in (["running"], ["queued"])


def test_user_kill_stops_the_batch(pgbg_conn: str, dsn: str, user: psycopg.Connection) -> None:
    # The gate never opens: only on_kill can end the batch (30-s children had to outlast the test).
    with gate(dsn) as never:
        parent = launch(user, [f"select {never.sql}"] * 2, max_parallel=1)
        asyncio.run(_trigger(parent).on_kill())
        assert wait(user, parent, "20s") == "stopped"


def _watcher_backends(admin: psycopg.Connection, role: str, condition: str = "true") -> int:
    """The role's watcher connections (the query one, not the listening one) that meet ``condition``."""
    return admin.execute(
        f"SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND application_name = %s AND {condition}",
        (role, WATCHER_APPLICATION_NAME),
    ).fetchone()[0]


async def _waiting_on_the_batch(task: asyncio.Task, admin: psycopg.Connection, role: str) -> None:
    """Until the trigger's watcher has connected to wait on the batch (or the trigger ended: the test fails)."""
    await asyncio.to_thread(
        poll_until,
        lambda: task.done() or _watcher_backends(admin, role),
        30,
        0.02,
        "the trigger to wait on the batch",
    )
    assert not task.done()


def test_triggerer_shutdown_leaves_the_batch_running(
    pgbg_conn: str, dsn: str, admin: psycopg.Connection, user: psycopg.Connection
) -> None:
    with gate(dsn) as g:
        parent = launch(user, [f"select {g.sql}"])

        async def run_then_cancel():
            trigger = _trigger(parent)
            task = asyncio.create_task(anext(trigger.run()))
            await _waiting_on_the_batch(task, admin, user.info.user)
            task.cancel()  # what a triggerer restart or shutdown does
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await trigger.cleanup()

        asyncio.run(run_then_cancel())
        assert not_stopped(user, parent)
        g.wait_for(1)  # its child runs on, waiting at the gate
        assert statuses(monitor(user, parent)) == ["running"]
        g.open()
    assert wait(user, parent) == "done"


def test_a_cancellation_reaches_the_triggerer_as_sent(
    pgbg_conn: str, dsn: str, admin: psycopg.Connection, user: psycopg.Connection
) -> None:
    # Airflow calls on_kill() only when the CancelledError carries its "user action" message.
    with gate(dsn) as g:
        parent = launch(user, [f"select {g.sql}"])

        async def cancel_mid_wait() -> tuple:
            task = asyncio.create_task(anext(_trigger(parent, poll_interval=2).run()))
            await _waiting_on_the_batch(task, admin, user.info.user)
            task.cancel("user-action")
            try:
                await task
            except asyncio.CancelledError as exc:
                return exc.args
            return ()

        assert asyncio.run(cancel_mid_wait()) == ("user-action",)
        assert not_stopped(user, parent)


def test_polls_do_not_block_the_event_loop(
    pgbg_conn: str, dsn: str, admin: psycopg.Connection, user: psycopg.Connection
) -> None:
    role = user.info.user
    ticks = 0
    wanted = float("inf")
    locked, release = threading.Event(), threading.Event()

    async def ticker(stop: asyncio.Event, reached: asyncio.Event) -> None:
        nonlocal ticks
        while not stop.is_set():
            await asyncio.sleep(0.01)
            ticks += 1
            if ticks >= wanted:
                reached.set()

    def hold_the_batch_table() -> None:
        # Every poll waits in the database while this holds. Let go by the loop: a loop that a poll
        # blocked would never get there, and the test fails once this gives up.
        with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
            conn.execute("LOCK TABLE pgbg.batch IN ACCESS EXCLUSIVE MODE")
            locked.set()
            release.wait(60)

    def poll_waits() -> bool:
        return bool(_watcher_backends(admin, role, "wait_event_type = 'Lock'"))

    async def main() -> bool:
        nonlocal wanted
        stop, reached = asyncio.Event(), asyncio.Event()
        tick = asyncio.create_task(ticker(stop, reached))
        poll = asyncio.create_task(anext(_trigger(parent).run()))
        await _waiting_on_the_batch(poll, admin, role)
        holder = threading.Thread(target=hold_the_batch_table, daemon=True)
        holder.start()
        try:
            assert await asyncio.to_thread(locked.wait, 30)
            await asyncio.to_thread(poll_until, poll_waits, 30, 0.01, "the trigger's poll to wait for the lock")
            wanted = ticks + 20
            await reached.wait()  # the loop ticks on while the poll waits
            still = await asyncio.to_thread(poll_waits)
        finally:
            release.set()
            await asyncio.to_thread(holder.join)
        poll.cancel()
        stop.set()
        await tick
        return still

    with gate(dsn) as g:  # the batch runs as long as the test looks
        parent = launch(user, [f"select {g.sql}"])
        assert asyncio.run(main()), "the trigger's poll stopped waiting before the loop had ticked 20 times"
