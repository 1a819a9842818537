"""Fixtures shared by every test: a real PostgreSQL with the real pg_background, and roles on it.

The server is the one ``make db`` starts (``scripts/db.sh``), or any server named by
``PGBG_TEST_DSN``. Nothing here imitates PostgreSQL, pg_background or Airflow.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from airflow_pgbg.hooks.install import install_engine_dsn
from tests.helpers import retire_role

REPO = Path(__file__).resolve().parent.parent


def _server_dsn() -> str:
    dsn = os.environ.get("PGBG_TEST_DSN")
    if dsn:
        return dsn
    out = subprocess.run(["bash", str(REPO / "scripts" / "db.sh")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def dsn() -> str:
    """DSN of a superuser on the test server, with the engine installed in schema pgbg."""
    dsn = _server_dsn()
    install_engine_dsn(dsn)
    return dsn


@pytest.fixture(scope="session")
def launcher(dsn: str) -> str:
    """What starts the engine's runners on the test server: pg_background, or pg_cron where the
    server has no pg_background (a managed service, or ``make test``'s second pass)."""
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT pgbg._launcher()").fetchone()[0]


@pytest.fixture(autouse=True)
def _only_with_pg_background(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("pg_background_only") and request.getfixturevalue("launcher") != "pg_background":
        pytest.skip("about pg_background workers; the engine here runs on pg_cron")


@pytest.fixture
def admin(dsn: str) -> Iterator[psycopg.Connection]:
    """Autocommit superuser connection."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def make_role(dsn: str) -> Iterator[Callable[..., str]]:
    """Creates LOGIN roles for one test; returns a DSN for each. Dropped afterwards."""
    created: list[str] = []

    def make(*grants: str, prefix: str = "pgbg_t") -> str:
        name = f"{prefix}_{secrets.token_hex(4)}"
        password = secrets.token_hex(12)
        with psycopg.connect(dsn, autocommit=True) as conn:
            role = sql.Identifier(name).as_string(conn)  # a prefix may make a name that needs quotes
            conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
            for grant in grants or ("pgbg_user",):
                conn.execute(f"GRANT {grant} TO {role}")
            conn.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
        created.append(name)
        params = conninfo_to_dict(dsn)
        params.update(user=name, password=password)
        return make_conninfo(**params)

    yield make

    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in created:
            retire_role(conn, name)


@pytest.fixture
def user_dsn(make_role: Callable[..., str]) -> str:
    """A fresh ordinary role that is a member of pgbg_user."""
    return make_role()


@pytest.fixture
def user(user_dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(user_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def scratch(admin: psycopg.Connection) -> Iterator[str]:
    """A schema for test tables, usable by every role, dropped afterwards."""
    name = f"pgbg_scratch_{secrets.token_hex(4)}"
    admin.execute(f"CREATE SCHEMA {name}")
    admin.execute(f"GRANT ALL ON SCHEMA {name} TO PUBLIC")
    yield name
    admin.execute(f"DROP SCHEMA {name} CASCADE")
