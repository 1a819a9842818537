"""Small wrappers over the engine's SQL API, as a psql user would call it."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql
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


class Gate:
    """An advisory lock that a test holds on a session of its own, which gated children wait for inside
    their statement (``select {gate.sql}``, ``... from {gate.sql}``, ``PERFORM {gate.sql}``): they run
    until the test lets them go, or until a stop, kill or restart ends them, however slow the machine.

    The key is drawn per gate, so waiters are counted without telling the runner, its own worker or a
    pg_cron job apart. Never give gated children a lock_timeout of their own; in a burst (1-ms
    lock_timeout) a gated child rolls back and runs next on its own. A server restart ends the holding
    session, and so lets the children of a rerun through.
    """

    def __init__(self, conn: psycopg.Connection, key: int | None = None) -> None:
        self.key = key or secrets.randbelow(2**31 - 1) + 1
        self.conn = conn
        # A key of one bigint below 2^31: classid 0, objid the key, objsubid 1 (the engine's slots and
        # watch locks are two-int keys, objsubid 2).
        self.sql = f"pg_advisory_xact_lock_shared({self.key})"

    def waiting(self) -> int:
        """How many backends wait for the gate now."""
        return self.conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 AND objid = %s "
            "AND objsubid = 1 AND NOT granted",
            (self.key,),
        ).fetchone()[0]

    def wait_for(self, n: int, timeout: float = 60.0) -> int:
        """Until at least ``n`` backends wait for the gate; how many do."""
        return poll_until(lambda: (w := self.waiting()) >= n and w, timeout, what=f"{n} children at the gate")

    def open(self) -> None:
        """Lets every gated child go, and those to come."""
        self.conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))


@contextlib.contextmanager
def gate(dsn: str, key: int | None = None) -> Iterator[Gate]:
    """A closed gate (see Gate) on the server of ``dsn``, held by a session of its own until the block
    ends (it opens then, if the test did not open it). ``key``: a fixed one, for children written before
    the test runs (a deployment's DAGs)."""
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        g = Gate(conn, key)
        conn.execute("SELECT pg_advisory_lock(%s)", (g.key,))
        yield g
    finally:
        with contextlib.suppress(psycopg.Error):
            conn.close()  # after a restart the session is gone already


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


def retire_role(conn: psycopg.Connection, name: str) -> None:
    """Drops a test's role and what it owns, as a DBA would: its processes go, its batches, and under
    pg_cron its jobs, for a job whose role is gone stops pg_cron's scheduler for the whole server
    (citusdata/pg_cron#399). A runner job of the role that is still ending (a terminate only signals it)
    can park itself in a new job after the role's jobs were deleted: so they go again until no job
    process of the role is left, its batches gone, so that nothing schedules work for it any more."""
    cron = conn.execute("SELECT to_regclass('cron.job') IS NOT NULL").fetchone()[0]
    deadline = time.monotonic() + 60
    while True:
        conn.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = %s", (name,))
        conn.execute("DELETE FROM pgbg.batch WHERE role_name = %s", (name,))
        if not cron:
            break
        conn.execute("DELETE FROM cron.job WHERE username = %s", (name,))
        jobs = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND backend_type = 'pg_cron'", (name,)
        ).fetchone()[0]
        if not jobs:
            break
        assert time.monotonic() < deadline, f"{jobs} pg_cron jobs of role {name} still running after 60 s"
        time.sleep(0.1)
    with conn.transaction():
        if cron:
            conn.execute("DELETE FROM cron.job WHERE username = %s", (name,))
        role = sql.Identifier(name).as_string(conn)
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")
