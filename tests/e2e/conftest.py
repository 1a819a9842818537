"""The end-to-end suite's deployment (tests.e2e.deployment) with the DAGs of tests/e2e/dags.

The DAGs' role may use three servers: the main one, which also holds Airflow's metadata, the
restartable one (tests.servers.FLEET) that a scenario restarts, and one like a managed service
(tests.servers.MANAGED), without pg_background, where the engine runs on pg_cron; and the main one
through PgBouncer in transaction mode (tests.servers.MAIN_TX).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from airflow_pgbg.hooks.install import install_engine_dsn
from tests.conftest import REPO
from tests.e2e.dags.e2e_dags import POOLED_SCENARIOS, SCENARIOS
from tests.e2e.deployment import ROLE, Deployment, role_uri, running_deployment, wait_for
from tests.servers import FLEET, MAIN_TX, MANAGED

DAGS = Path(__file__).parent / "dags"
EXAMPLES = REPO / "example_dags"
EXAMPLE_DAGS = sorted(p.stem for p in EXAMPLES.glob("*.py"))
META_DB = "pgbg_e2e_airflow"

__all__ = ["Deployment", "wait_for"]


def _role_and_tables(dsn: str, role_password: str) -> None:
    """The DAGs' role (a member of pgbg_user) and the table their children write, on one server."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS pgbg_e2e CASCADE")
        conn.execute(f"DELETE FROM pgbg.batch WHERE role_name = '{ROLE}'")
        if conn.execute("SELECT to_regclass('cron.job') IS NOT NULL").fetchone()[0]:
            # A pg_cron job left to a dropped role stops pg_cron's scheduler (citusdata/pg_cron#399).
            conn.execute(f"DELETE FROM cron.job WHERE username = '{ROLE}'")
        conn.execute(f"DROP ROLE IF EXISTS {ROLE}")
        conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{role_password}' IN ROLE pgbg_user")
        conn.execute(f"CREATE SCHEMA pgbg_e2e AUTHORIZATION {ROLE}")
        # marks: what children write; boot: the server's start a restart scenario's children know (see
        # e2e_dags.RESTART); lineage_b/_c: the tables the lineage DAGs read and write.
        tables = ("marks (run_id text, n int)", "boot (started timestamptz)", "lineage_b (n int, label text)")
        for table in (*tables, "lineage_c (n int)"):
            conn.execute(f"CREATE TABLE pgbg_e2e.{table}")
            conn.execute(f"ALTER TABLE pgbg_e2e.{table.split()[0]} OWNER TO {ROLE}")


OPENLINEAGE_EVENTS = "openlineage.jsonl"


def _openlineage(home: Path) -> dict[str, str]:
    """OpenLineage as a user configures it: events to a file (one JSON per line), reported for the
    lineage DAGs only (an emission policy), so that every other DAG keeps running without a worker."""
    transport = {"type": "file", "log_file_path": str(home / OPENLINEAGE_EVENTS), "append": True}
    policy = [
        {"scope": {}, "controls": {"emit": False}},
        {"scope": {"dag_id": "e2e_lineage.*"}, "match_mode": "regex", "controls": {"emit": True}},
    ]
    return {
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(transport),
        "AIRFLOW__OPENLINEAGE__EMISSION_POLICY": json.dumps(policy),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "pgbg-e2e",
    }


@pytest.fixture(scope="session")
def deployment(dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    role_password = secrets.token_urlsafe(12)
    _role_and_tables(dsn, role_password)
    connections = {"pgbg_e2e": role_uri(dsn, ROLE, role_password)}
    fleet_dsn = managed_dsn = None
    if not os.environ.get("PGBG_EXTERNAL_SERVER"):
        fleet_dsn = FLEET.start()
        install_engine_dsn(fleet_dsn)
        _role_and_tables(fleet_dsn, role_password)
        connections["pgbg_e2e_fleet"] = role_uri(fleet_dsn, ROLE, role_password)
        managed_dsn = MANAGED.start()
        install_engine_dsn(managed_dsn)  # the launcher "auto" picks: pg_cron there
        _role_and_tables(managed_dsn, role_password)
        connections["pgbg_e2e_managed"] = role_uri(managed_dsn, ROLE, role_password)
        # The main server through PgBouncer in transaction mode.
        pooled_dsn = MAIN_TX.restart()  # the role was just created again
        connections["pgbg_e2e_tx"] = role_uri(pooled_dsn, ROLE, role_password)
    else:
        connections["pgbg_e2e_tx"] = connections["pgbg_e2e"]  # its scenarios are skipped
    # The example DAGs run there too, as the demo role of `make demo`.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute((REPO / "scripts" / "demo_setup.sql").read_text())
    connections["pgbg_demo"] = role_uri(dsn, "pgbg_demo", "")
    home = tmp_path_factory.mktemp("airflow-e2e")
    dags = home / "dags"
    dags.mkdir()
    for source in [*DAGS.iterdir(), *EXAMPLES.iterdir()]:
        if source.suffix in (".py", ".sql"):
            (dags / source.name).symlink_to(source)
    with running_deployment(
        dsn,
        home,
        dags,
        connections,
        meta_db=META_DB,
        dag_prefix="e",
        expected_dags=len(SCENARIOS) * 2 + len(POOLED_SCENARIOS) + 5 + len(EXAMPLE_DAGS),
        fleet_dsn=fleet_dsn,
        managed_dsn=managed_dsn,
        settings=_openlineage(home),
    ) as d:
        yield d


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """A failed scenario's report carries the services' logs: in CI they are gone with the run."""
    report = yield
    deployment = getattr(item, "funcargs", {}).get("deployment")
    if report.when == "call" and report.failed and deployment is not None:
        report.sections.append(("airflow services (last lines of each log)", deployment.logs()))
    return report


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Prints a scenario's figure next to its bound, and checks the bound. Without a bound the figure is
    only reported: how long Airflow takes to schedule, retry or restart depends on the machine's load,
    not on the provider (the scenario's own waits still fail it if it never gets there)."""

    def check(name: str, value: float, bound: float | None = None) -> None:
        shown = "reported, no bound" if bound is None else f"bound {bound:.2f} s"
        print(f"\n[e2e] {request.node.name}: {name} = {value:.2f} s ({shown})")
        assert bound is None or value <= bound, f"{name} = {value:.2f} s exceeds {bound:.2f} s"

    return check
