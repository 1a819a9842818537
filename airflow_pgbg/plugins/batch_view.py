"""The Airflow plugin: a batch page per task instance (HTML, JSON, CSV) and its task-instance tab.

Mounted by the API server under ``/pgbg``. Every endpoint requires an Airflow user allowed to read
the DAG's task instances (Airflow's auth manager decides); the batch is found through the task
instance's ``pgbg_batch`` XCom, so a URL never names a connection or a batch directly.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Annotated, Any

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.exceptions import AirflowNotFoundException
from airflow.models.xcom import XComModel
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from airflow_pgbg.hooks.pgbg import PgBackgroundHook
from airflow_pgbg.identity import XCOM_BATCH_KEY
from airflow_pgbg.links.batch import PLUGIN_PREFIX, PgBackgroundBatchLink
from airflow_pgbg.plugins import listener
from airflow_pgbg.plugins.page import render_batch, render_message

MAX_CHILDREN = 2000
"""Children a page or download shows; the summary still counts all of them."""

CSV_COLUMNS = (
    "seq",
    "uuid_child",
    "pid",
    "status",
    "attempt",
    "query",
    "command",
    "rows",
    "sqlstate",
    "error",
    "start_time_exec",
    "end_time_exec",
    "seconds",
)

app = FastAPI(title="airflow_pgbg batch view", docs_url=None, redoc_url=None, openapi_url=None)
ReadTaskInstances = Depends(requires_access_dag("GET", DagAccessEntity.TASK_INSTANCE))
# The UI leaves "{MAP_INDEX}" unsubstituted in the tab's URL for tasks that are not mapped.
MapIndex = Annotated[str, Query(pattern=r"^(-1|\d+|\{MAP_INDEX\})$")]


def _index(map_index: str) -> int:
    return int(map_index) if map_index.lstrip("-").isdigit() else -1


class BatchNotFound(Exception):
    """A clear 404 for an unknown task instance, a try without a batch, or a purged batch."""


def _load(session: Any, dag_id: str, run_id: str, task_id: str, map_index: int) -> dict[str, Any]:
    row = session.scalars(
        XComModel.get_many(run_id=run_id, key=XCOM_BATCH_KEY, dag_ids=dag_id, task_ids=task_id, map_indexes=map_index)
    ).first()
    if row is None:
        raise BatchNotFound(
            f"No batch for task {dag_id}.{task_id} (map index {map_index}) in run {run_id}: "
            "the task instance does not exist or has not launched a batch."
        )
    ref = XComModel.deserialize_value(row)
    hook = PgBackgroundHook(
        postgres_conn_id=ref["postgres_conn_id"],
        database=ref.get("database"),
        engine_schema=ref.get("engine_schema") or "pgbg",
    )
    state = hook.poll(ref["uuid_parent"])
    if state is None:
        raise BatchNotFound(f"Batch {ref['uuid_parent']} is no longer in the database (purged?).")
    children = hook.children(state.uuid_parent, limit=MAX_CHILDREN)
    end = state.ended_at or datetime.now(UTC)
    return {
        "task_instance": {"dag_id": dag_id, "run_id": run_id, "task_id": task_id, "map_index": map_index},
        "batch": {
            "uuid_parent": state.uuid_parent,
            "status": state.status.value,
            "label": state.label,
            "children": state.children,
            "counts": state.counts_json(),
            "max_parallel": state.max_parallel,
            "started_at": state.started_at,
            "ended_at": state.ended_at,
            "wall_seconds": (end - state.started_at).total_seconds() if state.started_at else None,
        },
        "children": children,
    }


def _child_json(c: dict[str, Any]) -> dict[str, Any]:
    seconds = None
    if c["start_time_exec"] and c["end_time_exec"]:
        seconds = (c["end_time_exec"] - c["start_time_exec"]).total_seconds()
    return {
        "seq": c["seq"],
        "uuid_child": str(c["uuid_child"]),
        "pid": c["pid"],
        "status": c["status"],
        "attempt": c["attempt"],
        "query": c["query"],
        "result": c["result"],
        "sqlstate": c["sqlstate"],
        "error": c["error"],
        "error_detail": c["error_detail"],
        "error_hint": c["error_hint"],
        "start_time_exec": c["start_time_exec"],
        "end_time_exec": c["end_time_exec"],
        "seconds": seconds,
    }


@app.exception_handler(BatchNotFound)
async def _not_found(request: Request, exc: BatchNotFound) -> Response:
    if request.url.path.endswith((".json", ".csv")):
        return JSONResponse({"detail": str(exc)}, status_code=404)
    return HTMLResponse(render_message("Batch not found", str(exc)), status_code=404)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> Response:
    # The database may be unreachable; say so without a stack trace or connection details.
    message = f"Could not read the batch: {type(exc).__name__}"
    if isinstance(exc, AirflowNotFoundException):  # e.g. the connection is not defined here
        message += f": {exc}"
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate:
        message += f" (SQLSTATE {sqlstate})"
    if request.url.path.endswith((".json", ".csv")):
        return JSONResponse({"detail": message}, status_code=502)
    return HTMLResponse(render_message("Batch unavailable", message), status_code=502)


TI_PATH = "/dags/{dag_id}/runs/{run_id}/tasks/{task_id}"


@app.get(TI_PATH + ".json", dependencies=[ReadTaskInstances])
def batch_json(dag_id: str, run_id: str, task_id: str, session: SessionDep, map_index: MapIndex = "-1") -> dict:
    data = _load(session, dag_id, run_id, task_id, _index(map_index))
    return {**data, "children": [_child_json(c) for c in data["children"]]}


@app.get(TI_PATH + ".csv", dependencies=[ReadTaskInstances])
def batch_csv(dag_id: str, run_id: str, task_id: str, session: SessionDep, map_index: MapIndex = "-1") -> Response:
    data = _load(session, dag_id, run_id, task_id, _index(map_index))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for c in map(_child_json, data["children"]):
        writer.writerow({**c, "command": (c["result"] or {}).get("command"), "rows": (c["result"] or {}).get("rows")})
    name = f"pgbg-{data['batch']['uuid_parent']}.csv"
    return Response(
        out.getvalue(), media_type="text/csv", headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )


# After the .json and .csv routes: {task_id} would also match "x.json".
@app.get(TI_PATH, response_class=HTMLResponse, dependencies=[ReadTaskInstances])
def batch_page(
    request: Request, dag_id: str, run_id: str, task_id: str, session: SessionDep, map_index: MapIndex = "-1"
) -> HTMLResponse:
    data = _load(session, dag_id, run_id, task_id, _index(map_index))
    path = request.url.path
    query = f"?map_index={_index(map_index)}"
    return HTMLResponse(
        render_batch(
            data["task_instance"],
            data["batch"],
            data["children"],
            json_url=f"{path}.json{query}",
            csv_url=f"{path}.csv{query}",
        )
    )


class PgBackgroundPlugin(AirflowPlugin):
    """Registered through the ``airflow.plugins`` entry point of airflow-provider-pgbg."""

    name = "airflow_pgbg"
    # Plain class attributes: the shape AirflowPlugin reads (and its subclasses are not instantiated).
    fastapi_apps = [{"app": app, "url_prefix": PLUGIN_PREFIX, "name": "PG Background batches"}]  # noqa: RUF012
    external_views = [  # noqa: RUF012
        {
            "name": "PG Background",
            "href": PLUGIN_PREFIX
            + TI_PATH.format(dag_id="{DAG_ID}", run_id="{RUN_ID}", task_id="{TASK_ID}")
            + "?map_index={MAP_INDEX}",
            "destination": "task_instance",
            "url_route": "pgbg",
        }
    ]
    operator_extra_links = [PgBackgroundBatchLink()]  # noqa: RUF012 - AirflowPlugin's own convention
    listeners = [listener]  # noqa: RUF012
