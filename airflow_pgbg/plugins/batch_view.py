"""The Airflow plugin: the batch console per task instance (HTML, JSON, CSV) and its task-instance tab.

Mounted by the API server under ``/pgbg``. Every endpoint requires an Airflow user allowed to read
the DAG's task instances (Airflow's auth manager decides); a URL names a task instance, never a
connection or a batch: the batch is the one its try published (``pgbg_batch`` XCom), read where the
task's own definition runs it (:mod:`airflow_pgbg.plugins.task_batch`). Pages of
children are cut, sorted and filtered by the engine (``pg_background_children_page``), so what a
request costs does not grow with the batch; result previews load one child at a time.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from airflow.configuration import conf
from airflow.exceptions import AirflowNotFoundException
from airflow.models.taskinstance import TaskInstance
from airflow.plugins_manager import AirflowPlugin
from fastapi import Body, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from sqlalchemy import select

from airflow_pgbg.get_provider_info import ACTION_TOKEN_TTL
from airflow_pgbg.hooks.pgbg import PgBackgroundHook
from airflow_pgbg.links.batch import PLUGIN_PREFIX, PgBackgroundBatchLink
from airflow_pgbg.plugins import listener
from airflow_pgbg.plugins.page import render_batch, render_message
from airflow_pgbg.plugins.task_batch import BatchNotFound, BatchRefused, find_task_batch
from airflow_pgbg.status import CONSOLE_SORTS, PROBLEM_STATUSES, ChildStatus

PER_PAGE = 100
"""Children on a page unless the request says otherwise."""
MAX_PER_PAGE = 1000
TIMELINE_BINS = 60

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
# Stopping or re-queueing children changes the task's outcome: the permission to edit task instances.
EditTaskInstances = Depends(requires_access_dag("PUT", DagAccessEntity.TASK_INSTANCE))
# The UI leaves "{MAP_INDEX}" unsubstituted in the tab's URL for tasks that are not mapped.
MapIndex = Annotated[str, Query(pattern=r"^(-1|\d+|\{MAP_INDEX\})$")]


def _index(map_index: str) -> int:
    return int(map_index) if map_index.lstrip("-").isdigit() else -1


class BadView(Exception):
    """A clear 400 for a sort, filter or page the console does not know."""


@dataclass(frozen=True)
class View:
    """What a request asks to see of the children; the defaults put problems first in a failed batch."""

    status: list[str] | None
    q: str | None
    sqlstate: str | None
    sort: str
    order: str
    page: int
    per_page: int
    matching: int = 0
    pages: int = 1

    def params(self, **changes: Any) -> dict[str, str]:
        v = {**asdict(self), **changes}
        out = {"status": ",".join(v["status"] or []), "q": v["q"] or "", "sqlstate": v["sqlstate"] or ""}
        out |= {"sort": v["sort"], "order": v["order"], "page": str(v["page"]), "per_page": str(v["per_page"])}
        return {k: val for k, val in out.items() if val}


def _positive(name: str, raw: str | None, default: int, high: int | None = None) -> int:
    if raw in (None, ""):
        return default
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1 or (high is not None and int(raw) > high):
        raise BadView(f"{name} must be a whole number from 1{f' to {high}' if high else ''}, not {raw!r}")
    return int(raw)


def _view(params: dict[str, str | None], batch_status: str) -> View:
    status = [s for s in (params.get("status") or "").split(",") if s] or None
    known = [s.value for s in ChildStatus]
    for s in status or []:
        if s not in known:
            raise BadView(f"unknown status {s!r}: one of {', '.join(known)}")
    sqlstate = (params.get("sqlstate") or "").strip().upper() or None
    if sqlstate is not None and not (len(sqlstate) == 5 and sqlstate.isalnum()):
        raise BadView(f"a SQLSTATE is five letters or digits, not {sqlstate!r}")
    problems_first = batch_status in PROBLEM_STATUSES
    sort = params.get("sort") or ("status" if problems_first else "seq")
    if sort not in CONSOLE_SORTS:
        raise BadView(f"unknown sort {sort!r}: one of {', '.join(CONSOLE_SORTS)}")
    order = params.get("order") or ("desc" if problems_first and not params.get("sort") else "asc")
    if order not in ("asc", "desc"):
        raise BadView(f"order is asc or desc, not {order!r}")
    text = params.get("q") or None
    if text is not None and len(text) > 200:
        raise BadView("the query filter is at most 200 characters")
    return View(
        status=status,
        q=text,
        sqlstate=sqlstate,
        sort=sort,
        order=order,
        page=_positive("page", params.get("page"), 1),
        per_page=_positive("per_page", params.get("per_page"), PER_PAGE, MAX_PER_PAGE),
    )


def _open_batch(session: Any, dag_id: str, run_id: str, task_id: str, map_index: int) -> tuple[PgBackgroundHook, str]:
    """A hook on the task instance's batch, where its definition runs it, once the engine confirmed it."""
    found = find_task_batch(session, dag_id, run_id, task_id, map_index)
    hook = found.hook()
    try:
        found.check_recorded(hook)
    except Exception:
        hook.close()
        raise
    return hook, found.uuid_parent


def _batch(hook: PgBackgroundHook, uuid_parent: str) -> dict[str, Any]:
    state = hook.poll(uuid_parent)
    if state is None:
        raise BatchNotFound(f"Batch {uuid_parent} is no longer in the database (purged?).")
    end = state.ended_at or datetime.now(UTC)
    return {
        "uuid_parent": state.uuid_parent,
        "status": state.status.value,
        "label": state.label,
        "children": state.children,
        "counts": state.counts_json(),
        "max_parallel": state.max_parallel,
        "settings": state.settings or {},
        "notes": hook.batch_notes(state.uuid_parent),
        "started_at": state.started_at,
        "ended_at": state.ended_at,
        "wall_seconds": (end - state.started_at).total_seconds() if state.started_at else None,
    }


def _load(
    session: Any, dag_id: str, run_id: str, task_id: str, map_index: int, params: dict[str, str | None]
) -> dict[str, Any]:
    hook, uuid_parent = _open_batch(session, dag_id, run_id, task_id, map_index)
    try:
        batch = _batch(hook, uuid_parent)
        view = _view(params, batch["status"])
        matching, rows = hook.children_page(
            batch["uuid_parent"],
            statuses=view.status,
            text=view.q,
            sqlstate=view.sqlstate,
            sort=view.sort,
            descending=view.order == "desc",
            limit=view.per_page,
            offset=(view.page - 1) * view.per_page,
        )
        pages = max(1, -(-matching // view.per_page))
        if view.page > pages:
            raise BadView(f"page {view.page} is past the last page, {pages}, of the {matching} matching children")
        figures = hook.figures(batch["uuid_parent"], TIMELINE_BINS)
        progress = hook.progress(batch["uuid_parent"]) if batch["counts"]["running"] else {}
    finally:
        hook.close()
    return {
        "task_instance": {"dag_id": dag_id, "run_id": run_id, "task_id": task_id, "map_index": map_index},
        "batch": batch,
        "figures": figures,
        "view": View(**{**asdict(view), "matching": matching, "pages": pages}),
        "children_rows": [{**c, "progress": progress.get(str(c["uuid_child"]))} for c in rows],
    }


def _child_json(c: dict[str, Any]) -> dict[str, Any]:
    return {
        "seq": c["seq"],
        "uuid_child": str(c["uuid_child"]),
        "status": c["status"],
        "attempt": c["attempt"],
        "query": c["query"],
        "query_length": c["query_length"],
        "command": c["command"],
        "rows": c["row_count"],
        "has_preview": c["has_preview"],
        "sqlstate": c["sqlstate"],
        "error": c["error"],
        "error_detail": c["error_detail"],
        "error_hint": c["error_hint"],
        "stopped_by": c["stopped_by"],
        "queued_time": c["queued_time"],
        "start_time_exec": c["start_time_exec"],
        "end_time_exec": c["end_time_exec"],
        "queue_seconds": c["queue_seconds"],
        "seconds": c["run_seconds"],
        "progress": c.get("progress"),
    }


def _as_json(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "task_instance": data["task_instance"],
        "batch": data["batch"],
        "figures": data["figures"],
        "view": asdict(data["view"]),
        "children": [_child_json(c) for c in data["children_rows"]],
    }


def _api(request: Request) -> bool:
    return request.url.path.endswith((".json", ".csv"))


@app.exception_handler(BatchNotFound)
async def _not_found(request: Request, exc: BatchNotFound) -> Response:
    if _api(request):
        return JSONResponse({"detail": str(exc)}, status_code=404)
    return HTMLResponse(render_message("Batch not found", str(exc)), status_code=404)


@app.exception_handler(BatchRefused)
async def _refused(request: Request, exc: BatchRefused) -> Response:
    if _api(request):
        return JSONResponse({"detail": str(exc)}, status_code=409)
    return HTMLResponse(render_message("Batch reference refused", str(exc)), status_code=409)


@app.exception_handler(BadView)
async def _bad_view(request: Request, exc: BadView) -> Response:
    if _api(request):
        return JSONResponse({"detail": str(exc)}, status_code=400)
    return HTMLResponse(render_message("Cannot show that", str(exc)), status_code=400)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> Response:
    # The database may be unreachable; say so without a stack trace or connection details.
    message = f"Could not read the batch: {type(exc).__name__}"
    if isinstance(exc, AirflowNotFoundException):  # e.g. the connection is not defined here
        message += f": {exc}"
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate:
        message += f" (SQLSTATE {sqlstate})"
    if _api(request):
        return JSONResponse({"detail": message}, status_code=502)
    return HTMLResponse(render_message("Batch unavailable", message), status_code=502)


TI_PATH = "/dags/{dag_id}/runs/{run_id}/tasks/{task_id}"


def _params(request: Request) -> dict[str, str | None]:
    return {k: request.query_params.get(k) for k in ("status", "q", "sqlstate", "sort", "order", "page", "per_page")}


@app.get(TI_PATH + ".json", dependencies=[ReadTaskInstances])
def batch_json(
    request: Request, dag_id: str, run_id: str, task_id: str, session: SessionDep, map_index: MapIndex = "-1"
) -> dict:
    return _as_json(_load(session, dag_id, run_id, task_id, _index(map_index), _params(request)))


@app.get(TI_PATH + "/children/{uuid_child}.json", dependencies=[ReadTaskInstances])
def child_json(
    dag_id: str, run_id: str, task_id: str, uuid_child: str, session: SessionDep, map_index: MapIndex = "-1"
) -> dict:
    hook, uuid_parent = _open_batch(session, dag_id, run_id, task_id, _index(map_index))
    try:
        child = hook.child(uuid_child)
    finally:
        hook.close()
    # Only a child of this task instance's batch: the URL cannot reach into another batch.
    if child is None or str(child["uuid_parent"]) != str(uuid_parent):
        raise BatchNotFound(f"No child {uuid_child} in the batch of task {dag_id}.{task_id} in run {run_id}.")
    return {**child, "uuid_parent": str(child["uuid_parent"])}


@app.get(TI_PATH + ".csv", dependencies=[ReadTaskInstances])
def batch_csv(dag_id: str, run_id: str, task_id: str, session: SessionDep, map_index: MapIndex = "-1") -> Response:
    hook, uuid_parent = _open_batch(session, dag_id, run_id, task_id, _index(map_index))
    if hook.poll(uuid_parent) is None:
        hook.close()
        raise BatchNotFound(f"Batch {uuid_parent} is no longer in the database (purged?).")

    def lines() -> Iterator[str]:
        # Every child, a chunk at a time: memory stays the same at any batch size.
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        try:
            for c in hook.iter_children(uuid_parent):
                seconds = None
                if c["start_time_exec"] and c["end_time_exec"]:
                    seconds = (c["end_time_exec"] - c["start_time_exec"]).total_seconds()
                writer.writerow({**c, "seconds": seconds})
                if out.tell() > 64 * 1024:
                    yield out.getvalue()
                    out.seek(0)
                    out.truncate()
            yield out.getvalue()
        finally:
            hook.close()

    name = f"pgbg-{uuid_parent}.csv"
    return StreamingResponse(
        lines(), media_type="text/csv", headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )


# -- actions ---------------------------------------------------------------------------------------

# The page is authenticated by Airflow's cookie, which a browser also sends with a form posted from
# another site: every action needs a token that only a page of this server, for this user and this
# task instance, carries (HMAC with the API server's JWT secret, as every API worker shares it). A
# token also expires, so that one that leaked (a proxy's log, a screenshot) soon opens nothing; the page
# renews its token while it is open.
_FALLBACK_SECRET = secrets.token_bytes(32)


def _token_ttl() -> int:
    return max(1, conf.getint("pgbg", "action_token_ttl", fallback=ACTION_TOKEN_TTL))


def _action_token(user: Any, dag_id: str, run_id: str, task_id: str, map_index: int, expires: int) -> str:
    secret = conf.get("api_auth", "jwt_secret", fallback="") or ""
    key = secret.encode() if secret else _FALLBACK_SECRET
    message = "\x1f".join(["pgbg-action", str(user.get_id()), dag_id, run_id, task_id, str(map_index), str(expires)])
    return f"{expires}.{hmac.new(key, message.encode(), hashlib.sha256).hexdigest()}"


def _new_token(user: Any, dag_id: str, run_id: str, task_id: str, map_index: int) -> dict[str, Any]:
    ttl = _token_ttl()
    expires = int(time.time()) + ttl
    return {"token": _action_token(user, dag_id, run_id, task_id, map_index, expires), "ttl": ttl}


def _check_token(token: str | None, user: Any, dag_id: str, run_id: str, task_id: str, map_index: int) -> None:
    expires, _, _ = (token or "").partition(".")
    valid = expires.isascii() and expires.isdigit()
    expected = _action_token(user, dag_id, run_id, task_id, map_index, int(expires)) if valid else ""
    if not token or not valid or not hmac.compare_digest(token.encode(), expected.encode()):
        raise HTTPException(
            403,
            "missing or wrong X-Pgbg-Token: actions are taken from the batch page of this task instance, "
            "by the user who opened it",
        )
    if int(expires) <= time.time():
        raise HTTPException(403, "X-Pgbg-Token expired: the batch page renews it while open; reload the page")


def _can_edit(user: Any, dag_id: str) -> bool:
    return get_auth_manager().is_authorized_dag(
        method="PUT", access_entity=DagAccessEntity.TASK_INSTANCE, details=DagDetails(id=dag_id), user=user
    )


def _actor(user: Any) -> str:
    return f"airflow user {user.get_name()}"


def _task_waits(session: Any, dag_id: str, run_id: str, task_id: str, map_index: int) -> bool:
    state = session.scalar(
        select(TaskInstance.state).where(
            TaskInstance.dag_id == dag_id,
            TaskInstance.run_id == run_id,
            TaskInstance.task_id == task_id,
            TaskInstance.map_index == map_index,
        )
    )
    return state in ("deferred", "running", "queued", "scheduled", "up_for_retry")


@app.get(TI_PATH + "/token.json", dependencies=[EditTaskInstances])
def action_token(dag_id: str, run_id: str, task_id: str, user: GetUserDep, map_index: MapIndex = "-1") -> Response:
    """A fresh action token, for the page to renew its own (read with the user's cookie, which another
    site cannot do)."""
    body = _new_token(user, dag_id, run_id, task_id, _index(map_index))
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


@app.post(TI_PATH + "/stop.json", dependencies=[EditTaskInstances])
def stop_action(
    dag_id: str,
    run_id: str,
    task_id: str,
    session: SessionDep,
    user: GetUserDep,
    child: Annotated[str | None, Body(embed=True)] = None,
    x_pgbg_token: Annotated[str | None, Header()] = None,
    map_index: MapIndex = "-1",
) -> dict:
    index = _index(map_index)
    _check_token(x_pgbg_token, user, dag_id, run_id, task_id, index)
    hook, uuid_parent = _open_batch(session, dag_id, run_id, task_id, index)
    try:
        if child is not None:
            found = hook.child(child)
            if found is None or str(found["uuid_parent"]) != str(uuid_parent):
                raise BatchNotFound(f"No child {child} in the batch of task {dag_id}.{task_id} in run {run_id}.")
        stopped = hook.stop(child or uuid_parent, stopped_by=_actor(user))
    finally:
        hook.close()
    return {"stopped": stopped, "by": _actor(user)}


@app.post(TI_PATH + "/requeue.json", dependencies=[EditTaskInstances])
def requeue_action(
    dag_id: str,
    run_id: str,
    task_id: str,
    session: SessionDep,
    user: GetUserDep,
    x_pgbg_token: Annotated[str | None, Header()] = None,
    map_index: MapIndex = "-1",
) -> dict:
    index = _index(map_index)
    _check_token(x_pgbg_token, user, dag_id, run_id, task_id, index)
    hook, uuid_parent = _open_batch(session, dag_id, run_id, task_id, index)
    try:
        queued = hook.retry(uuid_parent, requested_by=_actor(user))
    finally:
        hook.close()
    waits = _task_waits(session, dag_id, run_id, task_id, index)
    message = (
        f"{queued} children queued again; the task waits for them."
        if waits
        else f"{queued} children queued again and running, but the task has ended: clear the task (or let "
        "Airflow retry it) to wait for them and take their outcome."
    )
    return {"queued": queued, "task_waits": waits, "message": message, "by": _actor(user)}


# After the .json and .csv routes: {task_id} would also match "x.json".
@app.get(TI_PATH, response_class=HTMLResponse, dependencies=[ReadTaskInstances])
def batch_page(
    request: Request,
    dag_id: str,
    run_id: str,
    task_id: str,
    session: SessionDep,
    user: GetUserDep,
    map_index: MapIndex = "-1",
) -> HTMLResponse:
    params = _params(request)
    data = _load(session, dag_id, run_id, task_id, _index(map_index), params)
    view: View = data["view"]
    path = request.url.path
    base = {"map_index": str(_index(map_index))}

    def link(suffix: str = "", **changes: Any) -> str:
        return f"{path}{suffix}?{urlencode({**base, **view.params(**changes)})}"

    links: dict[str, Any] = {
        "status": {s.value: link(status=[s.value], page=1) for s in ChildStatus},
        "problems": link(status=sorted(PROBLEM_STATUSES), page=1),
    }
    if view.page > 1:
        links["prev"] = link(page=view.page - 1)
    if view.page < view.pages:
        links["next"] = link(page=view.page + 1)
    return HTMLResponse(
        render_batch(
            data,
            json_url=link(".json"),
            csv_url=f"{path}.csv?{urlencode(base)}",
            child_url=f"{path}/children/__CHILD__.json?{urlencode(base)}",
            links=links,
            actions={
                "stop_url": f"{path}/stop.json?{urlencode(base)}",
                "requeue_url": f"{path}/requeue.json?{urlencode(base)}",
                "token_url": f"{path}/token.json?{urlencode(base)}",
                **_new_token(user, dag_id, run_id, task_id, _index(map_index)),
            }
            if _can_edit(user, dag_id)
            else None,
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
