"""Many triggers on one event loop, and outages, against a stock-sized server (max_connections 100).

The server is an instance of scripts/db.sh of its own (tests.servers.FLEET), which these tests cut
off, restart and stop; what a triggerer process does is run triggers on one asyncio loop, as here.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from airflow.triggers.base import TaskSuccessEvent
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from airflow_pgbg.hooks.install import install_engine_dsn
from airflow_pgbg.hooks.watcher import WATCHER_APPLICATION_NAME
from airflow_pgbg.triggers.batch import PgBackgroundBatchTrigger
from tests.helpers import Gate, ends_task_in_failure, gate, launch, monitor, poll_until, retire_role, statuses, wait
from tests.servers import FLEET, local_servers_or_skip

CONN_ID = "pgbg_fleet"


@pytest.fixture(scope="module")
def fleet(airflow_db: Any) -> Iterator[str]:
    """A role on the fleet server, reachable as the Airflow connection ``pgbg_fleet``; its DSN."""
    local_servers_or_skip()
    admin_dsn = FLEET.start()
    install_engine_dsn(admin_dsn)
    name, password = f"pgbg_fleet_{secrets.token_hex(3)}", secrets.token_hex(8)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}' IN ROLE pgbg_user")
        conn.execute(f"GRANT CREATE ON SCHEMA public TO {name}")
    p = conninfo_to_dict(admin_dsn)
    os.environ["AIRFLOW_CONN_PGBG_FLEET"] = (
        f"postgresql://{name}:{quote(password, safe='')}@{p['host']}:{p['port']}/{p.get('dbname', 'postgres')}"
    )
    yield make_conninfo(admin_dsn, user=name, password=password)
    os.environ.pop("AIRFLOW_CONN_PGBG_FLEET", None)
    FLEET.start()  # whatever a test left it in
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        retire_role(conn, name)


@pytest.fixture
def fleet_user(fleet: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(fleet, autocommit=True) as conn:
        yield conn


def _trigger(parent: str, **kwargs: Any) -> PgBackgroundBatchTrigger:
    return PgBackgroundBatchTrigger(parent, CONN_ID, poll_interval=kwargs.pop("poll_interval", 1.0), **kwargs)


async def _first_event(trigger: PgBackgroundBatchTrigger) -> Any:
    async for event in trigger.run():
        return event
    return None


class ConnectionSampler:
    """Peak number of this process's watcher connections on the server, sampled every 20 ms."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                n = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s",
                    (WATCHER_APPLICATION_NAME + "%",),
                ).fetchone()[0]
                self.peak = max(self.peak, n)
                time.sleep(0.02)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _admin_dsn() -> str:
    return FLEET.start()


def _gated_until_the_server_goes(conn: psycopg.Connection, g: Gate, statement: str) -> str:
    """``statement`` (reading the gate's row as ``g``) for a child that waits at the gate and, let through
    while the server it started on still runs, sleeps until its runner goes. A stop or restart of the
    server ends the gate's session, maybe before the runners: a child must not end in that moment. The
    gate's row comes from a MATERIALIZED CTE, so the filter that sleeps runs after the gate (a filter on a
    plain subquery ran first). The child's rerun on the restarted server does not sleep."""
    started = conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
    sleep = f"pg_sleep(case when pg_postmaster_start_time() = '{started.isoformat()}' then 600 else 0 end)"
    return f"with g as materialized (select {g.sql}) {statement} where {sleep} is not null"


def test_three_hundred_triggers_share_a_few_connections(fleet: str, fleet_user: psycopg.Connection) -> None:
    parents = [launch(fleet_user, ["select pg_sleep(0.05)", "select 1"], max_parallel=2) for _ in range(300)]

    async def all_of_them() -> list[Any]:
        return await asyncio.gather(*(_first_event(_trigger(p)) for p in parents))

    with ConnectionSampler(_admin_dsn()) as sampler:
        events = asyncio.run(all_of_them())
    assert all(isinstance(e, TaskSuccessEvent) for e in events), [type(e).__name__ for e in events]
    assert {e.xcoms["return_value"]["status"] for e in events} == {"done"}
    # One query and one listening connection for the whole process, against 300 before.
    assert 1 <= sampler.peak <= 3, sampler.peak


def _watcher_backends() -> int:
    """The watcher connections on the server (this process's: the fleet server serves no other triggerer)."""
    with psycopg.connect(_admin_dsn(), autocommit=True) as admin:
        return admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s", (WATCHER_APPLICATION_NAME + "%",)
        ).fetchone()[0]


async def _watching(event: asyncio.Future[Any]) -> None:
    """Until the trigger's watcher has both its connections open (or its trigger ended: the test fails then)."""
    await asyncio.to_thread(
        poll_until, lambda: event.done() or _watcher_backends() == 2, 60, 0.05, "the watcher's two connections"
    )
    assert not event.done(), event.result()


def test_a_cut_connection_is_reconnected(fleet: str, fleet_user: psycopg.Connection) -> None:
    with gate(_admin_dsn()) as g:
        parent = launch(fleet_user, [f"select {g.sql}"] * 3, max_parallel=1)

        async def cut_mid_batch() -> Any:
            event = asyncio.ensure_future(_first_event(_trigger(parent)))
            await _watching(event)
            await asyncio.to_thread(g.wait_for, 1)  # the batch runs until after the cut
            with psycopg.connect(_admin_dsn(), autocommit=True) as admin:
                cut = admin.execute(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name LIKE %s",
                    (WATCHER_APPLICATION_NAME + "%",),
                ).fetchone()[0]
            assert cut == 2
            await asyncio.to_thread(g.open)
            return await event

        assert isinstance(asyncio.run(cut_mid_batch()), TaskSuccessEvent)


def test_a_server_restart_mid_batch_is_waited_out(fleet: str, fleet_user: psycopg.Connection) -> None:
    fleet_user.execute("CREATE TABLE IF NOT EXISTS restart_marks (n int)")
    fleet_user.execute("TRUNCATE restart_marks")
    # The gate's session ends with the restart, so the reruns go through.
    with gate(_admin_dsn()) as g:
        children = [
            _gated_until_the_server_goes(fleet_user, g, f"insert into restart_marks select {i} from g")
            for i in range(4)
        ]
        # Safe to run again (the insert and the wait commit together), so lost children are retried.
        parent = str(
            fleet_user.execute(
                "SELECT pgbg.pg_background_launch_num(%s::text[], p_monitor => false, p_max_parallel => 2, "
                "p_retries => 2, p_retry_delay => '0.2 s', p_retry_lost => true)",
                (children,),
            ).fetchone()[0]
        )

        async def restart_mid_batch() -> Any:
            event = asyncio.ensure_future(_first_event(_trigger(parent, reconnect_timeout=60)))
            await _watching(event)
            await asyncio.to_thread(g.wait_for, 2)  # exactly two children run when the server goes
            await asyncio.to_thread(FLEET.restart)
            return await event

        event = asyncio.run(restart_mid_batch())
    assert isinstance(event, TaskSuccessEvent), event
    with psycopg.connect(fleet, autocommit=True) as conn:
        rows = monitor(conn, parent)
        assert statuses(rows) == ["done"] * 4
        assert sorted(r[0] for r in conn.execute("SELECT n FROM restart_marks").fetchall()) == [0, 1, 2, 3]
        # The two children running at the restart rolled back with their runners and ran again.
        assert sorted(r["attempt"] for r in rows) == [1, 1, 2, 2]
        assert [e["status"] for r in rows for e in (r["errors"] or [])] == ["interrupted", "interrupted"]


def test_a_kill_during_an_outage_reaches_the_batch(fleet: str, fleet_user: psycopg.Connection) -> None:
    # The gate's session ends with the server: nothing opens it before.
    with gate(_admin_dsn()) as g:
        parent = launch(
            fleet_user, [_gated_until_the_server_goes(fleet_user, g, "select 1 from g")] * 5, max_parallel=1
        )
        g.wait_for(1)  # child 1 runs when the server goes down
        trigger = _trigger(parent, claim=None, reconnect_timeout=60)

        async def kill_while_down() -> int:
            await asyncio.to_thread(FLEET.stop)
            kill = asyncio.ensure_future(trigger._stop_batch("a user marked the task"))
            await asyncio.sleep(2)
            assert not kill.done()  # still retrying
            await asyncio.to_thread(FLEET.start)
            return await kill

        assert asyncio.run(kill_while_down()) >= 4
    with psycopg.connect(fleet, autocommit=True) as conn:
        assert wait(conn, parent, "30s") in ("lost", "stopped")
        rows = monitor(conn, parent)
        # The child running when the server went down was lost with it (its runner recorded so while
        # shutting down); the queued ones never started once the server was back.
        assert statuses(rows)[0] in ("lost", "stopped")
        assert statuses(rows)[1:] == ["stopped"] * 4
        assert all(r["start_time_exec"] is None for r in rows[1:])


def test_an_outage_longer_than_reconnect_timeout_fails_clearly(
    fleet: str, fleet_user: psycopg.Connection, capfd: pytest.CaptureFixture[str]
) -> None:
    async def stay_down(parent: str) -> Any:
        event = asyncio.ensure_future(_first_event(_trigger(parent, reconnect_timeout=2)))
        await _watching(event)
        started = time.monotonic()  # the outage begins after this
        await asyncio.to_thread(FLEET.stop)
        result = await event
        return result, time.monotonic() - started

    try:
        # The batch runs until the server goes (its gate with it): it cannot end before the outage.
        with gate(_admin_dsn()) as g:
            parent = launch(fleet_user, [f"select {g.sql}"] * 3, max_parallel=1)
            g.wait_for(1)
            event, waited = asyncio.run(stay_down(parent))
    finally:
        FLEET.start()
    log = capfd.readouterr()
    assert ends_task_in_failure(event)
    assert 2.0 <= waited < 30  # not before the reconnect_timeout has run out, and not long after
    # The task's log (Airflow's structured logging writes it to the process output here) names the outage.
    assert "unreachable for 2 s (reconnect_timeout)" in log.out + log.err
    assert "Connection refused" in log.out + log.err


def test_a_trigger_serialized_by_0_1_0_runs(fleet: str, fleet_user: psycopg.Connection) -> None:
    parent = launch(fleet_user, ["select 1"])
    # What PgBackgroundBatchTrigger.serialize() of airflow-provider-pgbg 0.1.0 stored.
    kwargs_0_1_0 = {
        "uuid_parent": parent,
        "postgres_conn_id": CONN_ID,
        "database": None,
        "engine_schema": "pgbg",
        "poll_interval": 5.0,
        "deadline": None,
        "claim": "try 1",
    }
    event = asyncio.run(_first_event(PgBackgroundBatchTrigger(**kwargs_0_1_0)))
    assert isinstance(event, TaskSuccessEvent)
    assert event.xcoms["return_value"]["uuid_parent"] == parent
