"""A basic batch: five independent statements, at most two at a time, deferrable.

Statements of a batch run in parallel in no promised order: give each one everything it needs
(here ``pgbg_demo_numbers`` is created by ``make demo``), or use fail_fast / separate tasks.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_pgbg.operators.batch import PgBackgroundBatchOperator

with DAG(
    "example_pgbg_basic",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    tags=["pgbg", "example"],
) as dag:
    PgBackgroundBatchOperator(
        task_id="build_summaries",
        postgres_conn_id="pgbg_demo",
        sql="""
            create table if not exists pgbg_demo_squares as
                select g, g::bigint * g as sq from generate_series(1, 50000) g;
            insert into pgbg_demo_numbers select g from generate_series(1, 100000) g;
            select count(*) as rows, sum(n) as total from pgbg_demo_numbers;
            select pg_sleep(1), 'a slow one' as note;
            vacuum analyze pgbg_demo_numbers;
        """,
        max_parallel=2,
        deferrable=True,
        poll_interval=1,
        batch_label="example: basic",
    )
