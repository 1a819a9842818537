"""The hook, the trigger and the fleet watcher through PgBouncer (scripts/pgbouncer.sh), in front of the
fleet server (tests.servers.FLEET), in transaction mode and in session mode.

In transaction mode a client has no server session: LISTEN and session advisory locks stay on server
connections the client no longer holds. These tests check that nothing the package relies on is lost
there: every end of batch arrives (by polling), a dead waiter stops looking alive, stops reach the
batch, and an outage of the pooler or of the server behind it is waited out.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from airflow.triggers.base import TaskSuccessEvent
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from airflow_pgbg.hooks.install import install_engine_dsn
from airflow_pgbg.hooks.pgbg import PgBackgroundHook
from airflow_pgbg.hooks.pooler import heartbeat_ttl
from airflow_pgbg.hooks.watcher import BatchWatcher
from airflow_pgbg.triggers.batch import PgBackgroundBatchTrigger
from tests.helpers import gate, launch, monitor, poll_until, retire_role, statuses
from tests.servers import FLEET, FLEET_SESSION, FLEET_TX, local_servers_or_skip

TX, SESSION, SESSION_DECLARED = "pgbg_pool_tx", "pgbg_pool_session", "pgbg_pool_session_declared"


def _uri(dsn: str, role: str, password: str, port: int, **extra: str) -> str:
    p = conninfo_to_dict(dsn)
    query = "&".join(f"{k}={v}" for k, v in extra.items())
    return f"postgresql://{role}:{quote(password, safe='')}@{p['host']}:{port}/{p.get('dbname', 'postgres')}" + (
        f"?{query}" if query else ""
    )


@pytest.fixture(scope="module")
def pooled(airflow_db: Any) -> Iterator[dict[str, str]]:
    """A role on the fleet server, reachable as Airflow connections through PgBouncer in transaction mode
    (``pgbg_pool_tx``) and in session mode (detected: ``pgbg_pool_session``; declared with the extra
    ``pgbg_pool_mode``: ``pgbg_pool_session_declared``). Its DSNs: direct, and through each pooler."""
    local_servers_or_skip()
    admin_dsn = FLEET.start()
    install_engine_dsn(admin_dsn)
    FLEET_TX.start()
    FLEET_SESSION.start()
    name, password = f"pgbg_pool_{secrets.token_hex(3)}", secrets.token_hex(8)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}' IN ROLE pgbg_user")
        conn.execute(f"GRANT CREATE ON SCHEMA public TO {name}")
    os.environ["AIRFLOW_CONN_PGBG_POOL_TX"] = _uri(admin_dsn, name, password, FLEET_TX.port)
    os.environ["AIRFLOW_CONN_PGBG_POOL_SESSION"] = _uri(admin_dsn, name, password, FLEET_SESSION.port)
    os.environ["AIRFLOW_CONN_PGBG_POOL_SESSION_DECLARED"] = _uri(
        admin_dsn, name, password, FLEET_SESSION.port, pgbg_pool_mode="session"
    )
    yield {
        "admin": admin_dsn,
        "role": name,
        "direct": make_conninfo(admin_dsn, user=name, password=password),
        "tx": make_conninfo(admin_dsn, user=name, password=password, port=FLEET_TX.port),
        "session": make_conninfo(admin_dsn, user=name, password=password, port=FLEET_SESSION.port),
    }
    for conn_id in (TX, SESSION, SESSION_DECLARED):
        os.environ.pop(f"AIRFLOW_CONN_{conn_id.upper()}", None)
    FLEET.start()
    FLEET_TX.start()
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        retire_role(conn, name)
        conn.execute("DELETE FROM pgbg.waiter WHERE role_name = %s", (name,))


@pytest.fixture
def user(pooled: dict[str, str]) -> Iterator[psycopg.Connection]:
    """The role's own direct connection, to launch and inspect batches."""
    with psycopg.connect(pooled["direct"], autocommit=True) as conn:
        yield conn


def _trigger(parent: str, conn_id: str = TX, **kwargs: Any) -> PgBackgroundBatchTrigger:
    return PgBackgroundBatchTrigger(parent, conn_id, poll_interval=kwargs.pop("poll_interval", 1.0), **kwargs)


async def _first_event(trigger: PgBackgroundBatchTrigger) -> Any:
    async for event in trigger.run():
        return event
    return None


def _server_connections(admin_dsn: str, role: str) -> int:
    """The role's client connections on the server: here, the pooler's server connections."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND backend_type = 'client backend'", (role,)
        ).fetchone()[0]


async def _until_watched(task: asyncio.Future[Any], admin_dsn: str, parent: str) -> None:
    """Until the trigger (a deferred try 2) watches the batch, or its task ended first, polled from a
    thread so that the event loop runs the trigger meanwhile."""
    await asyncio.to_thread(
        poll_until,
        lambda: task.done() or _watched(admin_dsn, parent, "try 2 deferred"),
        60,
        0.05,
        "the trigger to watch the batch",
    )


def _watch_locks(admin_dsn: str, parent: str) -> int:
    """Watch locks on the batch held by any session (behind a pooler they would outlive their client)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 "
            "AND classid = pgbg._watch_key(%s)::oid",
            (parent,),
        ).fetchone()[0]


def _watched(admin_dsn: str, parent: str, except_claim: str | None = None) -> bool:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        return conn.execute("SELECT pgbg.pg_background_watched(%s, %s)", (parent, except_claim)).fetchone()[0]


def test_three_hundred_triggers_through_transaction_pooling(pooled: dict[str, str], user: psycopg.Connection) -> None:
    """The fleet test of test_fleet.py through PgBouncer in transaction mode: every end arrives, though
    no notification can, and the watcher uses one client connection and a few server connections."""
    # Long enough that most batches still run when their triggers start (the server runs 15 at once).
    parents = [launch(user, ["select pg_sleep(0.3)", "select 1"], max_parallel=2) for _ in range(300)]
    peak = 0
    watchers: list[BatchWatcher] = []

    async def all_of_them() -> list[Any]:
        nonlocal peak
        triggers = [_trigger(p, claim=f"try 1 deferred {i}") for i, p in enumerate(parents)]
        gathered = asyncio.gather(*(_first_event(t) for t in triggers))
        while not gathered.done():
            peak = max(peak, await asyncio.to_thread(_server_connections, pooled["admin"], pooled["role"]))
            watchers[:] = list(BatchWatcher._registry.get(asyncio.get_running_loop(), {}).values())
            await asyncio.wait({gathered}, timeout=0.05)
        return await gathered

    started = time.monotonic()
    assert "running" in statuses(monitor(user, parents[-1])) or "queued" in statuses(monitor(user, parents[-1]))
    # Bounded: a pooler that is not there is an outage the watcher would wait out for ever.
    events = asyncio.run(asyncio.wait_for(all_of_them(), 300))
    elapsed = time.monotonic() - started
    assert all(isinstance(e, TaskSuccessEvent) for e in events), [type(e).__name__ for e in events]
    assert {e.xcoms["return_value"]["status"] for e in events} == {"done"}
    assert len(watchers) == 1
    assert watchers[0].session_less  # the pooler was found without being named
    # The pooler's server connections for the role: what the one client connection of the watcher used.
    assert 1 <= peak <= 2, peak
    print(f"\n[pooler] 300 deferred batches through transaction mode: {elapsed:.1f} s, peak {peak} connections")
    # Nothing of a session was left on the pooler's server connections.
    assert sum(_watch_locks(pooled["admin"], p) for p in parents[:20]) == 0


def test_an_end_arrives_by_polling_behind_transaction_pooling(pooled: dict[str, str], user: psycopg.Connection) -> None:
    """A LISTEN through the pooler would never hear the end; the watcher polls at least every second,
    also when it was started (idle) before the trigger began to wait, as a trigger that launches does."""
    with gate(pooled["admin"]) as g:
        parent = launch(user, [f"select {g.sql}"])

        async def wait_for_end() -> tuple[Any, float]:
            # Polls of its own come 600 s apart: an end noticed sooner came by the session-less polls.
            trigger = _trigger(parent, claim="try 1 deferred", poll_interval=600.0)
            await trigger._call(lambda conn: conn.execute("SELECT 1"))
            await asyncio.sleep(0.5)
            task = asyncio.ensure_future(_first_event(trigger))
            # The batch ends only once the trigger waits for it (its heartbeat says so).
            await _until_watched(task, pooled["admin"], parent)
            assert not task.done()
            await asyncio.to_thread(g.open)
            event = await task
            return event, time.monotonic()

        event, noticed = asyncio.run(wait_for_end())
    assert isinstance(event, TaskSuccessEvent)
    ended = user.execute(
        "SELECT extract(epoch FROM clock_timestamp() - max(end_time_exec)) FROM pgbg.log_background "
        "WHERE uuid_parent = %s",
        (parent,),
    ).fetchone()[0]
    # Noticed by a poll of the session-less watcher (every second), not at the trigger's poll interval.
    assert float(ended) - (time.monotonic() - noticed) < 30, ended


@pytest.mark.parametrize(
    ("conn_id", "session_less"),
    [(TX, True), (SESSION, True), (SESSION_DECLARED, False)],
    ids=["tx", "session", "declared"],
)
def test_each_pool_mode_is_handled(
    pooled: dict[str, str], user: psycopg.Connection, conn_id: str, session_less: bool
) -> None:
    """A pooler of unknown mode is taken for transaction mode; declared session mode listens and locks."""
    seen: dict[str, Any] = {}
    with gate(pooled["admin"]) as g:
        parent = launch(user, [f"select {g.sql}"])
        g.wait_for(1)  # running, not merely queued: the check below is that it still runs

        async def wait() -> Any:
            # Polls of its own come 600 s apart: an end noticed sooner came by listening, or by the
            # session-less watcher's polls of every second.
            trigger = _trigger(parent, conn_id, claim="try 1 deferred", poll_interval=600.0)
            task = asyncio.ensure_future(_first_event(trigger))
            # The child waits at the gate, so the batch is still running however long the trigger takes.
            await _until_watched(task, pooled["admin"], parent)
            seen["watched"] = await asyncio.to_thread(_watched, pooled["admin"], parent, "try 2 deferred")
            seen["locks"] = await asyncio.to_thread(_watch_locks, pooled["admin"], parent)
            seen["session_less"] = trigger._watcher().session_less
            assert await asyncio.to_thread(g.waiting) == 1  # and the batch still runs
            await asyncio.to_thread(g.open)
            seen["opened"] = time.monotonic()
            return await task

        assert isinstance(asyncio.run(wait()), TaskSuccessEvent)
    assert time.monotonic() - seen["opened"] < 60
    assert seen["watched"]
    assert seen["session_less"] is session_less
    assert seen["locks"] == (0 if session_less else 1)


def test_a_dead_waiter_behind_transaction_pooling_stops_looking_alive(
    pooled: dict[str, str], user: psycopg.Connection
) -> None:
    """A triggerer killed while it waits: its heartbeat expires, so a new try may take the batch over;
    a watch lock would have stayed held by the pooler's server connection for as long as that lives."""
    with gate(pooled["admin"]) as never:  # never opens: the batch runs until the stop at the end
        parent = launch(user, [f"select {never.sql}"])
        script = textwrap.dedent(
            f"""
            import asyncio
            from airflow_pgbg.triggers.batch import PgBackgroundBatchTrigger

            async def main():
                trigger = PgBackgroundBatchTrigger({parent!r}, {TX!r}, poll_interval=1.0, claim="try 1 deferred")
                async for _ in trigger.run():
                    pass

            asyncio.run(main())
            """
        )
        proc = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy())
        try:
            poll_until(lambda: _watched(pooled["admin"], parent, "try 2 deferred"), 60, 0.2, "the waiter's heartbeat")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            killed = time.monotonic()
            assert _watch_locks(pooled["admin"], parent) == 0
            # On the server's clock: the last beat came before the kill, so before now, and the waiter looks
            # alive at most a ttl after it (a bound on the wall time from the kill to the poll that saw it
            # dead was one second over the ttl, which a stall of the test could pass).
            with psycopg.connect(pooled["admin"], autocommit=True) as admin:
                within_a_ttl = admin.execute(
                    "SELECT max(w.alive_until) <= clock_timestamp() + make_interval(secs => %s) "
                    "FROM pgbg.waiter w JOIN pgbg.waiter_watch ww USING (waiter_id) WHERE ww.uuid_parent = %s",
                    (heartbeat_ttl(1.0), parent),
                ).fetchone()[0]
            assert within_a_ttl is True
            poll_until(
                lambda: not _watched(pooled["admin"], parent, "try 2 deferred"),
                heartbeat_ttl(1.0) + 60,
                0.5,
                "the dead waiter's heartbeat to expire",
            )
            gone_after = time.monotonic() - killed
            ttl = heartbeat_ttl(1.0)
            print(f"\n[pooler] a killed waiter stopped looking alive after {gone_after:.1f} s (ttl {ttl} s)")
            # The pooler's server connections are still there: the liveness did not die with them.
            assert _server_connections(pooled["admin"], pooled["role"]) >= 1
        finally:
            if proc.poll() is None:
                proc.kill()
            user.execute("SELECT pgbg.pg_background_stop(%s)", (parent,))


def test_the_worker_hook_heartbeats_and_ends_it_on_close(pooled: dict[str, str], user: psycopg.Connection) -> None:
    """The operator's wait on a worker (deferrable=False): the hook's watch is a heartbeat there."""
    with gate(pooled["admin"]) as never:  # never opens: the batch is not final when polled (a 30-s child was)
        parent = launch(user, [f"select {never.sql}"])
        hook = PgBackgroundHook(postgres_conn_id=TX)
        try:
            hook.watch(parent, "try 1", every=1.0)
            assert hook.session_less
            assert _watched(pooled["admin"], parent, "try 2")
            assert _watch_locks(pooled["admin"], parent) == 0
            state = hook.poll(parent, wait=0.5)
            assert state is not None
            assert not state.is_final
            hook.watch(parent, "try 1", every=1.0)  # not due: no round trip needed, and nothing changes
            assert _watched(pooled["admin"], parent, "try 2")
        finally:
            hook.close()
        assert not _watched(pooled["admin"], parent, "try 2")  # ended at once, not a ttl later
        user.execute("SELECT pgbg.pg_background_stop(%s)", (parent,))


def test_a_stop_through_transaction_pooling_reaches_the_batch(pooled: dict[str, str], user: psycopg.Connection) -> None:
    # The gate never opens: all 4 children are unfinished at the stop, and only the stop ends them (30-s
    # children had to outlast the test).
    with gate(pooled["admin"]) as never:
        parent = launch(user, [f"select {never.sql}"] * 4, max_parallel=2)
        poll_until(lambda: statuses(monitor(user, parent)).count("running") == 2, 20)
        stopped = asyncio.run(_trigger(parent, claim=None)._stop_batch("a user marked the task"))
        assert stopped == 4
        poll_until(lambda: set(statuses(monitor(user, parent))) == {"stopped"}, 20)


@pytest.mark.parametrize("what", ["pooler", "server"])
def test_a_restart_behind_transaction_pooling_is_waited_out(
    pooled: dict[str, str], user: psycopg.Connection, what: str
) -> None:
    user.execute("CREATE TABLE IF NOT EXISTS pool_marks (n int)")
    user.execute("TRUNCATE pool_marks")
    parent = str(
        user.execute(
            "SELECT pgbg.pg_background_launch_num(%s::text[], p_monitor => false, p_max_parallel => 2, "
            "p_retries => 2, p_retry_delay => '0.2 s', p_retry_lost => true)",
            ([f"insert into pool_marks select {i} from pg_sleep(1)" for i in range(4)],),
        ).fetchone()[0]
    )

    async def restart_mid_batch() -> Any:
        event = asyncio.ensure_future(_first_event(_trigger(parent, reconnect_timeout=60)))
        await asyncio.sleep(0.5)
        await asyncio.to_thread(FLEET_TX.restart if what == "pooler" else FLEET.restart)
        return await event

    event = asyncio.run(restart_mid_batch())
    assert isinstance(event, TaskSuccessEvent), event
    with psycopg.connect(pooled["direct"], autocommit=True) as conn:
        assert statuses(monitor(conn, parent)) == ["done"] * 4
        assert sorted(r[0] for r in conn.execute("SELECT n FROM pool_marks").fetchall()) == [0, 1, 2, 3]
