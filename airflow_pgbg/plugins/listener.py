"""Stops a batch when a person marks its task instance (or its DAG run) failed or success in the UI.

A deferred task gets ``on_kill`` only from a trigger that runs: marked before the triggerer has
picked its trigger up, the trigger is simply deleted and the batch would run on. The API server calls
these listener hooks when a person sets a state, so the batch is stopped from there, at once, for
every task that published one (XCom ``pgbg_batch``), conditional on the claim of that very try: a
stop never reaches a batch a newer try has taken over. It stops a batch only where the task's own
definition runs it, and only one the engine records as launched by that task instance
(:mod:`airflow_pgbg.plugins.task_batch`): an XCom that names another connection or batch is refused.
Started in the triggerer (Airflow 3.3), a task marked before its trigger ran has launched nothing,
and nothing is stopped.

Only state changes a person made are acted on (the worker and the scheduler call the same hooks when
a task ends by itself, and a crashed worker's retry must reconnect to its batch, not stop it). The
stop runs in a thread of its own and rides out an outage of the batch's database.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from airflow_pgbg.compat import hookimpl
from airflow_pgbg.hooks.outage import DEFAULT_RECONNECT_TIMEOUT
from airflow_pgbg.identity import XCOM_BATCH_KEY, claim_try_number

if TYPE_CHECKING:
    # Imported where used: this module also loads in workers, which must not import the ORM.
    from airflow_pgbg.hooks.pgbg import PgBackgroundHook
    from airflow_pgbg.plugins.task_batch import TaskBatch

log = logging.getLogger(__name__)

_MANUAL_TI = "TaskInstance's state was manually set"
_MANUAL_RUN = "Dag Run's state was manually set"


def _batches(dag_id: str, run_id: str, task_id: str | None = None, map_index: int | None = None) -> list[TaskBatch]:
    """The batches the current tries of a run (or of one task instance) published, each where its task's
    definition runs it; a ``pgbg_batch`` XCom that disagrees with the definition is refused (logged)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from airflow_pgbg.plugins.task_batch import BatchRefused, task_batch

    with create_session() as session:
        query = select(XComModel).where(
            XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.key == XCOM_BATCH_KEY
        )
        if task_id is not None:
            query = query.where(XComModel.task_id == task_id, XComModel.map_index == map_index)
        batches = []
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
            if ti is None or not isinstance(ref, dict) or claim_try_number(ref.get("claim")) != ti.try_number:
                continue
            try:
                batches.append(task_batch(session, ti, ref))
            except BatchRefused:
                continue  # logged where it was refused
        return batches


def _stop_in_background(batches: list[TaskBatch], why: str) -> None:
    if batches:
        threading.Thread(target=_stop, args=(batches, why), name="pgbg-stop", daemon=True).start()


def _stop(batches: list[TaskBatch], why: str) -> None:
    from airflow_pgbg.plugins.task_batch import BatchNotFound, BatchRefused

    for batch in batches:
        hook = batch.hook()

        def checked_stop(batch: TaskBatch = batch, hook: PgBackgroundHook = hook) -> int:
            batch.check_recorded(hook)
            return hook.stop(batch.uuid_parent, if_claimed_by=batch.claim, stopped_by=why)

        try:
            stopped = hook.through_outages(checked_stop, DEFAULT_RECONNECT_TIMEOUT)
            log.info("airflow_pgbg: stopped batch %s (%d children): %s", batch.uuid_parent, stopped, why)
        except BatchRefused:
            pass  # logged where it was refused
        except BatchNotFound as exc:
            log.info("airflow_pgbg: nothing to stop: %s", exc)
        except Exception:
            log.exception("airflow_pgbg: could not stop batch %s", batch.uuid_parent)
        finally:
            hook.close()


def _on_marked(task_instance: Any, state: str) -> None:
    try:
        batches = _batches(task_instance.dag_id, task_instance.run_id, task_instance.task_id, task_instance.map_index)
    except Exception:
        log.exception("airflow_pgbg: could not look up the batch of %s", task_instance)
        return
    _stop_in_background(batches, f"airflow: task instance marked {state}")


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
        batches = _batches(dag_run.dag_id, dag_run.run_id)
    except Exception:
        log.exception("airflow_pgbg: could not look up the batches of %s", dag_run)
        return
    _stop_in_background(batches, f"airflow: DAG run marked {state}")


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    _on_run_marked(dag_run, msg, "failed")


@hookimpl
def on_dag_run_success(dag_run: Any, msg: str) -> None:
    _on_run_marked(dag_run, msg, "success")
