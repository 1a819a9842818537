"""Every example DAG parses and runs with dag.test(), with its expected outcome, as a system test.

They run as the demo role of ``make demo`` (scripts/demo_setup.sql) on the test server.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.airflow.conftest import DAGS_FOLDER, EXAMPLES
from tests.conftest import REPO

EXPECTED = {
    "example_pgbg_basic": "success",
    "example_pgbg_ddl": "success",
    "example_pgbg_sql_file": "success",
    "example_pgbg_seed_demo": "success",
    "example_pgbg_mapped": "success",
    "example_pgbg_fail_fast": "failed",  # 1/0 fails, and stops the rest
}


@pytest.fixture(scope="module")
def demo_conn(airflow_db: Any, dsn: str) -> Iterator[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute((REPO / "scripts" / "demo_setup.sql").read_text())
    p = conninfo_to_dict(dsn)
    os.environ["AIRFLOW_CONN_PGBG_DEMO"] = (
        f"postgresql://pgbg_demo@{p.get('host', 'localhost')}:{p.get('port', 5432)}/{p.get('dbname', 'postgres')}"
    )
    yield dsn
    os.environ.pop("AIRFLOW_CONN_PGBG_DEMO", None)


def _dag(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag


def test_every_example_dag_is_covered() -> None:
    assert {p.stem for p in EXAMPLES.glob("*.py")} == set(EXPECTED)


@pytest.mark.parametrize("dag_id", sorted(EXPECTED))
def test_example_dag_runs(demo_conn: str, dag_id: str) -> None:
    dag = _dag(DAGS_FOLDER / f"{dag_id}.py")
    assert dag.dag_id == dag_id
    dr = dag.test()
    assert dr.state == EXPECTED[dag_id], [(ti.task_id, ti.state) for ti in dr.get_task_instances()]
    with psycopg.connect(demo_conn, autocommit=True) as conn:
        batches = conn.execute(
            "SELECT b.uuid_parent, s.status FROM pgbg.batch b JOIN pgbg.batches s USING (uuid_parent) "
            "WHERE b.origin LIKE %s AND b.origin LIKE %s",
            (f"{dag_id}/%", f"%{dr.run_id}%"),
        ).fetchall()
    assert batches, "no batch was launched"
    if EXPECTED[dag_id] == "success":
        assert {str(s) for _, s in batches} == {"done"}
    else:
        assert {str(s) for _, s in batches} == {"failed"}
