"""W8: a batch task's DAG run on a real deployment, against the same statements as mapped tasks.

The deployment of the end-to-end suite (tests/e2e/deployment.py: api-server, scheduler with
LocalExecutor parallelism 8, dag-processor, triggerer, metadata in PostgreSQL). Each DAG run's wall
time is its end minus its start as Airflow records them; "worker runs" counts the executor's task
processes for the DAG (on Airflow 3.3 a deferrable batch task starts and ends in the triggerer).
The mapped alternative at 1,000 statements takes minutes: it runs with PGBG_BENCH_SLOW=1 only.
"""

from __future__ import annotations

import os
import sys
import tempfile
import textwrap
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from psycopg.conninfo import conninfo_to_dict, make_conninfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.e2e.deployment import running_deployment, wait_for  # noqa: E402

SLEEP, CAP = 0.05, 8

DAGS = """
from datetime import datetime
from airflow.sdk import DAG
from airflow.providers.common.sql.operators.sql import SQLExecuteQueryOperator
from airflow_pgbg.operators.batch import PgBackgroundBatchOperator

def statements(n):
    return [f"select pg_sleep({SLEEP}), {{i}} as n" for i in range(n)]

with DAG("bench_w8_warmup", schedule=None, start_date=datetime(2025, 1, 1), catchup=False) as warmup:
    PgBackgroundBatchOperator(task_id="batch", postgres_conn_id="pgbg_bench", sql="select 1", deferrable=True,
                              poll_interval=1)

for n in (200, 1000):
    with DAG(f"bench_w8_batch_{{n}}", schedule=None, start_date=datetime(2025, 1, 1), catchup=False) as dag:
        PgBackgroundBatchOperator(task_id="batch", postgres_conn_id="pgbg_bench", sql=statements(n),
                                  max_parallel={CAP}, deferrable=True, poll_interval=1)
    globals()[f"batch_{{n}}"] = dag
    with DAG(f"bench_w8_mapped_{{n}}", schedule=None, start_date=datetime(2025, 1, 1), catchup=False,
             max_active_tasks={CAP}) as dag:
        SQLExecuteQueryOperator.partial(task_id="statement", conn_id="pgbg_bench").expand(sql=statements(n))
    globals()[f"mapped_{{n}}"] = dag
"""


def _wall(d: Any, dag_id: str) -> float:
    run = d.trigger(dag_id)
    wait_for(lambda: d.run_state(dag_id, run) in ("success", "failed"), 1800, f"{dag_id} to end", 0.5)
    info = d.api.get(f"/dags/{dag_id}/dagRuns/{quote(run, safe='')}").json()
    if info["state"] != "success":
        raise RuntimeError(f"{dag_id} ended {info['state']}")
    return (datetime.fromisoformat(info["end_date"]) - datetime.fromisoformat(info["start_date"])).total_seconds()


def w8(bench_dsn: str) -> dict[str, Any]:
    p = conninfo_to_dict(bench_dsn)
    uri = f"postgresql://{p.get('user', 'postgres')}@{p['host']}:{p['port']}/{p['dbname']}"
    admin = make_conninfo(bench_dsn, dbname="postgres")
    slow = bool(os.environ.get("PGBG_BENCH_SLOW"))
    with tempfile.TemporaryDirectory(prefix="pgbg-bench-w8-") as tmp:
        home = Path(tmp)
        dags = home / "dags"
        dags.mkdir()
        (dags / "bench_w8.py").write_text(textwrap.dedent(DAGS.format(SLEEP=SLEEP, CAP=CAP)))
        with running_deployment(
            admin, home, dags, {"pgbg_bench": uri}, meta_db="pgbg_bench_airflow", dag_prefix="bench_w8", expected_dags=5
        ) as d:
            # A long-running triggerer has imported the provider and connected: warm it up once.
            _wall(d, "bench_w8_warmup")
            r: dict[str, Any] = {"w8_ideal_200": 200 * SLEEP / CAP, "w8_ideal_1000": 1000 * SLEEP / CAP}
            r["w8_batch_200_run_wall"] = _wall(d, "bench_w8_batch_200")
            r["w8_batch_200_worker_runs"] = d.worker_runs("bench_w8_batch_200")
            r["w8_batch_1000_run_wall"] = _wall(d, "bench_w8_batch_1000")
            r["w8_mapped_200_run_wall"] = _wall(d, "bench_w8_mapped_200")
            if slow:
                r["w8_mapped_1000_run_wall"] = _wall(d, "bench_w8_mapped_1000")
    print(
        f"  W8 200 x {SLEEP * 1000:.0f} ms at cap {CAP}: batch DAG run {r['w8_batch_200_run_wall']:.2f} s "
        f"({r['w8_batch_200_worker_runs']} worker runs), mapped {r['w8_mapped_200_run_wall']:.2f} s; "
        f"1,000: batch {r['w8_batch_1000_run_wall']:.2f} s"
        + (f", mapped {r['w8_mapped_1000_run_wall']:.2f} s" if slow else " (mapped: PGBG_BENCH_SLOW=1)")
    )
    return r
