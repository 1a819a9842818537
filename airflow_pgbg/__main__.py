"""Command line: ``python -m airflow_pgbg install --dsn ...`` and ``python -m airflow_pgbg sql``."""

from __future__ import annotations

import argparse
import sys

from airflow_pgbg.hooks.install import (
    LAUNCHERS,
    EngineInstallError,
    SqlScripts,
    install_engine_dsn,
    render,
    roles_sql,
)
from airflow_pgbg.status import DEFAULT_SCHEMA


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m airflow_pgbg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="install or upgrade the engine in a database (idempotent)")
    inst.add_argument(
        "--dsn", required=True, help="libpq connection string of a role that may create extensions and roles"
    )
    inst.add_argument("--schema", default=DEFAULT_SCHEMA)
    inst.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="auto",
        help="what starts the runners: pg_background workers, pg_cron jobs (managed services), or auto: "
        "the installed one, else pg_background where available, else pg_cron",
    )
    show = sub.add_parser("sql", help="print the SQL a fresh install runs, for review or psql -f")
    show.add_argument("--schema", default=DEFAULT_SCHEMA)
    show.add_argument("--extension-schema", default="public", help="schema holding pg_background")
    args = parser.parse_args(argv)

    if args.command == "sql":
        scripts = SqlScripts.load()
        print(roles_sql())
        print(f"CREATE SCHEMA IF NOT EXISTS {args.schema};")
        for version, sql in scripts.plan(None):
            print(render(sql, args.schema, args.extension_schema))
            print(
                f"INSERT INTO {args.schema}.meta (version) VALUES ('{version}') "
                "ON CONFLICT (singleton) DO UPDATE SET version = excluded.version;"
            )
        return 0
    try:
        version = install_engine_dsn(args.dsn, args.schema, launcher=args.launcher)
    except EngineInstallError as exc:
        print(f"airflow_pgbg: {exc}", file=sys.stderr)
        return 2
    print(f"airflow_pgbg engine {version} installed in schema {args.schema}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
