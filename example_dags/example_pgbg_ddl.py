"""DDL on a busy table that never makes its readers wait: lock_timeout among the batch's settings, and
retries of the lock timeouts (SQLSTATE 55P03) until each statement gets its lock.

An ALTER TABLE that waits for its lock behind a long transaction queues every later query on that table
behind itself, for as long as that transaction runs. With ``lock_timeout`` it gives up after 2 s instead,
lets them pass, and tries again 5 s later: no reader waits more than 2 s, and the batch ends once the
long transaction has.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_pgbg.operators.batch import PgBackgroundBatchOperator

with DAG(
    "example_pgbg_ddl",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    tags=["pgbg", "example"],
) as dag:
    PgBackgroundBatchOperator(
        task_id="alter_busy_table",
        postgres_conn_id="pgbg_demo",
        sql=[
            "alter table pgbg_demo_events add column if not exists source text",
            "alter table pgbg_demo_events set (autovacuum_vacuum_scale_factor = 0.02)",
            "analyze pgbg_demo_events",
        ],
        session_settings={"lock_timeout": "2s", "maintenance_work_mem": "256MB"},
        statement_retries=60,  # up to about five minutes of retries
        statement_retry_delay=timedelta(seconds=5),
        statement_retry_backoff=1,  # every 5 s, not ever longer
        max_parallel=1,  # one lock on the table at a time
        deferrable=True,
        poll_interval=1,
    )
