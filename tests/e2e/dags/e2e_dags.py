"""DAGs the end-to-end suite drives through the REST API. Each child inserts its number once."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG

from airflow_pgbg.operators.batch import PgBackgroundBatchOperator


def _batch_dag(dag_id: str, sql: list[str], conn: str = "pgbg_e2e", **kwargs) -> DAG:
    with DAG(dag_id, schedule=None, start_date=datetime(2025, 1, 1), catchup=False) as dag:
        PgBackgroundBatchOperator(task_id="batch", postgres_conn_id=conn, sql=sql, **kwargs)
    return dag


# The advisory lock that gated children wait for (shared) until a test lets them go: a test holds it
# (tests.helpers.gate) so that they run as long as it needs them to, however slow the machine. One key
# for every gated DAG: the scenarios run one at a time, and a gate opens when its test ends; a gated DAG
# run while no test holds the gate (test_12's e2e_success_cron) just runs through.
GATE = 4243


# For a scenario that restarts the server while gated children run: a stop or restart ends the gate's
# session, maybe before the runners, and a child let through then must not end in that moment. Past the
# gate, it sleeps while the server still runs that started at the time a test wrote to pgbg_e2e.boot; its
# rerun on the restarted server does not (nor any child while boot is empty). The gate comes from a
# MATERIALIZED CTE, so the filter that sleeps runs after it.
RESTART = (
    "where pg_sleep(case when pg_postmaster_start_time() = (select started from pgbg_e2e.boot) then 600 else 0 end)"
    " is not null"
)


def _dag(
    dag_id: str,
    children: int,
    seconds: float,
    conn: str = "pgbg_e2e",
    gate: bool | range = False,
    restart: bool = False,
    **kwargs,
) -> DAG:
    """``gate``: True gates every child, a range the children of those numbers; the others sleep
    ``seconds``. ``restart``: gated children sleep past the gate until the server restarts (RESTART)."""
    gated = range(1, children + 1) if gate is True else gate or range(0)

    # The run id in each row lets a test count one run's effects.
    def child(i: int) -> str:
        mark = f"insert into pgbg_e2e.marks select '{{{{ run_id }}}}', {i}"
        if i not in gated:
            return f"{mark} from pg_sleep({seconds})"
        if restart:
            return f"with g as materialized (select pg_advisory_xact_lock_shared({GATE})) {mark} from g {RESTART}"
        return f"{mark} from pg_advisory_xact_lock_shared({GATE})"

    return _batch_dag(dag_id, [child(i) for i in range(1, children + 1)], conn, **kwargs)


def _callback(kind: str):
    """Leaves a file in AIRFLOW_HOME naming the callback, the DAG and the run: the test looks for it,
    whichever process ran the callback (the worker, or the DAG processor)."""

    def leave_file(context) -> None:
        ti = context["ti"]
        run = ti.run_id.replace(":", "_").replace("+", "_")
        (Path(os.environ["AIRFLOW_HOME"]) / f"{kind}-callback-{ti.dag_id}-{run}").write_text(ti.task_id)

    return leave_file


CALLBACKS = {"on_success_callback": _callback("success"), "on_failure_callback": _callback("failure")}

# The scenarios that depend on the launcher, each once per launcher: on pg_background (the main
# server; the restart scenario on the restartable one) and, with the suffix "_cron", on the server like
# a managed service, where the engine runs on pg_cron jobs. {"name": (children, seconds, conn, options)}
SCENARIOS = {
    # Gated: the test sees its children running while the task is deferred, however slow the machine.
    "e2e_success": (6, 0, "pgbg_e2e", {"gate": True, "max_parallel": 3, "deferrable": True, "poll_interval": 1}),
    # Gated, and the test never opens the gate: only the stop can end the children.
    "e2e_mark_failed": (
        8,
        0,
        "pgbg_e2e",
        {"gate": True, "max_parallel": 2, "deferrable": True, "poll_interval": 2},
    ),
    # Two children that end at once, then four gated ones: those running are still running when the stop
    # of a clear lands (on Airflow < 3.3 it comes with the triggerer's cancellation of the old trigger,
    # seconds later). A clear that catches the task between states restarts it as a retry: let that come
    # back at once.
    "e2e_clear": (
        6,
        0,
        "pgbg_e2e",
        {
            "gate": range(3, 7),
            "max_parallel": 2,
            "deferrable": True,
            "poll_interval": 2,
            "retry_delay": timedelta(seconds=1),
        },
    ),
    "e2e_triggerer_restart": (4, 6, "pgbg_e2e", {"max_parallel": 2, "deferrable": True, "poll_interval": 1}),
    # Gated, never opened: only on_kill's stop can end the children.
    "e2e_blocking_mark_failed": (
        6,
        0,
        "pgbg_e2e",
        {"gate": True, "max_parallel": 2, "deferrable": False, "poll_interval": 2},
    ),
    # Gated until the retry has taken the batch over: the kill finds it running, and so does the retry.
    "e2e_worker_killed": (
        4,
        0,
        "pgbg_e2e",
        {
            "gate": True,
            "max_parallel": 2,
            "deferrable": False,
            "poll_interval": 1,
            "retries": 1,
            "retry_delay": timedelta(seconds=1),
        },
    ),
    # Gated children, and a retry that comes seconds after a try died (as after a heartbeat timeout): the
    # test lets the batch end while no try waits for it, or while a try is held just before it takes the
    # outcome; the retry takes the outcome instead of running anything again.
    "e2e_worker_lost_after_end": (
        2,
        0,
        "pgbg_e2e",
        {
            "gate": True,
            "max_parallel": 2,
            "deferrable": False,
            "poll_interval": 1,
            "retries": 1,
            "retry_delay": timedelta(seconds=6),
        },
    ),
    # A deferred task that resumes on a worker to end (a success callback runs only there). Gated children:
    # still running once the task has deferred and the triggerer polls, until the test lets them end.
    "e2e_resume_killed": (
        2,
        0,
        "pgbg_e2e",
        {
            "gate": True,
            "max_parallel": 2,
            "deferrable": True,
            "poll_interval": 1,
            "retries": 1,
            "retry_delay": timedelta(seconds=1),
            "on_success_callback": lambda context: None,
        },
    ),
    # On a server the scenario restarts; its children are safe to run again, and gated: the first two are
    # still running when the restart lands, which ends the gate's session and so lets the reruns through.
    "e2e_db_restart": (
        4,
        0,
        "pgbg_e2e_fleet",
        {
            "gate": True,
            "restart": True,
            "max_parallel": 2,
            "deferrable": True,
            "poll_interval": 1,
            "retry_lost": True,
            "statement_retries": 2,
            "statement_retry_delay": 0.5,
        },
    ),
    # Launched on a worker, then deferred: a mark before the trigger runs is stopped by the API server.
    # Gated, never opened: only that stop can end the children.
    "e2e_early_mark": (
        6,
        0,
        "pgbg_e2e",
        {"gate": True, "max_parallel": 2, "deferrable": True, "start_from_trigger": False},
    ),
    "e2e_triggerer_killed_at_launch": (
        4,
        3,
        "pgbg_e2e",
        {"max_parallel": 2, "deferrable": True, "poll_interval": 1},
    ),
}
for _name, (_children, _seconds, _conn, _options) in SCENARIOS.items():
    globals()[_name] = _dag(_name, _children, _seconds, _conn, **_options)
    globals()[f"{_name}_cron"] = _dag(f"{_name}_cron", _children, _seconds, "pgbg_e2e_managed", **_options)

# The same scenarios with the suffix "_tx", through PgBouncer in transaction mode in front of the main
# server (connection pgbg_e2e_tx): no session for LISTEN or watch locks there.
POOLED_SCENARIOS = ("e2e_success", "e2e_mark_failed", "e2e_clear", "e2e_triggerer_restart", "e2e_early_mark")
for _name in POOLED_SCENARIOS:
    _children, _seconds, _conn, _options = SCENARIOS[_name]
    globals()[f"{_name}_tx"] = _dag(f"{_name}_tx", _children, _seconds, "pgbg_e2e_tx", **_options)

# Started in the triggerer (Airflow 3.3): a mark before the trigger runs means nothing is launched.
early_mark_in_triggerer = _dag("e2e_early_mark_in_triggerer", 6, 30, max_parallel=2, deferrable=True)
# Task callbacks of a deferrable batch task, on success and on failure (a child divides by zero).
callbacks = _dag("e2e_callbacks", 3, 1, max_parallel=3, deferrable=True, poll_interval=1, **CALLBACKS)
callbacks_failed = _batch_dag(
    "e2e_callbacks_failed", ["select pg_sleep(1)", "select 1/0"], deferrable=True, **CALLBACKS
)

# Lineage (OpenLineage reports these DAGs only, see conftest._openlineage). One at a time, in order: a
# child reads the table the one before it created.
LINEAGE_SQL = [
    "create table pgbg_e2e.lineage_a as select n, label from pgbg_e2e.lineage_b",
    "insert into pgbg_e2e.lineage_c select n from pgbg_e2e.lineage_a",
    "vacuum pgbg_e2e.lineage_c",
]
lineage = _batch_dag("e2e_lineage", LINEAGE_SQL, max_parallel=1, deferrable=True, poll_interval=1)
lineage_failed = _batch_dag(
    "e2e_lineage_failed",
    ["insert into pgbg_e2e.lineage_c select n from pgbg_e2e.lineage_b", "select 1/0"],
    deferrable=True,
    poll_interval=1,
)
