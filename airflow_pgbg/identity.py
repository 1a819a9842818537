"""How an Airflow task instance and its tries are named in the engine, and in XCom.

A batch records its task instance as ``origin``, so a new try finds it in the database itself; each
try *claims* the batch, and its kills are conditional on that claim (see ``pg_background_submit`` and
``pg_background_stop``).
"""

from __future__ import annotations

from typing import Any

XCOM_BATCH_KEY = "pgbg_batch"
"""XCom key under which a try publishes its batch (parent UUID, connection id, claim)."""

BATCH_LOCATION_FIELDS = ("postgres_conn_id", "database", "engine_schema")
"""Where a task's batches live: operator arguments that the serialized DAG keeps, and keys of the XCom."""

EARLIER_TRIGGER_GRACE = 60.0
"""Seconds a new try waits for a trigger of an earlier try to go before it takes the batch over."""


def batch_origin(dag_id: str, run_id: str, task_id: str, map_index: int | None) -> str:
    """The engine's ``origin`` of a task instance's batches: ``dag/run/task/map_index``."""
    return f"{dag_id}/{run_id}/{task_id}/{-1 if map_index is None else map_index}"


def origin_of(ti: Any) -> str:
    return batch_origin(ti.dag_id, ti.run_id, ti.task_id, ti.map_index)


def try_claim(try_number: int, *, deferred: bool) -> str:
    """The claim of one try. A deferred try waits from the triggerer, where only a person ends a wait
    (mark, clear): a newer try that takes its batch over stops and requeues the running children."""
    return f"try {try_number}{' deferred' if deferred else ''}"


def claim_try_number(claim: str | None) -> int | None:
    """The try number in a claim made by :func:`try_claim`, or None."""
    if not claim or not claim.startswith("try "):
        return None
    number = claim.split()[1]
    return int(number) if number.isdigit() else None


def batch_ref(
    uuid_parent: str, postgres_conn_id: str, database: str | None, engine_schema: str, claim: str | None
) -> dict[str, Any]:
    """The ``pgbg_batch`` XCom value: where the batch page and the listener find the batch."""
    return {
        "uuid_parent": uuid_parent,
        "postgres_conn_id": postgres_conn_id,
        "database": database,
        "engine_schema": engine_schema,
        "claim": claim,
    }
