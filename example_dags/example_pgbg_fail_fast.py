"""fail_fast: the first failing statement stops the rest of the batch, and the task fails."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_pgbg.operators.batch import PgBackgroundBatchOperator

with DAG(
    "example_pgbg_fail_fast",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    tags=["pgbg", "example"],
) as dag:
    PgBackgroundBatchOperator(
        task_id="all_or_nothing",
        postgres_conn_id="pgbg_demo",
        sql=["select pg_sleep(5)", "select 1/0", "select pg_sleep(5)", "select pg_sleep(5)"],
        max_parallel=2,
        fail_fast=True,
        deferrable=True,
        poll_interval=1,
    )
