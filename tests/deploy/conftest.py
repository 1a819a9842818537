"""The deployment people run: CeleryExecutor with Redis as broker, two schedulers, two triggerers, two
Celery workers, a dag-processor and the api-server, Airflow's metadata in PostgreSQL behind PgBouncer in
transaction mode; and the batches' databases: the main server's ``postgres`` and twenty more.

Started by the tests themselves (tests.e2e.deployment, scripts/redis.sh, scripts/pgbouncer.sh), on the
servers of scripts/db.sh; ``make test-deploy`` runs them.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from airflow_pgbg.hooks.install import install_engine_dsn
from tests.conftest import REPO
from tests.deploy.dags.deploy_dags import DATABASES
from tests.e2e.deployment import Deployment, role_uri, running_deployment, wait_for
from tests.servers import MAIN_TX, local_servers_or_skip

ROLE = "pgbg_deploy"
DAGS = Path(__file__).parent / "dags"
META_DB = "pgbg_deploy_airflow"

__all__ = ["Deployment", "wait_for"]


def database_name(i: int) -> str:
    return f"pgbg_deploy_db_{i:02d}"


def _role(admin_dsn: str, password: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for db in [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'pgbg_deploy_db_%'")]:
            conn.execute(f"DROP DATABASE {db} WITH (FORCE)")
        conn.execute("DROP SCHEMA IF EXISTS pgbg_deploy CASCADE")
        conn.execute(f"DELETE FROM pgbg.batch WHERE role_name = '{ROLE}'")
        conn.execute(f"DELETE FROM pgbg.waiter WHERE role_name = '{ROLE}'")
        if conn.execute(f"SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}'").fetchone():
            conn.execute(f"DROP OWNED BY {ROLE}")
            conn.execute(f"DROP ROLE {ROLE}")
        conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{password}' IN ROLE pgbg_user")


def _tables(dsn: str) -> None:
    """The engine and the table children write, in one database."""
    install_engine_dsn(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA pgbg_deploy AUTHORIZATION {ROLE}")
        conn.execute("CREATE TABLE pgbg_deploy.marks (run_id text, n int)")
        conn.execute(f"ALTER TABLE pgbg_deploy.marks OWNER TO {ROLE}")


def _redis() -> str:
    out = subprocess.run(["bash", str(REPO / "scripts" / "redis.sh")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


SERVICES = (
    ("scheduler-1", ("scheduler", "--skip-serve-logs")),
    ("scheduler-2", ("scheduler", "--skip-serve-logs")),
    ("dag-processor", ("dag-processor",)),
    ("triggerer-1", ("triggerer", "--skip-serve-logs")),
    ("triggerer-2", ("triggerer", "--skip-serve-logs")),
    ("worker-1", ("celery", "worker", "--celery-hostname", "worker-1@%h", "--skip-serve-logs", "-c", "2")),
    ("worker-2", ("celery", "worker", "--celery-hostname", "worker-2@%h", "--skip-serve-logs", "-c", "2")),
)
"""Every service doubled but the dag-processor (and the api-server, which running_deployment starts)."""


def service_args(name: str) -> tuple[str, ...]:
    return dict(SERVICES)[name]


@pytest.fixture(scope="session")
def databases(dsn: str) -> dict[str, str]:
    """Superuser DSNs: ``main`` (the main server's postgres database) and ``db_NN`` (twenty more)."""
    local_servers_or_skip()
    password = secrets.token_urlsafe(12)
    _role(dsn, password)
    out = {"main": dsn, "password": password}
    _tables(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(DATABASES):
            conn.execute(f"CREATE DATABASE {database_name(i)}")
    for i in range(DATABASES):
        db_dsn = make_conninfo(dsn, dbname=database_name(i))
        _tables(db_dsn)
        out[f"db_{i:02d}"] = db_dsn
    return out


@pytest.fixture(scope="session")
def celery(databases: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    password = databases["password"]
    connections = {"pgbg_deploy": role_uri(databases["main"], ROLE, password)}
    for i in range(DATABASES):
        connections[f"pgbg_db_{i:02d}"] = role_uri(databases[f"db_{i:02d}"], ROLE, password)
    broker = _redis()
    pooler = MAIN_TX.restart()  # no server connection of an earlier run's roles
    home = tmp_path_factory.mktemp("airflow-deploy")
    dags = home / "dags"
    dags.mkdir()
    shutil.copy(DAGS / "deploy_dags.py", dags / "deploy_dags.py")
    settings = {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": broker,
        "AIRFLOW__CELERY__RESULT_BACKEND": broker.rsplit("/", 1)[0] + "/1",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
        "AIRFLOW__CORE__PARALLELISM": "32",
    }
    # The broker keeps nothing of an earlier run.
    subprocess.run(["redis-cli", "-u", broker, "flushall"], check=True, capture_output=True)
    with running_deployment(
        databases["main"],
        home,
        dags,
        connections,
        meta_db=META_DB,
        dag_prefix="deploy_",
        expected_dags=7 + 2 * DATABASES,
        settings=settings,
        services=SERVICES,
        meta_through=pooler,
    ) as d:
        d.marks_table = "pgbg_deploy.marks"
        yield d


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """A failed test's report carries the services' logs: in CI they are gone with the run."""
    report = yield
    deployment = getattr(item, "funcargs", {}).get("celery")
    if report.when == "call" and report.failed and deployment is not None:
        report.sections.append(("airflow services (last lines of each log)", deployment.logs()))
    return report


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[[str, float, float | None], None]:
    """Prints a figure next to its bound, and checks the bound; without a bound, only prints it: a
    wall time of services on a shared machine says how it went, not whether it worked."""

    def check(name: str, value: float, bound: float | None = None) -> None:
        if bound is None:
            print(f"\n[deploy] {request.node.name}: {name} = {value:.2f}")
            return
        print(f"\n[deploy] {request.node.name}: {name} = {value:.2f} (bound {bound:.2f})")
        assert value <= bound, f"{name} = {value:.2f} exceeds {bound:.2f}"

    return check
