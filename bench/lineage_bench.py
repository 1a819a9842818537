"""W10 of make bench: lineage of a 10,000-statement batch, time to build it and size of the event it goes in.

    PGBG_TEST_DSN=postgresql://... .venv/bin/python bench/lineage_bench.py [--statements N] [--tables N] [--provider]

The batch is N distinct ``INSERT INTO dstX (...) SELECT ... FROM srcY WHERE k = i`` over 2 x ``--tables`` tables of
five columns, made in a schema of its own that is dropped afterwards. ``--provider`` also times the OpenLineage
provider's ``SQLParser.generate_openlineage_metadata_from_sql`` (what SQLExecuteQueryOperator does) on the same
batch of five named columns, for comparison; it takes minutes.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from airflow_pgbg.lineage import batch_lineage, parse_statements
from tests.airflow.test_lineage import event_json

SHAPES = {
    "named": "(id, k, a, b, created) SELECT id, k, a, b, created",
    "star": "SELECT *",
}


def batches(schema: str, statements: int, tables: int) -> dict[str, list[str]]:
    return {
        shape: [
            f"INSERT INTO {schema}.dst{i % tables} {middle} FROM {schema}.src{(i * 7) % tables} WHERE k = {i}"
            for i in range(statements)
        ]
        for shape, middle in SHAPES.items()
    }


def w10(
    dsn: str, statements: int = 10_000, tables: int = 50, runs: int = 5, compare: bool = False
) -> dict[str, object]:
    """W10: the lineage of a 10,000-statement batch (five named columns, and SELECT *): median build time
    (parse, one catalog query, facets) and the size of the event it goes in."""
    p = conninfo_to_dict(dsn)
    where = {"host": p.get("host"), "port": int(p.get("port") or 5432), "database": p.get("dbname")}
    schema = f"pgbg_lineage_bench_{secrets.token_hex(4)}"
    r: dict[str, object] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        try:
            for i in range(tables):
                for side in ("src", "dst"):
                    conn.execute(
                        f"CREATE TABLE {schema}.{side}{i} (id bigint, k int, a text, b numeric, created timestamptz)"
                    )
            for shape, sql in batches(schema, statements, tables).items():
                parse_ms, total_ms = [], []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    parse_statements(sql)
                    t1 = time.perf_counter()
                    lineage = batch_lineage(sql, query=conn, **where)
                    t2 = time.perf_counter()
                    parse_ms.append((t1 - t0) * 1000)
                    total_ms.append((t2 - t1) * 1000)
                r[f"w10_lineage_{shape}_ms"] = statistics.median(total_ms)
                r[f"w10_lineage_{shape}_parser_ms"] = statistics.median(parse_ms)
                r[f"w10_lineage_{shape}_event_bytes"] = len(event_json(lineage).encode())
                if compare and shape == "named":
                    r.update(provider(sql, where, dsn))
        finally:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
    r["w10_statements"] = statements
    return r


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--statements", type=int, default=10_000)
    args.add_argument("--tables", type=int, default=50)
    args.add_argument("--runs", type=int, default=5)
    args.add_argument("--provider", action="store_true")
    opts = args.parse_args()
    figures = w10(os.environ["PGBG_TEST_DSN"], opts.statements, opts.tables, opts.runs, opts.provider)
    for key, value in figures.items():
        print(f"{key:36} {value:.1f}" if isinstance(value, float) else f"{key:36} {value}")


def provider(sql: list[str], where: dict, dsn: str) -> dict[str, float | int]:
    from airflow.providers.openlineage.extractors import OperatorLineage
    from airflow.providers.openlineage.sqlparser import DatabaseInfo, SQLParser

    class Hook:  # what SQLParser needs of a DbApiHook: a DB-API connection
        def get_conn(self) -> psycopg.Connection:
            return psycopg.connect(dsn)

    info = DatabaseInfo(scheme="postgres", authority=f"{where['host']}:{where['port']}", database=where["database"])
    t0 = time.perf_counter()
    lineage: OperatorLineage = SQLParser(
        dialect="postgres", default_schema="public"
    ).generate_openlineage_metadata_from_sql(sql=sql, hook=Hook(), database_info=info, database=where["database"])
    took = time.perf_counter() - t0
    return {"w10_provider_named_ms": took * 1000, "w10_provider_named_event_bytes": len(event_json(lineage).encode())}


if __name__ == "__main__":
    main()
