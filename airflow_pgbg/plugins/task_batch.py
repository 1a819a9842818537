"""The batch of a task instance as Airflow holds the task: what the console and the listener act on.

A try publishes its batch under the XCom ``pgbg_batch``, but any task's code can write an XCom under
that key. So the Airflow connection, database and engine schema come from the task's serialized
definition (the DAG version the task instance ran), never from the XCom; the XCom only says which
batch, and must name the same connection, database and schema; and the batch must be recorded in that
engine with this very task instance as its ``origin``. Anything else is refused, and logged, before a
page, an action or a stop reaches a database.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from airflow.models.serialized_dag import SerializedDagModel
from airflow.models.taskinstance import TaskInstance
from airflow.models.xcom import XComModel
from sqlalchemy import select

from airflow_pgbg.hooks.pgbg import PgBackgroundHook
from airflow_pgbg.identity import BATCH_LOCATION_FIELDS, XCOM_BATCH_KEY, batch_origin
from airflow_pgbg.operators.batch import PgBackgroundBatchOperator
from airflow_pgbg.status import DEFAULT_SCHEMA

log = logging.getLogger(__name__)


class BatchNotFound(Exception):
    """A clear 404: an unknown task instance, a try without a batch, or a purged batch."""


class BatchRefused(Exception):
    """The batch reference a task instance published disagrees with what Airflow holds for the task."""


def describe(dag_id: str, run_id: str, task_id: str, map_index: int) -> str:
    return f"task {dag_id}.{task_id} (map index {map_index}) in run {run_id}"


def _refuse(what: str, reason: str) -> BatchRefused:
    # The API server's log is where an operator of the deployment sees that a task tried it.
    log.warning("airflow_pgbg: refused the batch of %s: %s", what, reason)
    return BatchRefused(f"Refused the batch of {what}: {reason}")


@dataclass(frozen=True)
class Location:
    """Where a task's batches run: an Airflow connection, a database overriding its own, a schema."""

    postgres_conn_id: str
    database: str | None
    engine_schema: str

    def __str__(self) -> str:
        database = repr(self.database) if self.database else "the connection's own"
        return f"connection {self.postgres_conn_id!r}, database {database}, engine schema {self.engine_schema!r}"


@dataclass(frozen=True)
class TaskBatch:
    """A task instance's batch, at the location the task's definition names."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    location: Location
    uuid_parent: str
    claim: str | None

    @property
    def what(self) -> str:
        return describe(self.dag_id, self.run_id, self.task_id, self.map_index)

    def hook(self) -> PgBackgroundHook:
        return PgBackgroundHook(
            postgres_conn_id=self.location.postgres_conn_id,
            database=self.location.database,
            engine_schema=self.location.engine_schema,
        )

    def check_recorded(self, hook: PgBackgroundHook) -> None:
        """The engine must have recorded this task instance as the batch's origin: an XCom may name any
        batch the connection's role can see, another task's too."""
        recorded = hook.recorded_origin(self.uuid_parent)
        if recorded is None:
            raise BatchNotFound(
                f"Batch {self.uuid_parent} of {self.what} is not in the database at {self.location} (purged?)."
            )
        expected = batch_origin(self.dag_id, self.run_id, self.task_id, self.map_index)
        if recorded != expected:
            raise _refuse(
                self.what,
                f"batch {self.uuid_parent} was launched by {recorded!r} according to the engine, not by this "
                "task instance",
            )


# (DAG version, its hash, task id) -> the location, or why there is none. A version's definition can be
# rewritten in place (with a new hash), never without one.
_DEFINED: OrderedDict[tuple[str, str, str], Location | str] = OrderedDict()
_DEFINED_LOCK = threading.Lock()
_DEFINED_MAX = 512


def defined_location(session: Any, ti: Any) -> Location:
    """Where the task's batches run according to its serialized definition, in the DAG version that
    this task instance ran; raises :class:`BatchRefused` when the definition does not decide it."""
    what = describe(ti.dag_id, ti.run_id, ti.task_id, ti.map_index)
    version_id = getattr(ti, "dag_version_id", None)
    dag_hash = (
        session.scalar(select(SerializedDagModel.dag_hash).where(SerializedDagModel.dag_version_id == version_id))
        if version_id is not None
        else None
    )
    if dag_hash is None:
        raise _refuse(what, "Airflow holds no serialized definition of the DAG version it ran")
    key = (str(version_id), dag_hash, ti.task_id)
    with _DEFINED_LOCK:
        found = _DEFINED.get(key)
    if found is None:
        serialized = session.scalar(select(SerializedDagModel).where(SerializedDagModel.dag_version_id == version_id))
        found = _location_in(serialized.dag, ti.task_id)
        with _DEFINED_LOCK:
            _DEFINED[key] = found
            while len(_DEFINED) > _DEFINED_MAX:
                _DEFINED.popitem(last=False)
    if isinstance(found, str):
        raise _refuse(what, found)
    return found


def _location_in(dag: Any, task_id: str) -> Location | str:
    """The location a serialized task names, or why it names none."""
    if not dag.has_task(task_id):
        return "the task is not in its DAG's definition"
    task = dag.get_task(task_id)
    if not getattr(task, "is_mapped", False):
        given = {f: getattr(task, f, None) for f in BATCH_LOCATION_FIELDS}
        if not given["postgres_conn_id"]:
            return (
                "its definition names no connection: it is not a PgBackgroundBatchOperator, or its DAG was "
                "parsed by an airflow_pgbg older than this one (it is again at its next parse)"
            )
        return Location(given["postgres_conn_id"], given["database"], given["engine_schema"] or DEFAULT_SCHEMA)
    given = dict(getattr(task, "partial_kwargs", None) or {})
    mapped = _mapped_keys(task)
    # expand_kwargs() with an upstream task's output decides its keys at run time; strict (the default)
    # forbids them to override what partial() was given.
    locked = bool(getattr(task, "_disallow_kwargs_override", False))
    unknown = [
        f
        for f in BATCH_LOCATION_FIELDS
        if (mapped is not None and f in mapped) or (mapped is None and not (locked and f in given))
    ]
    if unknown:
        how = "it is mapped over" if mapped is not None else "its expand_kwargs() may set at run time"
        return (
            f"{how} {', '.join(unknown)}, which its definition then does not fix per task instance: "
            f"give {', '.join(unknown)} to partial() to open its batches here"
        )
    ours = (getattr(task, "_task_module", None), getattr(task, "task_type", None)) == (
        PgBackgroundBatchOperator.__module__,
        PgBackgroundBatchOperator.__name__,
    )
    if "postgres_conn_id" not in given and not ours:
        return "its definition names no connection (give postgres_conn_id to partial())"
    return Location(
        given.get("postgres_conn_id") or PgBackgroundHook.default_conn_name,
        given.get("database"),
        given.get("engine_schema") or DEFAULT_SCHEMA,
    )


def _mapped_keys(task: Any) -> set[str] | None:
    """The arguments a mapped task is expanded over, when its definition says; else None."""
    value = getattr(getattr(task, "expand_input", None), "value", None)
    if isinstance(value, dict):
        return set(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, dict) for v in value):
        return set().union(*value)
    return None


def task_batch(session: Any, ti: Any, ref: Any) -> TaskBatch:
    """The batch a task instance published (``ref``, its XCom), checked against its definition."""
    what = describe(ti.dag_id, ti.run_id, ti.task_id, ti.map_index)
    if not isinstance(ref, dict):
        raise _refuse(what, f"its {XCOM_BATCH_KEY} XCom is not a batch reference")
    location = defined_location(session, ti)
    published = Location(
        str(ref.get("postgres_conn_id") or ""), ref.get("database"), ref.get("engine_schema") or DEFAULT_SCHEMA
    )
    if published != location:
        raise _refuse(
            what,
            f"its {XCOM_BATCH_KEY} XCom names {published}, but the task is defined with {location}; "
            "batches are read and stopped only where the task's definition runs them",
        )
    try:
        uuid_parent = str(uuid.UUID(str(ref.get("uuid_parent"))))
    except ValueError:
        raise _refuse(what, f"its {XCOM_BATCH_KEY} XCom names no batch UUID") from None
    return TaskBatch(ti.dag_id, ti.run_id, ti.task_id, ti.map_index, location, uuid_parent, ref.get("claim"))


def find_task_batch(session: Any, dag_id: str, run_id: str, task_id: str, map_index: int) -> TaskBatch:
    """The batch of one task instance, for the console: a 404 for what does not exist."""
    row = session.scalars(
        XComModel.get_many(run_id=run_id, key=XCOM_BATCH_KEY, dag_ids=dag_id, task_ids=task_id, map_indexes=map_index)
    ).first()
    ti = session.scalar(
        select(TaskInstance).where(
            TaskInstance.dag_id == dag_id,
            TaskInstance.run_id == run_id,
            TaskInstance.task_id == task_id,
            TaskInstance.map_index == map_index,
        )
    )
    if row is None or ti is None:
        raise BatchNotFound(
            f"No batch for task {dag_id}.{task_id} (map index {map_index}) in run {run_id}: "
            "the task instance does not exist or has not launched a batch."
        )
    return task_batch(session, ti, XComModel.deserialize_value(row))
