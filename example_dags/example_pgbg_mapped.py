"""One batch per partition with dynamic task mapping: each mapped task runs its own batch."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_pgbg.operators.batch import PgBackgroundBatchOperator

PARTITIONS = ["2025_01", "2025_02", "2025_03"]

with DAG(
    "example_pgbg_mapped",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    tags=["pgbg", "example"],
) as dag:
    PgBackgroundBatchOperator.partial(
        task_id="per_partition",
        postgres_conn_id="pgbg_demo",
        max_parallel=2,
        deferrable=True,
        poll_interval=1,
    ).expand(
        sql=[
            [
                f"create table if not exists pgbg_demo_sales_{p} as select g as id, random() as amount "
                "from generate_series(1, 10000) g",
                f"select '{p}' as partition, count(*) as numbers from pgbg_demo_numbers",
            ]
            for p in PARTITIONS
        ]
    )
