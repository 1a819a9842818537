"""PgBackgroundBatchTrigger on a real event loop against the real database."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import time

import psycopg
from airflow.triggers.base import TaskSuccessEvent

from airflow_pgbg.compat import CAN_START_FROM_TRIGGER
from airflow_pgbg.identity import XCOM_BATCH_KEY
from airflow_pgbg.triggers.batch import PgBackgroundBatchTrigger
from tests.helpers import ends_task_in_failure, launch, monitor, statuses, wait


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


def test_user_kill_stops_the_batch(pgbg_conn: str, user: psycopg.Connection) -> None:
    parent = launch(user, ["select pg_sleep(30)"] * 2, max_parallel=1)
    asyncio.run(_trigger(parent).on_kill())
    assert wait(user, parent, "20s") == "stopped"


def test_triggerer_shutdown_leaves_the_batch_running(pgbg_conn: str, user: psycopg.Connection) -> None:
    parent = launch(user, ["select pg_sleep(1.5)"])

    async def run_then_cancel():
        trigger = _trigger(parent)
        task = asyncio.create_task(anext(trigger.run()))
        await asyncio.sleep(0.3)
        task.cancel()  # what a triggerer restart or shutdown does
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await trigger.cleanup()

    asyncio.run(run_then_cancel())
    assert not_stopped(user, parent)
    assert wait(user, parent) == "done"


def test_a_cancellation_reaches_the_triggerer_as_sent(pgbg_conn: str, user: psycopg.Connection) -> None:
    # Airflow calls on_kill() only when the CancelledError carries its "user action" message.
    parent = launch(user, ["select pg_sleep(3)"])

    async def cancel_mid_poll() -> tuple:
        task = asyncio.create_task(anext(_trigger(parent, poll_interval=2).run()))
        await asyncio.sleep(0.5)  # inside a poll that waits in the database
        task.cancel("user-action")
        try:
            await task
        except asyncio.CancelledError as exc:
            return exc.args
        return ()

    assert asyncio.run(cancel_mid_poll()) == ("user-action",)
    assert not_stopped(user, parent)


def test_polls_do_not_block_the_event_loop(pgbg_conn: str, admin: psycopg.Connection, user: psycopg.Connection) -> None:
    parent = launch(user, ["select pg_sleep(3)"])
    lags: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        while not stop.is_set():
            before = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - before - 0.01)

    async def main() -> float:
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        trigger = _trigger(parent)
        poll = asyncio.create_task(anext(trigger.run()))
        await asyncio.sleep(0.3)
        # Hold the engine's batch table for a second: every poll in that second waits in the database.
        with admin.transaction():
            admin.execute("LOCK TABLE pgbg.batch IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            await asyncio.sleep(1.0)
        blocked_for = time.monotonic() - started
        poll.cancel()
        stop.set()
        await tick
        return blocked_for

    assert asyncio.run(main()) >= 1.0
    # A poll blocking the loop would show one lag of about a second; the loop kept ticking.
    assert len(lags) > 50
    assert max(lags) < 0.25, f"event loop stalled {max(lags):.3f} s"
