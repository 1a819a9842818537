"""OpenLineage lineage of a batch: the tables its statements read and write, as the official SQL operators report.

Imported only when the OpenLineage provider is installed (the operator imports it lazily and treats an
ImportError as "no lineage").

Why not ``SQLParser.generate_openlineage_metadata_from_sql``, as SQLExecuteQueryOperator does: on 10,000
statements it re-splits the text with sqlparse, builds one information_schema query per side with a clause per
table, and copies the whole batch's column lineage onto every output dataset, which took 47 s and a 2.2 MB
event. Here the statements are already split, openlineage_sql parses them in one native call, and one catalog
query reads the columns of every distinct table. Column lineage is left out: the parser returns it for the
batch as a whole, not per output, so it would be wrong on every dataset as well as large.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import attrs
import openlineage_sql  # type: ignore[import-untyped]  # a native module without stubs
from airflow.providers.openlineage.extractors import OperatorLineage
from openlineage.client.event_v2 import Dataset
from openlineage.client.facet_v2 import RunFacet, extraction_error_run, schema_dataset, sql_job

#: Cap on the SQL job facet, in characters of its JSON text (what goes on the wire).
SQL_FACET_LIMIT = 100_000
#: Cap on the datasets of one event, in estimated JSON characters; with the SQL facet, Airflow's own facets and
#: the run facet below, the event stays under 1 MB.
DATASETS_LIMIT = 700_000
#: Parse errors spelled out in the extractionError facet (all of them are counted).
ERRORS_SHOWN = 20
#: Statements per call of the parser: one empty or comment-only statement makes a call raise for all of them,
#: and a chunk of this size is re-parsed statement by statement in a few ms.
CHUNK = 1_000

Query = Callable[[str, Sequence[Any]], Iterable[Sequence[Any]]]

# One round trip for every distinct table. An unqualified name is resolved as PostgreSQL resolves it (the
# search_path), and a table that does not exist (yet) comes back without columns, in current_schema(), where
# CREATE TABLE would put it. pg_catalog rather than information_schema.columns: the latter hides columns the
# role has no privilege on and is a stack of views, slow on a big catalog. typname is information_schema's
# udt_name, the type the postgres provider reports.
CATALOG_QUERY = """
WITH wanted AS (
    SELECT w.i, w.nsp, w.rel,
           to_regclass(CASE WHEN w.nsp IS NULL THEN quote_ident(w.rel)
                            ELSE quote_ident(w.nsp) || '.' || quote_ident(w.rel) END) AS relid
    FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS w(nsp, rel, i)
)
SELECT w.i::int, coalesce(n.nspname, w.nsp, current_schema())::text, a.attname::text, t.typname::text
FROM wanted w
LEFT JOIN pg_class c ON c.oid = w.relid
LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = w.relid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_type t ON t.oid = a.atttypid
ORDER BY w.i, a.attnum
"""


@attrs.define
class PgbgBatchRunFacet(RunFacet):
    """What the batch did, and what this lineage left out.

    :param batchUuid: the batch (``uuid_parent``); absent on start when it is not submitted yet.
    :param statements: statements in the batch.
    :param counts: children per status, once the batch ran.
    :param failedSqlstates: SQLSTATEs of failed, lost and stopped children, and how many of each.
    :param unparsedStatements: statements the OpenLineage SQL parser could not read (skipped for lineage).
    :param omittedInputs: input tables left out to keep the event under 1 MB.
    :param omittedOutputs: output tables left out for the same reason.
    :param omittedSqlStatements: statements left out of the SQL job facet.
    """

    batchUuid: str | None = None
    statements: int = 0
    counts: dict[str, int] = attrs.field(factory=dict)
    failedSqlstates: dict[str, int] = attrs.field(factory=dict)
    unparsedStatements: int = 0
    omittedInputs: int = 0
    omittedOutputs: int = 0
    omittedSqlStatements: int = 0

    _additional_skip_redact: ClassVar[list[str]] = ["batchUuid", "counts", "failedSqlstates"]


@attrs.define
class _Parsed:
    # (database, schema, name) as PostgreSQL folds them; schema None when the statement did not name one.
    inputs: dict[tuple[str | None, str | None, str], None] = attrs.field(factory=dict)
    outputs: dict[tuple[str | None, str | None, str], None] = attrs.field(factory=dict)
    errors: list[tuple[int, str, str]] = attrs.field(factory=list)
    unparsed: int = 0


def _fold(part: str | None, quote: str | None) -> str | None:
    # The parser keeps identifiers as written; PostgreSQL folds unquoted ones to lower case.
    return part if part is None or quote else part.lower()


def _key(table: Any) -> tuple[str | None, str | None, str]:
    q = table.quote_style
    return (_fold(table.database, q.database), _fold(table.schema, q.schema), _fold(table.name, q.name) or "")


def _parse_chunk(chunk: Sequence[str], first: int, out: _Parsed) -> None:
    try:
        metas = [(first, openlineage_sql.parse(list(chunk), dialect="postgres", default_schema=None))]
    except BaseException as exc:  # a Rust panic is a BaseException; KeyboardInterrupt must still stop us
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        metas = []
        for offset, statement in enumerate(chunk):
            try:
                metas.append(
                    (first + offset, openlineage_sql.parse([statement], dialect="postgres", default_schema=None))
                )
            except BaseException as one:
                if isinstance(one, (KeyboardInterrupt, SystemExit)):
                    raise
                out.errors.append((first + offset, f"{type(one).__name__}: {one}".splitlines()[0], statement))
    for base, meta in metas:
        for table in meta.in_tables:
            out.inputs.setdefault(_key(table))
        for table in meta.out_tables:
            out.outputs.setdefault(_key(table))
        for error in meta.errors:
            out.errors.append((base + error.index, error.message, error.origin_statement))


def parse_statements(statements: Sequence[str]) -> _Parsed:
    """Tables read and written by the statements, deduplicated, and the statements the parser could not read
    (``errors`` holds the first index of each distinct one; ``unparsed`` counts them all)."""
    # Batches often repeat a statement (a procedure called once per child): each distinct text is parsed once.
    where: dict[str, list[int]] = {}
    for index, statement in enumerate(statements):
        where.setdefault(statement, []).append(index)
    distinct = list(where)
    out = _Parsed()
    for first in range(0, len(distinct), CHUNK):
        _parse_chunk(distinct[first : first + CHUNK], first, out)
    out.unparsed = sum(len(where[distinct[i]]) for i, _, _ in out.errors)
    out.errors = [(where[distinct[i]][0], message, text) for i, message, text in out.errors]
    return out


def _json_len(text: str) -> int:
    # As Serde.to_json writes it (json.dumps escapes non-ASCII as \uXXXX, six characters for one).
    return len(json.dumps(text)) - 2


def sql_facet(statements: Sequence[str], limit: int = SQL_FACET_LIMIT) -> tuple[sql_job.SQLJobFacet, int]:
    """The batch's statements as one text of at most ``limit`` JSON characters, and how many were left out."""
    parts: list[str] = []
    used = 0
    for statement in statements:
        text = statement.rstrip(" ;\r\n\t")
        cost = _json_len(text) + 2
        if used + cost > limit - 200:  # room for the note
            break
        parts.append(text)
        used += cost
    left = len(statements) - len(parts)
    if left and not parts:
        parts.append(statements[0][: limit // 6])  # \uXXXX is the worst case of a character
        left -= 1
    query = ";\n".join(parts)
    if left:
        query += f";\n-- {left} more statement{'s' if left != 1 else ''} of this batch not shown"
    return sql_job.SQLJobFacet(query=query, dialect="postgres"), left


def _rows(query: Query | Any, sql: str, params: Sequence[Any]) -> Iterable[Sequence[Any]]:
    if callable(query):
        return query(sql, params)
    return query.execute(sql, params).fetchall()  # a psycopg connection


def _schemas(
    tables: Sequence[tuple[str | None, str]], query: Query | Any
) -> list[tuple[str, list[schema_dataset.SchemaDatasetFacetFields]]]:
    """For each (schema or None, name): the schema it resolves to and its columns (none if it does not exist)."""
    found: list[tuple[str, list[schema_dataset.SchemaDatasetFacetFields]]] = [("", []) for _ in tables]
    rows = _rows(query, CATALOG_QUERY, ([s for s, _ in tables], [n for _, n in tables]))
    for i, schema, column, type_name in rows:
        entry = found[i - 1]
        if not entry[0]:
            found[i - 1] = entry = (schema, entry[1])
        if column is not None:
            entry[1].append(schema_dataset.SchemaDatasetFacetFields(name=column, type=type_name))
    return found


def _dataset_cost(namespace: str, name: str, fields: Sequence[schema_dataset.SchemaDatasetFacetFields]) -> int:
    # As serialized: namespace and name, a schema facet with its _producer and _schemaURL (~250 characters), and
    # per column {"fields": [], "name": "", "type": ""} and a separator (40), a little over rather than under.
    cost = 65 + _json_len(namespace) + _json_len(name)
    if fields:
        cost += 250 + sum(42 + _json_len(f.name) + _json_len(f.type or "") for f in fields)
    return cost


def batch_lineage(
    statements: Sequence[str],
    *,
    host: str | None,
    port: int | None,
    database: str | None,
    query: Query | Any | None = None,
    outcome: Mapping[str, Any] | None = None,
    default_schema: str = "public",
    sql_limit: int = SQL_FACET_LIMIT,
    datasets_limit: int = DATASETS_LIMIT,
) -> OperatorLineage:
    """The lineage of a batch, for the operator's ``get_openlineage_facets_on_*``.

    :param statements: the batch's statements, already split.
    :param host: the connection's host; with ``port``, the namespace ``postgres://host:port``.
    :param port: the connection's port (5432 if None, as the postgres provider).
    :param database: the connection's database; dataset names are ``database.schema.table``.
    :param query: reads the catalog for the tables' columns: a psycopg connection, or a callable
        ``(sql, params) -> rows`` such as ``hook.get_records``. Without it (or if it fails), datasets have no
        schema facet and unqualified names are put in ``default_schema``.
    :param outcome: ``{"uuid_parent", "counts", "failed_sqlstates"}`` of a batch that ran, for the run facet.
    :param default_schema: the schema of unqualified names when the catalog cannot be read.
    """
    parsed = parse_statements(statements)
    namespace = f"postgres://{host or 'localhost'}:{port or 5432}"

    # A name with another database in it is not looked up: PostgreSQL has no cross-database references.
    local = {(s, n) for d, s, n in [*parsed.inputs, *parsed.outputs] if d is None or d == database}
    wanted = sorted(local, key=lambda t: (t[0] or "", t[1]))
    resolved: dict[tuple[str | None, str], tuple[str, list[schema_dataset.SchemaDatasetFacetFields]]] = {}
    if query is not None and wanted:
        try:
            resolved = dict(zip(wanted, _schemas(wanted, query), strict=True))
        except Exception:
            resolved = {}  # lineage never fails the task; the names alone are still lineage

    def datasets(keys: Iterable[tuple[str | None, str | None, str]]) -> list[tuple[Dataset, int]]:
        seen: dict[str, tuple[Dataset, int]] = {}
        for db, schema, name in keys:
            fields: list[schema_dataset.SchemaDatasetFacetFields] = []
            if (db is None or db == database) and (schema, name) in resolved:
                schema, fields = resolved[(schema, name)]
            full = ".".join(p for p in (db or database, schema or default_schema, name) if p)
            if full in seen:  # an unqualified name and a qualified one of the same table
                continue
            facets: dict[str, Any] = {"schema": schema_dataset.SchemaDatasetFacet(fields=fields)} if fields else {}
            seen[full] = (
                Dataset(namespace=namespace, name=full, facets=facets),
                _dataset_cost(namespace, full, fields),
            )
        return [seen[k] for k in sorted(seen)]

    # Outputs first: when the batch touches more tables than an event should carry, what it wrote matters most.
    budget = datasets_limit
    kept: dict[str, list[Dataset]] = {"outputs": [], "inputs": []}
    omitted = {"outputs": 0, "inputs": 0}
    for side, keys in (("outputs", parsed.outputs), ("inputs", parsed.inputs)):
        for dataset, cost in datasets(keys):
            if cost <= budget:
                kept[side].append(dataset)
                budget -= cost
            else:
                omitted[side] += 1

    sql, sql_left = sql_facet(statements, sql_limit)
    outcome = outcome or {}
    run_facets: dict[str, Any] = {
        "pgbg_batch": PgbgBatchRunFacet(
            batchUuid=outcome.get("uuid_parent"),
            statements=len(statements),
            counts=dict(outcome.get("counts") or {}),
            failedSqlstates=dict(outcome.get("failed_sqlstates") or {}),
            unparsedStatements=parsed.unparsed,
            omittedInputs=omitted["inputs"],
            omittedOutputs=omitted["outputs"],
            omittedSqlStatements=sql_left,
        )
    }
    if parsed.errors:
        run_facets["extractionError"] = extraction_error_run.ExtractionErrorRunFacet(
            totalTasks=len(statements),
            failedTasks=parsed.unparsed,
            errors=[
                extraction_error_run.Error(
                    errorMessage=message[:500], stackTrace=None, task=statement[:500], taskNumber=index
                )
                for index, message, statement in parsed.errors[:ERRORS_SHOWN]
            ],
        )
    return OperatorLineage(
        inputs=kept["inputs"], outputs=kept["outputs"], run_facets=run_facets, job_facets={"sql": sql}
    )
