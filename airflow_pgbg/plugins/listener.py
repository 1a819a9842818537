"""Stops a batch when a person marks its task instance (or its DAG run) failed or success in the UI.

A deferred task gets ``on_kill`` only from a trigger that runs: marked before the triggerer has
picked its trigger up, the trigger is simply deleted and the batch would run on. The API server calls
these listener hooks when a person sets a state, so the batch is stopped from there, at once, for
every task that published one (XCom ``pgbg_batch``), conditional on the claim of that very try: a
stop never reaches a batch a newer try has taken over. Started in the triggerer (Airflow 3.3), a task
marked before its trigger ran has launched nothing, and nothing is stopped.

Only state changes a person made are acted on (the worker and the scheduler call the same hooks when
a task ends by itself, and a crashed worker's retry must reconnect to its batch, not stop it). The
stop runs in a thread of its own and rides out an outage of the batch's database.
"""

from __future__ import annotations

import logging
import threading
from functools import partial
from typing import Any

from airflow_pgbg.compat import hookimpl
from airflow_pgbg.hooks.outage import DEFAULT_RECONNECT_TIMEOUT
from airflow_pgbg.identity import XCOM_BATCH_KEY, claim_try_number

log = logging.getLogger(__name__)

_MANUAL_TI = "TaskInstance's state was manually set"
_MANUAL_RUN = "Dag Run's state was manually set"


def _refs(dag_id: str, run_id: str, task_id: str | None = None, map_index: int | None = None) -> list[dict[str, Any]]:
    """The ``pgbg_batch`` XComs of a run (or of one task instance), with the try each TI is at."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        query = select(XComModel).where(
            XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.key == XCOM_BATCH_KEY
        )
        if task_id is not None:
            query = query.where(XComModel.task_id == task_id, XComModel.map_index == map_index)
        refs = []
        for row in session.scalars(query):
            ti = session.scalar(
                select(TaskInstance).where(
                    TaskInstance.dag_id == dag_id,
                    TaskInstance.run_id == run_id,
                    TaskInstance.task_id == row.task_id,
                    TaskInstance.map_index == row.map_index,
                )
            )
            ref = XComModel.deserialize_value(row)
            if ti is not None and isinstance(ref, dict) and claim_try_number(ref.get("claim")) == ti.try_number:
                refs.append(ref)
        return refs


def _stop_in_background(refs: list[dict[str, Any]], why: str) -> None:
    if refs:
        threading.Thread(target=_stop, args=(refs, why), name="pgbg-stop", daemon=True).start()


def _stop(refs: list[dict[str, Any]], why: str) -> None:
    from airflow_pgbg.hooks.pgbg import PgBackgroundHook

    for ref in refs:
        hook = PgBackgroundHook(
            postgres_conn_id=ref["postgres_conn_id"],
            database=ref.get("database"),
            engine_schema=ref.get("engine_schema") or "pgbg",
        )
        try:
            stopped = hook.through_outages(
                partial(hook.stop, ref["uuid_parent"], if_claimed_by=ref["claim"], stopped_by=why),
                DEFAULT_RECONNECT_TIMEOUT,
            )
            log.info("airflow_pgbg: stopped batch %s (%d children): %s", ref["uuid_parent"], stopped, why)
        except Exception:
            log.exception("airflow_pgbg: could not stop batch %s", ref["uuid_parent"])
        finally:
            hook.close()


def _on_marked(task_instance: Any, state: str) -> None:
    try:
        refs = _refs(task_instance.dag_id, task_instance.run_id, task_instance.task_id, task_instance.map_index)
    except Exception:
        log.exception("airflow_pgbg: could not look up the batch of %s", task_instance)
        return
    _stop_in_background(refs, f"airflow: task instance marked {state}")


@hookimpl
def on_task_instance_failed(previous_state: Any, task_instance: Any, error: Any) -> None:
    if isinstance(error, str) and error.startswith(_MANUAL_TI):
        _on_marked(task_instance, "failed")


@hookimpl
def on_task_instance_success(previous_state: Any, task_instance: Any) -> None:
    # A person's mark arrives with the ORM task instance; a task that ended by itself, with the
    # worker's runtime one (whose batch has ended anyway). Told apart without importing the ORM into
    # a worker.
    if previous_state is None and type(task_instance).__module__ == "airflow.models.taskinstance":
        _on_marked(task_instance, "success")


def _on_run_marked(dag_run: Any, msg: str, state: str) -> None:
    # Airflow 3.1/3.2 send "" for a person's mark of a whole run (3.3 names it, and also calls the
    # task-instance hooks, which then find nothing left to stop).
    if msg and not msg.startswith(_MANUAL_RUN):
        return
    try:
        refs = _refs(dag_run.dag_id, dag_run.run_id)
    except Exception:
        log.exception("airflow_pgbg: could not look up the batches of %s", dag_run)
        return
    _stop_in_background(refs, f"airflow: DAG run marked {state}")


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    _on_run_marked(dag_run, msg, "failed")


@hookimpl
def on_dag_run_success(dag_run: Any, msg: str) -> None:
    _on_run_marked(dag_run, msg, "success")
