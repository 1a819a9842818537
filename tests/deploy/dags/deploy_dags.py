"""DAGs of the deployment tests (tests/deploy): CeleryExecutor with every service doubled, and one
triggerer waiting on many databases. Each child inserts its number once into pgbg_deploy.marks."""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_pgbg.operators.batch import PgBackgroundBatchOperator

DATABASES = 20
"""Databases of the many-databases test, each with the engine and an Airflow connection pgbg_db_NN."""


# The advisory lock that gated children wait for (shared) until a test lets them go (tests.helpers.gate
# with this key, on the children's database: advisory locks are per database). A gated batch runs as
# long as its test needs it to, however slow the machine; only the gate, a stop or a kill ends it.
GATE = 4244


def _dag(dag_id: str, children: int, seconds: float | None, conn: str = "pgbg_deploy", **kwargs) -> DAG:
    """Children that sleep ``seconds``, or wait at GATE when ``seconds`` is None."""
    wait = f"pg_advisory_xact_lock_shared({GATE})" if seconds is None else f"pg_sleep({seconds})"
    sql = [f"insert into pgbg_deploy.marks select '{{{{ run_id }}}}', {i} from {wait}" for i in range(1, children + 1)]
    with DAG(dag_id, schedule=None, start_date=datetime(2025, 1, 1), catchup=False) as dag:
        PgBackgroundBatchOperator(task_id="batch", postgres_conn_id=conn, sql=sql, **kwargs)
    return dag


worker_free = _dag("deploy_worker_free", 4, 1, max_parallel=2, deferrable=True, poll_interval=1)
blocking = _dag("deploy_blocking", 4, 1, max_parallel=2, deferrable=False, poll_interval=1)
# Killed with its Celery worker while it waits: the retry must take the batch's outcome. Gated: the
# batch is still running when the worker dies and when the retry comes.
worker_killed = _dag(
    "deploy_worker_killed",
    4,
    None,
    max_parallel=2,
    deferrable=False,
    poll_interval=1,
    retries=1,
    retry_delay=timedelta(seconds=1),
)
# Ten runs deferred on one triggerer, which is killed; gated until the other one has taken them over.
many_deferred = _dag("deploy_many_deferred", 3, None, max_parallel=3, deferrable=True, poll_interval=2)
# Gated through a triggerer's stall, the takeover and the thawed triggerer's cancellation of its copies.
long_deferred = _dag("deploy_long_deferred", 3, None, max_parallel=3, deferrable=True, poll_interval=2)
# Gated, never let go: only the stop of a mark ends them.
mark_failed = _dag("deploy_mark_failed", 6, None, max_parallel=2, deferrable=True, poll_interval=2)
blocking_mark_failed = _dag("deploy_blocking_mark_failed", 6, None, max_parallel=2, deferrable=False, poll_interval=2)

# One batch per database; and, launched on a worker before they defer, batches a mark stops before
# any triggerer runs their trigger (the API server's listener does): gated in each database, never let
# go, so that every batch is still running when its mark comes.
for _i in range(DATABASES):
    globals()[f"db_{_i:02d}"] = _dag(f"deploy_db_{_i:02d}", 3, 4, f"pgbg_db_{_i:02d}", max_parallel=1, deferrable=True)
    globals()[f"db_mark_{_i:02d}"] = _dag(
        f"deploy_db_mark_{_i:02d}",
        3,
        None,
        f"pgbg_db_{_i:02d}",
        max_parallel=1,
        deferrable=True,
        start_from_trigger=False,
    )
