"""A batch read from a templated .sql file (``template_ext``), split by PostgreSQL's grammar."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_pgbg.operators.batch import PgBackgroundBatchOperator

with DAG(
    "example_pgbg_sql_file",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    params={"days": 7},
    tags=["pgbg", "example"],
) as dag:
    PgBackgroundBatchOperator(
        task_id="maintenance",
        postgres_conn_id="pgbg_demo",
        sql="example_pgbg_maintenance.sql",
        max_parallel=4,
        deferrable=True,
        poll_interval=1,
    )
