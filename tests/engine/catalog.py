"""The installed engine as data, to compare two installations (a fresh one and an upgraded one)."""

from __future__ import annotations

from typing import Any

import psycopg

QUERIES = {
    "columns": """
        SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid), col_description(c.oid, a.attnum)
          FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
          LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
         WHERE c.relnamespace = %(s)s::regnamespace AND a.attnum > 0 AND NOT a.attisdropped""",
    "relations": """
        SELECT c.relname, c.relkind, c.relrowsecurity, obj_description(c.oid, 'pg_class'), c.relacl::text
          FROM pg_class c WHERE c.relnamespace = %(s)s::regnamespace""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
          FROM pg_constraint WHERE connamespace = %(s)s::regnamespace""",
    "indexes": """SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %(s)s""",
    "policies": """
        SELECT tablename, policyname, permissive, cmd, roles::text, qual, with_check
          FROM pg_policies WHERE schemaname = %(s)s""",
    "routines": """
        SELECT p.oid::regprocedure::text, p.prokind, l.lanname, p.provolatile, p.prosecdef,
               pg_get_function_result(p.oid), p.proconfig::text, p.prosrc, obj_description(p.oid, 'pg_proc'),
               p.proacl::text
          FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang WHERE p.pronamespace = %(s)s::regnamespace""",
    "types": """
        SELECT t.typname, t.typtype, obj_description(t.oid, 'pg_type'),
               (SELECT array_agg(e.enumlabel ORDER BY e.enumsortorder) FROM pg_enum e WHERE e.enumtypid = t.oid)::text
          FROM pg_type t WHERE t.typnamespace = %(s)s::regnamespace AND t.typtype IN ('c', 'e')
           AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.typrelid AND c.relkind <> 'c')""",
    "views": """SELECT viewname, definition FROM pg_views WHERE schemaname = %(s)s""",
    "triggers": """
        SELECT t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid)
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = %(s)s::regnamespace AND NOT t.tgisinternal""",
}


def catalog(dsn: str, schema: str = "pgbg") -> dict[str, set[tuple[Any, ...]]]:
    with psycopg.connect(dsn) as conn:
        return {
            name: {tuple(row) for row in conn.execute(query, {"s": schema}).fetchall()}
            for name, query in QUERIES.items()
        }
