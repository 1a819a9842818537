"""DAGs of the deployment tests (tests/deploy): CeleryExecutor with every service doubled, and one
triggerer waiting on many databases. Each child inserts its number once into pgbg_deploy.marks."""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_pgbg.operators.batch import PgBackgroundBatchOperator

DATABASES = 20
"""Databases of the many-databases test, each with the engine and an Airflow connection pgbg_db_NN."""


def _dag(dag_id: str, children: int, seconds: float, conn: str = "pgbg_deploy", **kwargs) -> DAG:
    sql = [
        f"insert into pgbg_deploy.marks select '{{{{ run_id }}}}', {i} from pg_sleep({seconds})"
        for i in range(1, children + 1)
    ]
    with DAG(dag_id, schedule=None, start_date=datetime(2025, 1, 1), catchup=False) as dag:
        PgBackgroundBatchOperator(task_id="batch", postgres_conn_id=conn, sql=sql, **kwargs)
    return dag


worker_free = _dag("deploy_worker_free", 4, 1, max_parallel=2, deferrable=True, poll_interval=1)
blocking = _dag("deploy_blocking", 4, 1, max_parallel=2, deferrable=False, poll_interval=1)
# Killed with its Celery worker while it waits: the retry must take the batch's outcome.
worker_killed = _dag(
    "deploy_worker_killed",
    4,
    5,
    max_parallel=2,
    deferrable=False,
    poll_interval=1,
    retries=1,
    retry_delay=timedelta(seconds=1),
)
# Ten runs at once, deferred on both triggerers; one triggerer is killed. Their children outlast the
# setup (ten runs deferred one by one, then a triggerer restarted: about 15 s on a busy machine, when
# 8 s children had ended some runs before the test looked at their triggers).
many_deferred = _dag("deploy_many_deferred", 3, 25, max_parallel=3, deferrable=True, poll_interval=2)
# Deferred long enough to outlast a triggerer's stall.
long_deferred = _dag("deploy_long_deferred", 3, 30, max_parallel=3, deferrable=True, poll_interval=2)
mark_failed = _dag("deploy_mark_failed", 6, 60, max_parallel=2, deferrable=True, poll_interval=2)
blocking_mark_failed = _dag("deploy_blocking_mark_failed", 6, 60, max_parallel=2, deferrable=False, poll_interval=2)

# One batch per database; and, launched on a worker before they defer, batches a mark stops before
# any triggerer runs their trigger (the API server's listener does).
for _i in range(DATABASES):
    globals()[f"db_{_i:02d}"] = _dag(f"deploy_db_{_i:02d}", 3, 4, f"pgbg_db_{_i:02d}", max_parallel=1, deferrable=True)
    globals()[f"db_mark_{_i:02d}"] = _dag(
        f"deploy_db_mark_{_i:02d}",
        3,
        60,
        f"pgbg_db_{_i:02d}",
        max_parallel=1,
        deferrable=True,
        start_from_trigger=False,
    )
