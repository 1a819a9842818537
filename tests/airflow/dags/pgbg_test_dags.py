"""DAGs the Airflow tests run with dag.test(). Tables live in the schema passed as run conf."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG

from airflow_pgbg.operators.batch import PgBackgroundBatchOperator

CONN = "pgbg_test"
S = "{{ dag_run.conf['schema'] }}"
# A child that waits at the test's gate (tests.helpers.Gate, its key passed as run conf): it runs until
# the test lets it go, or until a stop ends it.
GATED = "select pg_advisory_xact_lock_shared({{ dag_run.conf['gate'] }})"


def _dag(dag_id: str, **task_kwargs) -> DAG:
    with DAG(dag_id, schedule=None, start_date=datetime(2025, 1, 1), catchup=False) as dag:
        PgBackgroundBatchOperator(task_id="batch", postgres_conn_id=CONN, **{"poll_interval": 0.2, **task_kwargs})
    return dag


ok_deferrable = _dag(
    "pgbg_ok_deferrable",
    sql=f"insert into {S}.marks values (1); insert into {S}.marks values (2); "
    "select pg_sleep(0.3); select 42 as answer",
    max_parallel=2,
    deferrable=True,
)
ok_blocking = _dag(
    "pgbg_ok_blocking",
    sql=[f"insert into {S}.marks values (1)", f"insert into {S}.marks values (2)", "select pg_sleep(0.3)"],
    max_parallel=2,
    deferrable=False,
)
# Launched from a worker, which waits up to defer_after for the batch before deferring: the short one ends
# there; the gated one (the test opens its gate only once the trigger watches it) defers after 1 s.
waits_on_worker = _dag(
    "pgbg_waits_on_worker",
    sql=f"insert into {S}.marks values (1); insert into {S}.marks values (2); select pg_sleep(0.3)",
    max_parallel=2,
    deferrable=True,
    defer_after=timedelta(minutes=2),
)
defers_after_waiting = _dag(
    "pgbg_defers_after_waiting",
    sql=[f"insert into {S}.marks values (1)", GATED],
    max_parallel=2,
    deferrable=True,
    defer_after=1,
)
failing = _dag(
    "pgbg_failing",
    sql=["select 1", "select 1/0", f"select * from {S}.no_such_table"],
    deferrable=True,
)
fail_fast = _dag(
    "pgbg_fail_fast",
    sql=["select 1/0"] + [GATED] * 4,
    max_parallel=2,
    fail_fast=True,
    deferrable=True,
)
retried = _dag(
    "pgbg_retried",
    sql=[f"insert into {S}.marks values (1)", f"select {S}.flaky()", f"insert into {S}.marks values (3)"],
    max_parallel=1,
    deferrable=True,
    retries=1,
    retry_delay=timedelta(seconds=0),
)
timed_out = _dag(
    "pgbg_timed_out",
    sql=[GATED] * 3,
    max_parallel=3,
    deferrable=True,
    execution_timeout=timedelta(seconds=2),
)
# The same timeout while the worker still waits for the batch, before it would defer.
timed_out_waiting = _dag(
    "pgbg_timed_out_waiting",
    sql=[GATED] * 3,
    max_parallel=3,
    deferrable=True,
    defer_after=timedelta(minutes=2),
    execution_timeout=timedelta(seconds=2),
)
reconnecting = _dag(
    "pgbg_reconnecting",
    sql=[f"insert into {S}.marks select 7 from pg_advisory_xact_lock(4242)"],
    deferrable=True,
)
from_file = _dag(
    "pgbg_from_file",
    sql="batch.sql",
    deferrable=True,
)
ui_batch = _dag(
    "pgbg_ui_batch",
    sql=[f"insert into {S}.marks values (1)", "select '<script>alert(1)</script>' as x", "select 1/0", "select 2"],
    max_parallel=1,
    deferrable=True,
    session_settings={"work_mem": "8MB", "pgbg_test.note": "<b>bold</b>"},
)
# The console at scale: 10,000 children with 64 KB result previews, every 1,000th failing.
big_batch = _dag(
    "pgbg_big_batch",
    sql=["select 1/0" if i % 1000 == 0 else "select repeat('x', 65536) as x" for i in range(1, 10_001)],
    max_parallel=8,
    deferrable=False,
)
# The same children, ten of them: the page the big one's time is measured against.
small_batch = _dag(
    "pgbg_small_batch",
    sql=["select 1/0" if i == 10 else "select repeat('x', 65536) as x" for i in range(1, 11)],
    max_parallel=8,
    deferrable=False,
)
# Statements that wait for every older snapshot, one after the other; polled rarely, so that a poll that
# held a snapshot while it waited would hold each of them back for seconds.
_CONCURRENTLY = [
    f"create index concurrently big_a on {S}.big (a)",
    f"reindex index concurrently {S}.big_a",
    f"alter table {S}.parted detach partition {S}.parted_1 concurrently",
]
concurrent_blocking = _dag(
    "pgbg_concurrent_blocking", sql=_CONCURRENTLY, max_parallel=1, deferrable=False, poll_interval=8
)
concurrent_deferrable = _dag(
    "pgbg_concurrent_deferrable", sql=_CONCURRENTLY, max_parallel=1, deferrable=True, poll_interval=8
)
# Settings: templated ones from session_settings, and a script's leading SET; each child writes what it saw.
_SEEN = (
    f"insert into {S}.seen select current_setting('work_mem'), current_setting('maintenance_work_mem'), "
    "current_setting('lock_timeout')"
)
_SETTINGS = {"work_mem": "12MB", "lock_timeout": "{{ dag_run.conf.get('lock_timeout', '4s') }}"}
settings_deferrable = _dag(
    "pgbg_settings_deferrable",
    sql=f"SET maintenance_work_mem = '96MB';\n{_SEEN};\n{_SEEN};",
    session_settings=_SETTINGS,
    deferrable=True,
)
settings_blocking = _dag(
    "pgbg_settings_blocking",
    sql=f"SET maintenance_work_mem = '96MB';\n{_SEEN};\n{_SEEN};",
    session_settings=_SETTINGS,
    deferrable=False,
)
settings_refused = _dag("pgbg_settings_refused", sql=f"{_SEEN}; SET work_mem = '1MB'; {_SEEN}", deferrable=True)
# Watched while it runs (the console's live updates and actions), at three gates of the test (keys as run
# conf): the first child ends at once; the second waits at "hold", which never opens, until a person
# stops it; the third at "one", which the test opens to watch it end; the others at "rest", queued
# behind them until the test is done.
ui_live = _dag(
    "pgbg_ui_live",
    sql=[
        "select 1",
        "select pg_advisory_xact_lock_shared({{ dag_run.conf['hold'] }})",
        "select pg_advisory_xact_lock_shared({{ dag_run.conf['one'] }})",
    ]
    + ["select pg_advisory_xact_lock_shared({{ dag_run.conf['rest'] }})"] * 5,
    max_parallel=2,
    deferrable=False,
)


def _forge_batch_ref(context: Any, result: Any = None) -> None:
    """What any task's code can do: publish a batch reference that names another batch (conf "victim"),
    through another connection (conf "conn"), as if this try had launched it."""
    conf, ti = context["dag_run"].conf, context["ti"]
    ref = {"uuid_parent": conf["victim"], "postgres_conn_id": conf.get("conn", CONN), "database": None}
    ti.xcom_push(key="pgbg_batch", value={**ref, "engine_schema": "pgbg", "claim": f"try {ti.try_number}"})


# A batch task whose own code then points its batch reference somewhere else.
forged_ref = _dag("pgbg_forged_ref", sql=["select 1"], deferrable=False, post_execute=_forge_batch_ref)

# Not a batch task at all, yet it publishes a batch reference.
with DAG("pgbg_forger", schedule=None, start_date=datetime(2025, 1, 1), catchup=False) as forger:
    PythonOperator(task_id="batch", python_callable=lambda **context: _forge_batch_ref(context))
