"""Small wrappers over the engine's SQL API, as a psql user would call it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb


def launch(
    conn: psycopg.Connection,
    statements: Sequence[str],
    *,
    monitor: bool = False,
    max_parallel: int | None = None,
    label: str | None = None,
    statement_timeout: str | None = None,
    settings: dict[str, Any] | None = None,
) -> str:
    row = conn.execute(
        "SELECT pgbg.pg_background_launch_num(%s::text[], p_monitor => %s, p_max_parallel => %s, p_label => %s,"
        " p_statement_timeout => %s::interval, p_settings => %s)",
        (list(statements), monitor, max_parallel, label, statement_timeout, Jsonb(settings) if settings else None),
    ).fetchone()
    return str(row[0])


def wait(conn: psycopg.Connection, parent: str, timeout: str = "60s") -> str | None:
    return conn.execute("SELECT pgbg.pg_background_wait(%s, %s::interval)", (parent, timeout)).fetchone()[0]


def monitor(conn: psycopg.Connection, parent: str | None = None, verbose: bool = True) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM pgbg.pg_background_monitor(%s, %s)", (parent, verbose)).fetchall()


def stop(conn: psycopg.Connection, uuid: str) -> int:
    return conn.execute("SELECT pgbg.pg_background_stop(%s)", (uuid,)).fetchone()[0]


def poll_until(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02, what: str = "condition"
) -> Any:
    """The first truthy value of ``predicate()``; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def statuses(rows: list[dict[str, Any]]) -> list[str]:
    return [r["status"] for r in rows]


def ends_task_in_failure(event: Any) -> bool:
    """A trigger event that fails its task: TaskFailedEvent on Airflow 3.3, where it is retried; on 3.1
    and 3.2 an event that resumes the task on a worker, which raises (so that retries apply)."""
    from airflow.triggers.base import TaskFailedEvent

    from airflow_pgbg.compat import TASK_FAILED_EVENT_RETRIES

    if TASK_FAILED_EVENT_RETRIES:
        return isinstance(event, TaskFailedEvent)
    return isinstance(event.payload, dict) and event.payload.get("status") in ("error", "timeout")
