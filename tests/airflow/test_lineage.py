"""OpenLineage lineage of a batch, with the real OpenLineage SQL parser and the real catalog of the test server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

pytest.importorskip("airflow.providers.openlineage")

from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.serde import Serde

from airflow_pgbg.lineage import batch_lineage


def _where(dsn: str) -> dict[str, Any]:
    p = conninfo_to_dict(dsn)
    return {"host": p.get("host"), "port": int(p.get("port") or 5432), "database": p.get("dbname")}


def _names(datasets: list[Any]) -> set[str]:
    return {d.name for d in datasets}


def _columns(dataset: Any) -> list[tuple[str, str | None]]:
    facet = (dataset.facets or {}).get("schema")
    return [(f.name, f.type) for f in facet.fields] if facet else []


def event_json(lineage: Any) -> str:
    """The lineage in a RunEvent, as the OpenLineage client serializes it for any transport."""
    event = RunEvent(
        eventType=RunState.COMPLETE,
        eventTime=datetime.now(UTC).isoformat(),
        run=Run(runId=str(uuid.uuid4()), facets=lineage.run_facets),
        job=Job(namespace="default", name="dag.task", facets=lineage.job_facets),
        producer="https://github.com/airflow-provider-pgbg",
        inputs=[InputDataset(namespace=d.namespace, name=d.name, facets=d.facets) for d in lineage.inputs],
        outputs=[OutputDataset(namespace=d.namespace, name=d.name, facets=d.facets) for d in lineage.outputs],
    )
    return Serde.to_json(event)


def test_a_batch_reads_and_writes_its_tables(admin: psycopg.Connection, dsn: str, scratch: str) -> None:
    admin.execute(f"CREATE TABLE {scratch}.b (n int, label text)")
    admin.execute(f"CREATE TABLE {scratch}.c (n int)")
    sql = [
        f"CREATE TABLE {scratch}.a AS SELECT n FROM {scratch}.b",
        f"INSERT INTO {scratch}.c SELECT n FROM {scratch}.a",
        f"VACUUM {scratch}.c",
    ]
    where = _where(dsn)
    db = where["database"]

    start = batch_lineage(sql, query=admin, **where)

    assert {d.namespace for d in start.inputs + start.outputs} == {f"postgres://{where['host']}:{where['port']}"}
    assert _names(start.inputs) == {f"{db}.{scratch}.a", f"{db}.{scratch}.b"}
    assert _names(start.outputs) == {f"{db}.{scratch}.a", f"{db}.{scratch}.c"}
    by_name = {d.name: d for d in start.inputs + start.outputs}
    assert _columns(by_name[f"{db}.{scratch}.b"]) == [("n", "int4"), ("label", "text")]
    assert _columns(by_name[f"{db}.{scratch}.c"]) == [("n", "int4")]
    # On start the batch has not created a yet: it is lineage by name, with no schema facet (not an empty one).
    assert _columns(by_name[f"{db}.{scratch}.a"]) == []
    assert "schema" not in by_name[f"{db}.{scratch}.a"].facets
    assert start.job_facets["sql"].query == ";\n".join(sql)
    facet = start.run_facets["pgbg_batch"]
    assert (facet.batchUuid, facet.statements, facet.unparsedStatements) == (None, 3, 0)
    assert "extractionError" not in start.run_facets

    for statement in sql:
        admin.execute(statement)
    outcome = {"uuid_parent": str(uuid.uuid4()), "counts": {"succeeded": 3}, "failed_sqlstates": {}}
    complete = batch_lineage(sql, query=admin, outcome=outcome, **where)

    # Once the batch ran, a exists and has the columns it was created with.
    assert _columns({d.name: d for d in complete.outputs}[f"{db}.{scratch}.a"]) == [("n", "int4")]
    facet = complete.run_facets["pgbg_batch"]
    assert (facet.batchUuid, facet.counts) == (outcome["uuid_parent"], {"succeeded": 3})


def test_names_resolve_as_postgresql_resolves_them(admin: psycopg.Connection, dsn: str, scratch: str) -> None:
    admin.execute(f'CREATE TABLE {scratch}."Mixed" (x bigint)')
    admin.execute(f"CREATE TABLE {scratch}.plain (y text)")
    where = _where(dsn)
    db = where["database"]
    sql = [
        f'INSERT INTO {scratch}."Mixed" SELECT length(y) FROM {scratch.upper()}.PLAIN',
        "INSERT INTO nowhere_table SELECT * FROM pg_class",  # unqualified: search_path, as the server does
    ]

    lineage = batch_lineage(sql, query=admin, **where)

    assert _names(lineage.inputs) == {f"{db}.{scratch}.plain", f"{db}.pg_catalog.pg_class"}
    assert _names(lineage.outputs) == {f"{db}.{scratch}.Mixed", f"{db}.public.nowhere_table"}
    assert _columns({d.name: d for d in lineage.outputs}[f"{db}.{scratch}.Mixed"]) == [("x", "int8")]


def test_statements_the_parser_cannot_read_are_counted_not_raised(admin: psycopg.Connection, dsn: str) -> None:
    sql = [
        "select 1/0",
        "this is not sql",
        "insert into t_ok select * from s_ok",
        "   ",  # alone it makes openlineage_sql raise for every statement of the call
        "-- a comment",
        "select '\ud800'",  # not encodable as UTF-8: the parser raises on the whole call
        "DO $$ BEGIN PERFORM 1; END $$",
    ]
    outcome = {
        "uuid_parent": str(uuid.uuid4()),
        "counts": {"failed": 1, "succeeded": 6},
        "failed_sqlstates": {"22012": 1},
    }

    lineage = batch_lineage(sql, query=admin, outcome=outcome, **_where(dsn))

    assert {d.name.rsplit(".", 1)[-1] for d in lineage.inputs} == {"s_ok"}
    assert {d.name.rsplit(".", 1)[-1] for d in lineage.outputs} == {"t_ok"}
    facet = lineage.run_facets["pgbg_batch"]
    assert facet.unparsedStatements == 5
    assert facet.failedSqlstates == {"22012": 1}
    errors = lineage.run_facets["extractionError"]
    assert (errors.totalTasks, errors.failedTasks) == (7, 5)
    assert sorted(e.taskNumber for e in errors.errors) == [1, 3, 4, 5, 6]
    assert len(event_json(lineage)) < 10_000


def test_without_a_catalog_the_names_are_still_lineage(dsn: str) -> None:
    def broken(sql: str, params: Any) -> Any:
        raise psycopg.OperationalError("server gone")

    lineage = batch_lineage(["insert into x.t select * from u"], query=broken, **_where(dsn))

    db = _where(dsn)["database"]
    assert _names(lineage.inputs) == {f"{db}.public.u"}
    assert _names(lineage.outputs) == {f"{db}.x.t"}


def test_ten_thousand_statements_fit_in_one_event(admin: psycopg.Connection, dsn: str, scratch: str) -> None:
    for i in range(50):
        admin.execute(f"CREATE TABLE {scratch}.src{i} (id bigint, k int, a text, b numeric, created timestamptz)")
        admin.execute(f"CREATE TABLE {scratch}.dst{i} (id bigint, k int, a text, b numeric, created timestamptz)")
    sql = [
        f"INSERT INTO {scratch}.dst{i % 50} (id, k, a, b, created) "
        f"SELECT id, k, a, b, created FROM {scratch}.src{(i * 7) % 50} WHERE k = {i}"
        for i in range(10_000)
    ]

    # How long it takes is W10 of make bench.
    lineage = batch_lineage(sql, query=admin, **_where(dsn))
    size = len(event_json(lineage).encode())

    assert len(lineage.inputs) == 50
    assert len(lineage.outputs) == 50
    assert all(len(_columns(d)) == 5 for d in lineage.inputs + lineage.outputs)
    assert size < 1_000_000, size
    facet = lineage.run_facets["pgbg_batch"]
    assert facet.omittedSqlStatements > 0
    assert facet.omittedInputs == facet.omittedOutputs == 0
    assert lineage.job_facets["sql"].query.endswith(
        f"-- {facet.omittedSqlStatements} more statements of this batch not shown"
    )


def test_too_many_tables_are_cut_and_the_cut_is_recorded(admin: psycopg.Connection, dsn: str, scratch: str) -> None:
    wide = ", ".join(f"column_with_a_long_name_{j} text" for j in range(100))
    admin.execute(
        f"DO $$ BEGIN FOR i IN 0..399 LOOP EXECUTE format('CREATE TABLE {scratch}.t%s ({wide})', i); END LOOP; END $$"
    )
    sql = [f"INSERT INTO {scratch}.t{i} SELECT * FROM {scratch}.t{(i + 1) % 400}" for i in range(400)]

    lineage = batch_lineage(sql, query=admin, **_where(dsn))

    facet = lineage.run_facets["pgbg_batch"]
    assert facet.omittedOutputs + facet.omittedInputs > 0
    assert len(lineage.outputs) + facet.omittedOutputs == 400
    assert len(lineage.inputs) + facet.omittedInputs == 400
    assert len(event_json(lineage).encode()) < 1_000_000


def test_a_repeated_statement_is_parsed_once_and_counted_each_time(dsn: str) -> None:
    sql = ["this is not sql", "insert into t_rep select * from s_rep"] * 3

    lineage = batch_lineage(sql, **_where(dsn))

    assert {d.name.rsplit(".", 1)[-1] for d in lineage.outputs} == {"t_rep"}
    assert lineage.run_facets["pgbg_batch"].unparsedStatements == 3
    errors = lineage.run_facets["extractionError"]
    assert (errors.totalTasks, errors.failedTasks) == (6, 3)
    assert [e.taskNumber for e in errors.errors] == [0]


def test_the_operator_reports_its_batch(pgbg_conn: str, user: psycopg.Connection, scratch: str) -> None:
    from airflow_pgbg.operators.batch import PgBackgroundBatchOperator

    user.execute(f"CREATE TABLE {scratch}.b (n int)")
    user.execute(f"CREATE TABLE {scratch}.c (n int)")
    user.execute(f"INSERT INTO {scratch}.b VALUES (1), (2)")
    sql = [
        f"CREATE TABLE {scratch}.a AS SELECT n FROM {scratch}.b",
        f"INSERT INTO {scratch}.c SELECT n FROM {scratch}.a",
        "SELECT 1/0",
    ]
    op = PgBackgroundBatchOperator(task_id="t", sql=sql, postgres_conn_id="pgbg_test", max_parallel=1)
    p = conninfo_to_dict(pgbg_conn)
    db = p["dbname"]

    start = op.get_openlineage_facets_on_start()

    assert {d.namespace for d in start.inputs} == {f"postgres://{p['host']}:{p['port']}"}
    assert _names(start.inputs) == {f"{db}.{scratch}.a", f"{db}.{scratch}.b"}
    assert _names(start.outputs) == {f"{db}.{scratch}.a", f"{db}.{scratch}.c"}
    assert start.run_facets["pgbg_batch"].batchUuid is None

    op.uuid_parent = op.hook.launch(op.statements(), max_parallel=1)
    op.hook.wait(op.uuid_parent, 60)
    failed = op.get_openlineage_facets_on_failure(None)

    facet = failed.run_facets["pgbg_batch"]
    assert facet.batchUuid == op.uuid_parent
    assert facet.counts["failed"] == 1
    assert facet.failedSqlstates == {"22012": 1}
    assert _columns({d.name: d for d in failed.outputs}[f"{db}.{scratch}.a"]) == [("n", "int4")]


def test_without_the_openlineage_provider_nothing_of_it_is_imported() -> None:
    script = (
        "import sys\n"
        "from airflow_pgbg.operators.batch import PgBackgroundBatchOperator\n"
        "lazy = [m for m in ('airflow_pgbg.lineage', 'openlineage_sql', 'openlineage.client') if m in sys.modules]\n"
        "assert not lazy, lazy\n"
        # Airflow itself loads every installed provider's metadata, so the parser stands for the missing provider.
        "sys.modules['openlineage_sql'] = None\n"
        "op = PgBackgroundBatchOperator(task_id='t', sql='select 1', postgres_conn_id='nowhere')\n"
        "assert op.get_openlineage_facets_on_start() is None\n"
        "assert op.get_openlineage_facets_on_complete(None) is None\n"
        "assert 'airflow_pgbg.lineage' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[2])


def test_a_task_openlineage_reports_starts_and_ends_on_a_worker(tmp_path: Path) -> None:
    # Configured as a user would, in a process of its own (the provider reads its configuration once).
    policy = [
        {"scope": {}, "controls": {"emit": False}},
        {"scope": {"dag_id": "reported"}, "controls": {"emit": True}},
    ]
    env = {
        **os.environ,
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "file", "log_file_path": str(tmp_path / "ol.jsonl")}),
        "AIRFLOW__OPENLINEAGE__EMISSION_POLICY": json.dumps(policy),
    }
    script = (
        "from airflow.sdk import DAG\n"
        "from airflow_pgbg.compat import CAN_START_FROM_TRIGGER\n"
        "from airflow_pgbg.operators.batch import PgBackgroundBatchOperator\n"
        "with DAG('reported', schedule=None):\n"
        "    reported = PgBackgroundBatchOperator(task_id='t', sql='select 1', deferrable=True)\n"
        "with DAG('quiet', schedule=None):\n"
        "    quiet = PgBackgroundBatchOperator(task_id='t', sql='select 1', deferrable=True)\n"
        "assert reported._reported_lineage and not quiet._reported_lineage\n"
        "assert reported._resume_on_success() and not quiet._resume_on_success()\n"
        "if CAN_START_FROM_TRIGGER:\n"
        "    assert not reported.start_from_trigger, 'the listener must see its start'\n"
        "    assert quiet.start_from_trigger\n"
        "    assert quiet.start_trigger_args.trigger_kwargs['resume_on_failure'] is False\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env)
