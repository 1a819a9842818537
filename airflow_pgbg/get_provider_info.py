"""Provider metadata Airflow reads through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from airflow_pgbg import __version__


def get_provider_info() -> dict:
    return {
        "package-name": "airflow-provider-pgbg",
        "name": "PostgreSQL pg_background batches",
        "description": "Run batches of SQL statements inside PostgreSQL as pg_background workers.",
        "versions": [__version__],
    }
