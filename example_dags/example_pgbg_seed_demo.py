"""The seed's own demo: seven ``select version()`` separated by commas, split by the engine."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_pgbg.operators.batch import PgBackgroundBatchOperator

with DAG(
    "example_pgbg_seed_demo",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    tags=["pgbg", "example"],
) as dag:
    PgBackgroundBatchOperator(
        task_id="seven_versions",
        postgres_conn_id="pgbg_demo",
        sql="select version();,select version(),select version(),select version(),"
        "select version(),select version(),select version();",
        delimiter=",",
        deferrable=True,
        poll_interval=1,
    )
