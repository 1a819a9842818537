"""A throwaway Airflow home (SQLite metadata) for dag.test(), and the connection the DAGs use.

Airflow reads its configuration when first imported, so the environment is set here, before any
test module of this package imports it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

DAGS = Path(__file__).parent / "dags"
EXAMPLES = Path(__file__).resolve().parents[2] / "example_dags"
_HOME = Path(tempfile.mkdtemp(prefix="pgbg-airflow-home-"))
# dag.test() runs a DAG of the DAGs folder: the test DAGs and the example DAGs, side by side.
DAGS_FOLDER = _HOME / "dags"
DAGS_FOLDER.mkdir()
for _source in [*DAGS.iterdir(), *EXAMPLES.iterdir()]:
    if _source.suffix in (".py", ".sql"):
        (DAGS_FOLDER / _source.name).symlink_to(_source)
os.environ.update(
    AIRFLOW_HOME=str(_HOME),
    AIRFLOW__CORE__DAGS_FOLDER=str(DAGS_FOLDER),
    AIRFLOW__CORE__LOAD_EXAMPLES="False",
    AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
    return _HOME


@pytest.fixture
def pgbg_conn(airflow_db: Path, user_dsn: str) -> Iterator[str]:
    """The Airflow connection ``pgbg_test``, as an ordinary role that is a member of pgbg_user."""
    p = conninfo_to_dict(user_dsn)
    os.environ["AIRFLOW_CONN_PGBG_TEST"] = (
        f"postgresql://{quote(p['user'], safe='')}:{quote(p.get('password', ''), safe='')}"
        f"@{p.get('host', 'localhost')}:{p.get('port', 5432)}/{p.get('dbname', 'postgres')}"
    )
    yield user_dsn
    os.environ.pop("AIRFLOW_CONN_PGBG_TEST", None)


def _load_dags() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pgbg_test_dags", DAGS_FOLDER / "pgbg_test_dags.py")
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_dag(pgbg_conn: str, scratch: str) -> Callable[..., Any]:
    """Runs one of the test DAGs with dag.test(); the scratch schema is passed as run conf."""
    dags = _load_dags()

    def run(name: str, conf: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return getattr(dags, name).test(run_conf={"schema": scratch, **(conf or {})}, **kwargs)

    return run


def dag_test_command(name: str, scratch: str, conf: dict[str, Any] | None = None) -> list[str]:
    """A command that runs one of the test DAGs with dag.test() in a process of its own (to watch it run,
    or to give it an Airflow configured differently through its environment); ``conf``: more run conf."""
    script = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('pgbg_test_dags', {str(DAGS_FOLDER / 'pgbg_test_dags.py')!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"module.{name}.test(run_conf={ {'schema': scratch, **(conf or {})}!r})\n"
    )
    return [sys.executable, "-c", script]


@pytest.fixture
def marks(user: psycopg.Connection, scratch: str) -> Callable[[], list[int]]:
    user.execute(f"CREATE TABLE {scratch}.marks (n int)")
    return lambda: [r[0] for r in user.execute(f"SELECT n FROM {scratch}.marks ORDER BY n").fetchall()]


@pytest.fixture
def stored_connection(pgbg_conn: str) -> str:
    """The API server finds the connection where a deployment keeps it: in the metadata database."""
    store_connection("pgbg_test", os.environ["AIRFLOW_CONN_PGBG_TEST"])
    return pgbg_conn


def store_connection(conn_id: str, uri: str) -> None:
    from airflow.models import Connection
    from airflow.utils.session import create_session

    with create_session() as session:
        session.query(Connection).filter(Connection.conn_id == conn_id).delete()
        session.add(Connection(conn_id=conn_id, uri=uri))


@pytest.fixture
def finished_run(
    run_dag: Callable[..., Any], user: psycopg.Connection, scratch: str, stored_connection: str
) -> dict[str, Any]:
    """A DAG run whose batch has done, failed and hostile-looking children."""
    user.execute(f"CREATE TABLE {scratch}.marks (n int)")
    dr = run_dag("ui_batch")
    (ti,) = dr.get_task_instances()
    return {"dag_id": dr.dag_id, "run_id": dr.run_id, "task_id": ti.task_id, "state": ti.state}
