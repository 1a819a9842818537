"""Kill, clear, retry and triggerer restart in a running Airflow (see conftest.Deployment)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil
import psycopg
import pytest

from airflow_pgbg.compat import CAN_START_FROM_TRIGGER
from airflow_pgbg.links.batch import batch_page_path
from tests.e2e.conftest import OPENLINEAGE_EVENTS, Deployment, wait_for
from tests.e2e.dags.e2e_dags import GATE
from tests.helpers import gate
from tests.servers import FLEET, MANAGED, Instance

FINAL = {"done", "failed", "stopped", "lost"}


@dataclass(frozen=True)
class Launcher:
    """Where a scenario's DAGs run their batches: pg_background on the main server, or pg_cron on the
    server like a managed service (DAG ids with the suffix ``_cron``, see e2e_dags.SCENARIOS)."""

    name: str
    suffix: str
    restartable: Instance
    """The server the restart scenario restarts (its DAG's connection points there)."""

    def dag(self, dag_id: str) -> str:
        return dag_id + self.suffix


PG_BACKGROUND = Launcher("pg_background", "", FLEET)
PG_CRON = Launcher("pg_cron", "_cron", MANAGED)
PGBOUNCER_TX = Launcher("pgbouncer_tx", "_tx", FLEET)
"""pg_background on the main server, the DAGs' connection through PgBouncer in transaction mode."""

# Scenarios that also run through PgBouncer in transaction mode (e2e_dags.POOLED_SCENARIOS).
pooled_too = pytest.mark.parametrize(
    "on", [PG_BACKGROUND, PG_CRON, PGBOUNCER_TX], indirect=True, ids=lambda launcher: launcher.name
)


@pytest.fixture(params=[PG_BACKGROUND, PG_CRON], ids=lambda launcher: launcher.name)
def on(request: pytest.FixtureRequest, deployment: Deployment) -> Iterator[Launcher]:
    """Runs a scenario once per launcher; the engine queries of ``deployment`` go to its server."""
    launcher: Launcher = request.param
    if launcher is PG_CRON:
        if deployment.managed_dsn is None:
            pytest.skip("needs the pg_cron server (tests.servers.MANAGED)")
        deployment.engine_dsn = deployment.managed_dsn
    if launcher is PGBOUNCER_TX and deployment.fleet_dsn is None:
        pytest.skip("needs the local servers and PgBouncer (tests.servers.MAIN_TX)")
    try:
        yield launcher
    finally:
        deployment.engine_dsn = None


def _running_batch(d: Deployment, dag_id: str, run_id: str, ti_state: str, running: int, dsn: str | None = None) -> str:
    """Waits until the task is in ``ti_state`` with ``running`` children running and its poller (the
    trigger, or the task on its worker) at work; returns the batch.

    A deferred task killed before the triggerer has picked its trigger up gets no on_kill() from
    Airflow, so the scenarios act once the trigger is seen polling, as a user watching would.
    """

    def ready() -> str | None:
        batches = d.batches(dag_id, run_id, dsn)
        if (
            batches
            and d.ti(dag_id, run_id)["state"] == ti_state
            and d.statuses(batches[-1], dsn).count("running") >= running
            and d.watched(batches[-1], dsn)
        ):
            return batches[-1]
        return None

    return wait_for(ready, 90, f"{dag_id} {ti_state} with {running} running children", 0.3)


def _stopped_within(d: Deployment, parent: str, since: float) -> float:
    wait_for(lambda: "running" not in d.statuses(parent) and d.workers(parent) == 0, 60, "the batch to stop", 0.1)
    return time.monotonic() - since


def _stopped_by_the_mark(d: Deployment, parent: str, marked_at: object, children: int) -> None:
    """The batch ended by a stop after the mark: every child stopped, none started after it, and the
    stop recorded as the mark's (the API server's listener records it, whoever stopped first)."""
    statuses = d.statuses(parent)
    assert statuses == ["stopped"] * children, statuses
    assert all(c["start"] is None or c["start"] < marked_at for c in d.children(parent))  # no queued child started
    wait_for(
        lambda: (
            d.sql("SELECT stop_requested_by FROM pgbg.batch WHERE uuid_parent = %s", parent)[0][0]
            == "airflow: task instance marked failed"
        ),
        30,
        "the mark's stop to be recorded",
    )


@pooled_too
def test_1_success_defers_without_holding_a_worker_slot(deployment: Deployment, on: Launcher, record) -> None:
    d = deployment
    dag_id = on.dag("e2e_success")
    started = time.monotonic()
    with gate(d.engine_dsn or d.admin_dsn, GATE) as g:
        run = d.trigger(dag_id)
        # Its children held at the gate, the batch runs while the task is deferred and its trigger polls.
        parent = _running_batch(d, dag_id, run, "deferred", 3)
        g.wait_for(3)
        pool = d.api.get("/pools/default_pool").json()
        assert pool["running_slots"] == 0, pool
        assert pool["occupied_slots"] == 0, pool
        g.open()
        wait_for(lambda: d.run_state(dag_id, run) == "success", 90, "the run to succeed")
    assert d.statuses(parent) == ["done"] * 6
    assert d.marks(run) == [1, 2, 3, 4, 5, 6]
    record("run wall time", time.monotonic() - started)
    # The console reads the batch over the task's own connection (through the pooler for _tx).
    base, _, query = batch_page_path(dag_id, run, "batch").partition("?")
    page = d.api.get(f"{d.url}{base}.json?{query}")
    assert page.status_code == 200, page.text
    assert page.json()["batch"]["uuid_parent"] == parent


@pooled_too
def test_2_mark_failed_while_deferred_stops_the_batch(deployment: Deployment, on: Launcher, record) -> None:
    d = deployment
    dag_id = on.dag("e2e_mark_failed")
    with gate(d.engine_dsn or d.admin_dsn, GATE) as g:  # never opened: only the stop ends the children
        run = d.trigger(dag_id)
        parent = _running_batch(d, dag_id, run, "deferred", 2)
        g.wait_for(2)
        marked = time.monotonic()
        marked_at = d.sql("SELECT clock_timestamp()")[0][0]
        d.mark(dag_id, run, "failed")
        record("children stopped after mark failed", _stopped_within(d, parent, marked), 30)
        _stopped_by_the_mark(d, parent, marked_at, 8)
        assert g.waiting() == 0  # no child's statement outlived the stop
    time.sleep(1)  # the gate open: a child that had survived the stop would write its mark now
    assert d.workers(parent) == 0
    assert d.marks(run) == []


@pooled_too
def test_3_clear_while_deferred_resumes_only_unfinished_children(deployment: Deployment, on: Launcher, record) -> None:
    d = deployment
    dag_id = on.dag("e2e_clear")
    with gate(d.engine_dsn or d.admin_dsn, GATE) as g:
        run = d.trigger(dag_id)
        # Two children done, two running (held at the gate), two queued.
        parent = wait_for(
            lambda: (
                (b := d.batches(dag_id, run))
                and d.statuses(b[-1]).count("done") >= 2
                and d.statuses(b[-1]).count("running") == 2
                and d.ti(dag_id, run)["state"] == "deferred"
                and b[-1]
            ),
            90,
            "two children done and two running",
            0.2,
        )
        g.wait_for(2)
        before = d.children(parent)
        done_before = [c["seq"] for c in before if c["status"] == "done"]
        running_before = [c["seq"] for c in before if c["status"] == "running"]
        cleared = time.monotonic()
        d.clear(dag_id, run)
        # The first try's trigger is cancelled and stops the running children; the new try, started
        # by Airflow before that cancellation, waits for the old trigger to go before resuming. When the new
        # try has deferred by the time the old trigger is cancelled (Airflow 3.3 does both in one loop), the
        # old one leaves the batch to it, and its takeover cuts the running children short and queues them
        # again. Either way, each of them: its first attempt ended without its statement.
        wait_for(
            lambda: all(
                c["status"] in ("stopped", "queued") or c["attempt"] > 1
                for c in d.children(parent)
                if c["seq"] in running_before
            ),
            60,
            "the running children stopped",
            0.1,
        )
        # Airflow 3.3 calls the old trigger's on_kill(); before, the stop comes with the triggerer's
        # cancellation of that trigger, which has been seen to take up to 9 s after the clear.
        record("children stopped after clear", time.monotonic() - cleared, 30)
        g.open()
        wait_for(lambda: d.run_state(dag_id, run) == "success", 180, "the new try to succeed")
    assert d.ti(dag_id, run)["try_number"] == 2
    assert d.batches(dag_id, run) == [parent]  # the new try resumed the same batch
    assert d.statuses(parent) == ["done"] * 6
    assert d.marks(run) == [1, 2, 3, 4, 5, 6]  # every child's effect exactly once
    children = d.children(parent)
    assert all(children[seq - 1]["attempt"] == 1 for seq in done_before)  # finished ones never rerun
    # Children cut short by the stop ran again (their first attempt rolled back), once.
    assert [children[seq - 1]["attempt"] for seq in running_before] == [2, 2], children


@pooled_too
def test_4_triggerer_killed_and_restarted_leaves_the_batch_running(
    deployment: Deployment, on: Launcher, record
) -> None:
    d = deployment
    dag_id = on.dag("e2e_triggerer_restart")
    run = d.trigger(dag_id)
    parent = _running_batch(d, dag_id, run, "deferred", 2)
    d.kill("triggerer", signal.SIGKILL)
    killed = time.monotonic()
    d.start("triggerer", "triggerer")
    wait_for(lambda: d.run_state(dag_id, run) == "success", 120, "the run to succeed")
    record("success after triggerer SIGKILL", time.monotonic() - killed)
    assert d.statuses(parent) == ["done"] * 4
    assert d.marks(run) == [1, 2, 3, 4]


def test_5_mark_failed_while_running_on_a_worker_stops_the_batch(deployment: Deployment, on: Launcher, record) -> None:
    d = deployment
    dag_id = on.dag("e2e_blocking_mark_failed")
    with gate(d.engine_dsn or d.admin_dsn, GATE) as g:  # never opened: only the stop ends the children
        run = d.trigger(dag_id)
        parent = _running_batch(d, dag_id, run, "running", 2)
        g.wait_for(2)
        marked = time.monotonic()
        marked_at = d.sql("SELECT clock_timestamp()")[0][0]
        d.mark(dag_id, run, "failed")
        record("children stopped after mark failed (on_kill)", _stopped_within(d, parent, marked), 30)
        _stopped_by_the_mark(d, parent, marked_at, 6)
        assert g.waiting() == 0  # no child's statement outlived the stop
    time.sleep(1)  # the gate open: a child that had survived the stop would write its mark now
    assert d.workers(parent) == 0
    assert d.marks(run) == []


def test_6_killed_worker_retry_reconnects_to_the_running_batch(deployment: Deployment, on: Launcher, record) -> None:
    d = deployment
    dag_id = on.dag("e2e_worker_killed")

    def task_process() -> psutil.Process | None:
        # The task's polling connection shows in pg_stat_activity; its client port names the process.
        rows = d.sql(
            "SELECT client_port FROM pg_stat_activity WHERE usename = 'pgbg_e2e' "
            "AND backend_type = 'client backend' AND query LIKE '%%pg_background_poll%%'"
        )
        ports = {r[0] for r in rows}
        for conn in psutil.net_connections("tcp"):
            if conn.laddr and conn.laddr.port in ports and conn.pid:
                return psutil.Process(conn.pid)
        return None

    def claim() -> str:
        return d.sql("SELECT claimed_by FROM pgbg.batch WHERE uuid_parent = %s", parent)[0][0] or ""

    with gate(d.engine_dsn or d.admin_dsn, GATE) as g:
        run = d.trigger(dag_id)
        parent = _running_batch(d, dag_id, run, "running", 2)
        g.wait_for(2)
        proc = wait_for(task_process, 30, "the task's process")
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        # The gate holds the batch until the retry has claimed it: the retry finds it running.
        wait_for(lambda: claim().startswith("try 2"), 150, "the retry to claim the batch", 0.3)
        assert d.statuses(parent).count("running") == 2
        g.open()
        wait_for(lambda: d.run_state(dag_id, run) == "success", 120, "the retry to succeed")
    record("success after worker SIGKILL", time.monotonic() - killed)
    assert d.ti(dag_id, run)["try_number"] == 2
    assert d.batches(dag_id, run) == [parent]  # reconnected, not resubmitted
    assert d.statuses(parent) == ["done"] * 4
    assert [c["attempt"] for c in d.children(parent)] == [1] * 4  # no child ran twice
    assert d.marks(run) == [1, 2, 3, 4]


def _process_of_backend(d: Deployment, where: str) -> tuple[psutil.Process, int] | None:
    """The Airflow process whose engine connection matches ``where`` (SQL on pg_stat_activity), and that
    connection's backend pid: the connection's client port names the process."""
    rows = d.sql(
        "SELECT client_port, pid FROM pg_stat_activity WHERE usename = 'pgbg_e2e' "
        f"AND backend_type = 'client backend' AND {where}"
    )
    backends = dict(rows)
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port in backends and conn.pid:
            return psutil.Process(conn.pid), backends[conn.laddr.port]
    return None


def _kill_before_it_takes_the_outcome(d: Deployment, parent: str, let_go: Callable[[], None] | None = None) -> None:
    """Holds the batch's row while it ends (its gated children let go here), so that the process about
    to take its outcome (what ends a try's wait) blocks right there, then kills that process and its
    session: the outcome stays untaken, as when a worker dies after the batch ended and before the task
    could succeed."""
    with psycopg.connect(d.engine_dsn or d.admin_dsn) as holder:
        holder.execute("SELECT 1 FROM pgbg.batch WHERE uuid_parent = %s FOR UPDATE", (parent,))
        if let_go is not None:
            let_go()
        proc, backend = wait_for(
            lambda: _process_of_backend(d, "wait_event_type = 'Lock' AND query LIKE '%%pg_background_take_outcome%%'"),
            90,
            "the worker to wait to take the outcome",
        )
        assert d.statuses(parent) == ["done"] * len(d.statuses(parent))
        proc.send_signal(signal.SIGKILL)
        d.sql("SELECT pg_terminate_backend(%s)", backend)
        holder.rollback()


def _retry_took_the_outcome(d: Deployment, dag_id: str, run: str, parent: str, children: int) -> None:
    wait_for(lambda: d.run_state(dag_id, run) == "success", 150, "the retry to succeed")
    assert d.ti(dag_id, run)["try_number"] == 2
    assert d.batches(dag_id, run) == [parent]  # nothing launched again
    assert d.statuses(parent) == ["done"] * children
    assert [c["attempt"] for c in d.children(parent)] == [1] * children  # no child ran twice
    assert d.marks(run) == list(range(1, children + 1))  # every statement's effect exactly once
    taken = d.sql("SELECT outcome_taken_by FROM pgbg.batch WHERE uuid_parent = %s", parent)[0][0]
    assert (taken or "").startswith("try 2"), taken


def test_6b_killed_worker_whose_batch_ended_meanwhile_retry_takes_the_outcome(
    deployment: Deployment, on: Launcher
) -> None:
    d = deployment
    dag_id = on.dag("e2e_worker_lost_after_end")
    with gate(d.engine_dsn or d.admin_dsn, GATE) as g:
        run = d.trigger(dag_id)
        parent = _running_batch(d, dag_id, run, "running", 2)
        proc, _ = wait_for(
            lambda: _process_of_backend(d, "query LIKE '%%pg_background_poll%%'"), 30, "the task's process"
        )
        proc.send_signal(signal.SIGKILL)
        g.open()  # the batch ends now, seconds before the retry (its retry_delay) comes
    _retry_took_the_outcome(d, dag_id, run, parent, 2)
    ended, claimed = d.sql("SELECT ended_at, claimed_at FROM pgbg.batches WHERE uuid_parent = %s", parent)[0]
    assert ended < claimed  # the retry found it ended


def test_6c_worker_killed_after_its_batch_ended_retry_takes_the_outcome(deployment: Deployment, on: Launcher) -> None:
    d = deployment
    dag_id = on.dag("e2e_worker_lost_after_end")
    with gate(d.engine_dsn or d.admin_dsn, GATE) as g:
        run = d.trigger(dag_id)
        parent = _running_batch(d, dag_id, run, "running", 2)
        _kill_before_it_takes_the_outcome(d, parent, g.open)
    _retry_took_the_outcome(d, dag_id, run, parent, 2)


def test_6d_resume_worker_killed_retry_takes_the_outcome(deployment: Deployment, on: Launcher) -> None:
    d = deployment
    dag_id = on.dag("e2e_resume_killed")
    with gate(d.engine_dsn or d.admin_dsn, GATE) as g:
        run = d.trigger(dag_id)
        parent = _running_batch(d, dag_id, run, "deferred", 2)
        g.wait_for(2)
        # The trigger resumes the task on a worker (a success callback runs only there), which takes the
        # outcome: killed right before, the retry takes it.
        _kill_before_it_takes_the_outcome(d, parent, g.open)
    _retry_took_the_outcome(d, dag_id, run, parent, 2)


def test_6e_a_clear_after_success_runs_the_batch_again(deployment: Deployment) -> None:
    d = deployment
    dag_id = "e2e_worker_lost_after_end"
    run = d.trigger(dag_id)
    wait_for(lambda: d.run_state(dag_id, run) == "success", 90, "the run to succeed")
    (first,) = d.batches(dag_id, run)
    d.clear(dag_id, run)
    wait_for(lambda: len(d.batches(dag_id, run)) == 2 and d.run_state(dag_id, run) == "success", 90, "the rerun")
    assert d.statuses(d.batches(dag_id, run)[1]) == ["done", "done"]
    assert d.marks(run) == [1, 1, 2, 2]  # a clear of a task that completed runs its statements again
    assert d.batches(dag_id, run)[0] == first


def test_7_database_restart_while_deferred_is_waited_out(deployment: Deployment, on: Launcher, record) -> None:
    d = deployment
    if d.fleet_dsn is None:
        pytest.skip("needs the restartable local servers (tests.servers)")
    # pg_background: the restartable server of its own; pg_cron: the managed-like server, restarted.
    dag_id = on.dag("e2e_db_restart")
    server = d.engine_dsn or d.fleet_dsn
    with psycopg.connect(server, autocommit=True) as conn:  # what the children sleep past the gate for
        conn.execute("DELETE FROM pgbg_e2e.boot")
        conn.execute("INSERT INTO pgbg_e2e.boot SELECT pg_postmaster_start_time()")
    # Never opened: the restart ends the gate's session with the children's, and lets the reruns through.
    with gate(server, GATE) as g:
        run = d.trigger(dag_id)
        parent = wait_for(
            lambda: (
                (b := d.batches(dag_id, run, server))
                and d.statuses(b[-1], server).count("running") == 2
                and d.watched(b[-1], server)
                and b[-1]
            ),
            90,
            "two children running and the trigger watching",
            0.2,
        )
        g.wait_for(2)
        restarted = time.monotonic()
        on.restartable.restart()
    wait_for(lambda: d.run_state(dag_id, run) in ("success", "failed"), 120, "the run to end")
    record("success after a restart of the database", time.monotonic() - restarted)
    # The task ended with the batch's own outcome: its lost children ran again and all succeeded.
    assert d.run_state(dag_id, run) == "success", d.logs()
    assert d.statuses(parent, server) == ["done"] * 4
    assert d.marks(run, server) == [1, 2, 3, 4]
    assert sorted(c["attempt"] for c in d.children(parent, server)) == [1, 1, 2, 2]


def _triggerer_down(d: Deployment) -> None:
    d.kill("triggerer", signal.SIGKILL)


@pooled_too
def test_8_mark_failed_before_the_trigger_runs_stops_the_batch(deployment: Deployment, on: Launcher, record) -> None:
    d = deployment
    dag_id = on.dag("e2e_early_mark")
    _triggerer_down(d)  # nobody can pick the trigger up: a user is faster than the triggerer
    try:
        with gate(d.engine_dsn or d.admin_dsn, GATE) as g:  # never opened: only the stop ends the children
            run = d.trigger(dag_id)
            parent = wait_for(
                lambda: (b := d.batches(dag_id, run)) and d.ti(dag_id, run)["state"] == "deferred" and b[-1],
                90,
                "the task deferred after launching on a worker",
                0.2,
            )
            assert not d.watched(parent)
            g.wait_for(2)
            marked = time.monotonic()
            d.mark(dag_id, run, "failed")
            # Stopped from the API server's listener, with no trigger ever running.
            wait_for(
                lambda: set(d.statuses(parent)) <= {"stopped"} and d.workers(parent) == 0,
                60,
                "the batch to stop",
                0.2,
            )
            record("batch stopped after a mark before pick-up", time.monotonic() - marked)
            assert d.sql("SELECT stop_requested_by FROM pgbg.batch WHERE uuid_parent = %s", parent)[0][0] == (
                "airflow: task instance marked failed"
            )
            assert g.waiting() == 0  # no child's statement outlived the stop
        assert d.statuses(parent) == ["stopped"] * 6
    finally:
        d.start("triggerer", "triggerer")


def test_9_mark_failed_before_a_triggerer_start_launches_nothing(deployment: Deployment) -> None:
    d = deployment
    if not CAN_START_FROM_TRIGGER:
        pytest.skip("tasks start in the triggerer from Airflow 3.3")
    dag_id = "e2e_early_mark_in_triggerer"
    _triggerer_down(d)
    try:
        run = d.trigger(dag_id)
        wait_for(lambda: d.ti(dag_id, run)["state"] == "deferred", 90, "the task deferred without a worker", 0.2)
        d.mark(dag_id, run, "failed")
    finally:
        d.start("triggerer", "triggerer")
    time.sleep(8)  # the restarted triggerer has had time to pick up whatever it would
    assert d.batches(dag_id, run) == []
    assert d.ti(dag_id, run)["state"] == "failed"


def test_10_triggerer_killed_while_launching_launches_once(deployment: Deployment, on: Launcher, record) -> None:
    d = deployment
    dag_id = on.dag("e2e_triggerer_killed_at_launch")
    run = d.trigger(dag_id)
    # SIGKILL as soon as the batch exists: the trigger that launched it dies with its triggerer.
    parent = wait_for(lambda: (b := d.batches(dag_id, run)) and b[-1], 90, "the batch to be launched", 0.05)
    d.kill("triggerer", signal.SIGKILL)
    killed = time.monotonic()
    d.start("triggerer", "triggerer")
    wait_for(lambda: d.run_state(dag_id, run) == "success", 120, "the run to succeed")
    record("success after a triggerer SIGKILL at launch", time.monotonic() - killed)
    assert d.batches(dag_id, run) == [parent]  # the restarted trigger attached, it did not launch again
    assert d.marks(run) == [1, 2, 3, 4]
    assert [c["attempt"] for c in d.children(parent)] == [1] * 4


def test_11_the_example_dags_run_through_the_triggerer(deployment: Deployment) -> None:
    d = deployment
    expected = {
        "example_pgbg_basic": "success",
        "example_pgbg_sql_file": "success",  # a .sql file with {{ params.days }}, rendered in the triggerer
        "example_pgbg_seed_demo": "success",
        "example_pgbg_mapped": "success",
        "example_pgbg_fail_fast": "failed",
    }
    runs = {dag_id: d.trigger(dag_id) for dag_id in expected}
    wait_for(
        lambda: all(d.run_state(dag_id, run) in ("success", "failed") for dag_id, run in runs.items()),
        180,
        "the example runs to end",
        1,
    )
    assert {dag_id: d.run_state(dag_id, run) for dag_id, run in runs.items()} == expected
    for dag_id, run in runs.items():
        assert d.batches(dag_id, run), f"{dag_id} launched no batch"
    if CAN_START_FROM_TRIGGER:
        # Deferrable and not mapped: started and ended in the triggerer, no worker process at all.
        for dag_id in ("example_pgbg_basic", "example_pgbg_sql_file", "example_pgbg_seed_demo"):
            assert d.worker_runs(dag_id) == 0, dag_id
        assert d.worker_runs("example_pgbg_mapped") == 3  # mapped tasks launch on a worker


def test_12_on_managed_postgres_a_role_with_only_pgbg_user_runs_batches_in_jobs_that_park(
    deployment: Deployment,
) -> None:
    d = deployment
    if d.managed_dsn is None:
        pytest.skip("needs the pg_cron server (tests.servers.MANAGED)")
    managed = d.managed_dsn
    assert d.sql("SELECT pgbg._launcher()", dsn=managed)[0][0] == "pg_cron"
    # A login role with only pgbg_user, its children in pg_cron jobs of its own.
    assert d.sql(
        "SELECT rolsuper, array(SELECT b.rolname FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.roleid "
        "WHERE m.member = r.oid) FROM pg_roles r WHERE rolname = 'pgbg_e2e'",
        dsn=managed,
    )[0] == (False, ["pgbg_user"])
    run = d.trigger("e2e_success_cron")
    wait_for(lambda: d.run_state("e2e_success_cron", run) == "success", 120, "the pg_cron run to succeed")
    assert d.marks(run, managed) == [1, 2, 3, 4, 5, 6]
    assert (
        d.sql(
            "SELECT count(*) FROM cron.job WHERE username = 'pgbg_e2e' AND jobname LIKE 'pgbg_runner:%%'", dsn=managed
        )[0][0]
        >= 1
    )
    # The role's jobs park with its work done: nothing keeps running or holds a slot afterwards.
    wait_for(
        lambda: (
            d.sql("SELECT count(*) FROM cron.job WHERE username = 'pgbg_e2e' AND schedule <> '@reboot'", dsn=managed)[
                0
            ][0]
            == 0
        ),
        30,
        "the role's pg_cron jobs to park",
        0.5,
    )


def test_13_success_and_failure_callbacks_run(deployment: Deployment) -> None:
    d = deployment
    ok, failed = d.trigger("e2e_callbacks"), d.trigger("e2e_callbacks_failed")

    def left(kind: str, dag_id: str, run_id: str) -> bool:
        run = run_id.replace(":", "_").replace("+", "_")
        return (d.home / f"{kind}-callback-{dag_id}-{run}").exists()

    wait_for(lambda: d.run_state("e2e_callbacks", ok) == "success", 90, "the run with callbacks to succeed")
    wait_for(lambda: d.run_state("e2e_callbacks_failed", failed) == "failed", 90, "the failing run to fail")
    # A trigger-ended task gets no success callback from Airflow: with one, the task ends on a worker.
    wait_for(lambda: left("success", "e2e_callbacks", ok), 30, "the success callback", 0.5)
    wait_for(lambda: left("failure", "e2e_callbacks_failed", failed), 60, "the failure callback", 0.5)
    assert not left("failure", "e2e_callbacks", ok)
    assert not left("success", "e2e_callbacks_failed", failed)
    assert d.marks(ok) == [1, 2, 3]
    if CAN_START_FROM_TRIGGER:
        # Started in the triggerer; only the end (for the success callback) takes a worker process.
        # (The scheduler logs the executor's event a moment after the task has set its own state.)
        wait_for(lambda: d.worker_runs("e2e_callbacks") >= 1, 30, "the worker run to be logged", 0.5)
        assert d.worker_runs("e2e_callbacks") == 1


def _lineage_events(d: Deployment, job: str) -> list[dict]:
    path = d.home / OPENLINEAGE_EVENTS
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if e.get("job", {}).get("name") == job]


def _tables(datasets: list[dict]) -> set[str]:
    assert all(ds["namespace"].startswith("postgres://") for ds in datasets), datasets
    return {ds["name"].split(".", 1)[1] for ds in datasets}  # database.schema.table -> schema.table


def _ended_in(d: Deployment, dag_id: str, run: str, state: str) -> None:
    """Waits until the run has ended either way, then tells what it ended in and why (a run that once
    stayed unfinished for 90 s in CI left nothing to tell why)."""
    wait_for(lambda: d.run_state(dag_id, run) in ("success", "failed"), 180, f"the run of {dag_id} to end")
    if d.run_state(dag_id, run) != state:
        batches = {p: d.statuses(p) for p in d.batches(dag_id, run)}
        pytest.fail(f"{dag_id}: {d.run_state(dag_id, run)}, task {d.ti(dag_id, run)}, {batches}\n{d.logs()}")


def test_14_openlineage_reports_the_tables_of_a_batch_from_its_worker(deployment: Deployment) -> None:
    pytest.importorskip("airflow.providers.openlineage", reason="needs the openlineage extra")
    d = deployment
    ok, failed = d.trigger("e2e_lineage"), d.trigger("e2e_lineage_failed")
    _ended_in(d, "e2e_lineage", ok, "success")
    _ended_in(d, "e2e_lineage_failed", failed, "failed")
    ended = wait_for(
        lambda: [e for e in _lineage_events(d, "e2e_lineage.batch") if e["eventType"] == "COMPLETE"],
        30,
        "the COMPLETE event",
        0.5,
    )
    events = _lineage_events(d, "e2e_lineage.batch")
    started = [e for e in events if e["eventType"] == "START"]
    assert started, [e["eventType"] for e in events]
    # Read: b, and a (created by the batch's first statement); written: a and c. VACUUM adds nothing.
    for event in (started[0], ended[-1]):
        assert _tables(event["inputs"]) == {"pgbg_e2e.lineage_a", "pgbg_e2e.lineage_b"}, event["inputs"]
        assert _tables(event["outputs"]) == {"pgbg_e2e.lineage_a", "pgbg_e2e.lineage_c"}, event["outputs"]
    columns = {
        ds["name"].rsplit(".", 1)[1]: [f["name"] for f in ds["facets"]["schema"]["fields"]]
        for ds in ended[-1]["inputs"]
    }
    assert columns["lineage_b"] == ["n", "label"]
    batch = ended[-1]["run"]["facets"]["pgbg_batch"]
    assert batch["batchUuid"] == d.batches("e2e_lineage", ok)[-1]
    assert batch["counts"]["done"] == 3
    assert "vacuum pgbg_e2e.lineage_c" in ended[-1]["job"]["facets"]["sql"]["query"]
    # The failure: FAIL with the SQLSTATE of the child that failed.
    fail = wait_for(
        lambda: [e for e in _lineage_events(d, "e2e_lineage_failed.batch") if e["eventType"] == "FAIL"],
        30,
        "the FAIL event",
        0.5,
    )
    assert fail[-1]["run"]["facets"]["pgbg_batch"]["failedSqlstates"] == {"22012": 1}
    assert _tables(fail[-1]["outputs"]) == {"pgbg_e2e.lineage_c"}
    # Reported tasks start and end on a worker (the listener runs only there); nothing else changed:
    # DAGs without lineage still ran without one (scenario 11).
    wait_for(lambda: d.worker_runs("e2e_lineage") >= 2, 30, "the worker runs to be logged", 0.5)
    assert d.worker_runs("e2e_lineage") == 2
