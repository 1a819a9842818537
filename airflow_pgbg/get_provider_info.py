"""Provider metadata Airflow reads through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from airflow_pgbg import __version__

ACTION_TOKEN_TTL = 600
"""Default of ``[pgbg] action_token_ttl``: seconds a batch page's action token is valid."""


def get_provider_info() -> dict:
    return {
        "package-name": "airflow-provider-pgbg",
        "name": "PostgreSQL pg_background batches",
        "description": "Run batches of SQL statements inside PostgreSQL as pg_background workers.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "PostgreSQL pg_background",
                "external-doc-url": "https://github.com/vibhorkum/pg_background",
                "tags": ["software"],
            }
        ],
        "operators": [
            {"integration-name": "PostgreSQL pg_background", "python-modules": ["airflow_pgbg.operators.batch"]}
        ],
        "hooks": [{"integration-name": "PostgreSQL pg_background", "python-modules": ["airflow_pgbg.hooks.pgbg"]}],
        "extra-links": ["airflow_pgbg.links.batch.PgBackgroundBatchLink"],
        "plugins": [{"name": "airflow_pgbg", "plugin-class": "airflow_pgbg.plugins.batch_view.PgBackgroundPlugin"}],
        "triggers": [
            {"integration-name": "PostgreSQL pg_background", "python-modules": ["airflow_pgbg.triggers.batch"]}
        ],
        "config": {
            "pgbg": {
                "description": "Options of the PG Background batch console (airflow_pgbg's plugin).",
                "options": {
                    "action_token_ttl": {
                        "description": "Seconds the anti-forgery token of a batch page's actions (stop, "
                        "re-queue) is valid. The page renews it at half-life while it is open; an expired "
                        "token is refused.\n",
                        "version_added": "0.2.0",
                        "type": "integer",
                        "example": "300",
                        "default": str(ACTION_TOKEN_TTL),
                    }
                },
            }
        },
    }
