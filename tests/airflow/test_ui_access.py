"""Who may see and act on a batch, with an auth manager that grants access per DAG (the FAB provider's),
in a real `airflow api-server`; and the life of the action tokens the page carries."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.airflow.apiserver import ApiServer, api_server, chromium, console_state, page_url

FAB_AUTH_MANAGER = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
TOKEN_TTL = 6
"""Seconds an action token lives on this server: short, to see tokens expire and the page renew them."""

# Roles of FAB's own kinds: read or edit of DAG runs and task instances, on one DAG only.
_SETUP = """
import json, sys
from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder
from airflow.providers.fab.www.security import permissions as p

passwords = json.load(sys.stdin)
console, other = (p.resource_name(d, p.RESOURCE_DAG) for d in ("pgbg_ui_batch", "pgbg_ok_blocking"))
entities = (p.RESOURCE_DAG_RUN, p.RESOURCE_TASK_INSTANCE)
read = [(p.ACTION_CAN_READ, r) for r in entities]
edit = read + [(p.ACTION_CAN_EDIT, r) for r in entities]
roles = {
    "pgbg_reader": read + [(p.ACTION_CAN_READ, console)],
    "pgbg_editor": edit + [(p.ACTION_CAN_READ, console), (p.ACTION_CAN_EDIT, console)],
    "pgbg_outsider": edit + [(p.ACTION_CAN_READ, other), (p.ACTION_CAN_EDIT, other)],
}
users = {"reader": "pgbg_reader", "editor": "pgbg_editor", "editor2": "pgbg_editor", "outsider": "pgbg_outsider"}
with get_application_builder() as appbuilder:
    sm = appbuilder.sm
    for name, permissions in roles.items():
        role = sm.add_role(name)
        for action, resource in permissions:
            sm.add_permission_to_role(role, sm.create_permission(action, resource))
    for user, role in users.items():
        assert sm.add_user(user, user, "test", f"{user}@example.com", sm.find_role(role), password=passwords[user])
"""


@pytest.fixture(scope="module")
def fab_server(airflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """An API server with the FAB auth manager: a reader and two editors of the console's DAG, and an
    outsider who may edit another DAG's task instances but not see this one's."""
    out = tmp_path_factory.mktemp("fab-api-server")
    env = {"AIRFLOW__CORE__AUTH_MANAGER": FAB_AUTH_MANAGER, "AIRFLOW__PGBG__ACTION_TOKEN_TTL": str(TOKEN_TTL)}
    full_env = {**os.environ, **env}
    # FAB keeps its users and roles in tables of its own in the metadata database.
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=full_env, check=True, capture_output=True)
    passwords = {u: secrets.token_urlsafe(12) for u in ("reader", "editor", "editor2", "outsider")}
    setup = subprocess.run(
        [sys.executable, "-c", _SETUP], env=full_env, input=json.dumps(passwords), capture_output=True, text=True
    )
    assert setup.returncode == 0, setup.stderr[-3000:]
    with api_server(out, passwords, env) as server:
        yield server


def _action(server: ApiServer, run: dict[str, Any], name: str, user: str, token: str | None) -> httpx.Response:
    headers = {**server.auth(user), **({"X-Pgbg-Token": token} if token is not None else {})}
    return httpx.post(page_url(server, run, f"/{name}.json"), headers=headers, json={}, timeout=30)


def _token(server: ApiServer, run: dict[str, Any], user: str) -> str:
    reply = httpx.get(page_url(server, run, "/token.json"), headers=server.auth(user), timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()["token"]


def test_a_user_without_read_access_to_the_dag_gets_403_everywhere(
    fab_server: ApiServer, finished_run: dict[str, Any]
) -> None:
    reader, outsider = fab_server.auth("reader"), fab_server.auth("outsider")
    data = httpx.get(page_url(fab_server, finished_run, ".json"), headers=reader, timeout=30)
    assert data.status_code == 200, data.text  # the DAG's reader sees it all
    child = data.json()["children"][0]["uuid_child"]
    # The reader reads everything (not the token: it may not act); the outsider nothing at all.
    reader_gets = {"": 200, ".json": 200, ".csv": 200, f"/children/{child}.json": 200, "/token.json": 403}
    for suffix, status in reader_gets.items():
        allowed = httpx.get(page_url(fab_server, finished_run, suffix), headers=reader, timeout=30)
        assert allowed.status_code == status, (suffix, allowed.status_code, allowed.text[-300:])
        refused = httpx.get(page_url(fab_server, finished_run, suffix), headers=outsider, timeout=30)
        assert refused.status_code == 403, (suffix, refused.status_code, refused.text[-300:])
        assert "select 1/0" not in refused.text
    editor_token = _token(fab_server, finished_run, "editor")
    for name in ("stop", "requeue"):
        refused = _action(fab_server, finished_run, name, "outsider", editor_token)
        assert refused.status_code == 403, (name, refused.text)


def test_a_reader_of_the_dag_gets_the_console_but_no_action(
    fab_server: ApiServer, finished_run: dict[str, Any]
) -> None:
    reader = fab_server.auth("reader")
    page = httpx.get(page_url(fab_server, finished_run), headers=reader, timeout=30)
    assert page.status_code == 200, page.text[-500:]
    assert 'id="actions"' not in page.text
    assert console_state(page.text)["actions"] is None
    for suffix in (".json", ".csv"):
        assert httpx.get(page_url(fab_server, finished_run, suffix), headers=reader, timeout=30).status_code == 200
    assert httpx.get(page_url(fab_server, finished_run, "/token.json"), headers=reader).status_code == 403
    editor_token = _token(fab_server, finished_run, "editor")
    for name in ("stop", "requeue"):
        assert _action(fab_server, finished_run, name, "reader", editor_token).status_code == 403
    # The editor's page has them.
    editor_page = httpx.get(page_url(fab_server, finished_run), headers=fab_server.auth("editor"), timeout=30)
    assert console_state(editor_page.text)["actions"]["ttl"] == TOKEN_TTL


def test_an_action_token_is_bound_to_its_user_its_task_instance_and_its_time(
    fab_server: ApiServer, finished_run: dict[str, Any], run_dag: Callable[..., Any]
) -> None:
    dr = run_dag("ui_batch")  # a second task instance of the same task
    (ti,) = dr.get_task_instances()
    second_run = {"dag_id": dr.dag_id, "run_id": dr.run_id, "task_id": ti.task_id}

    # A token taken right before each action: each refusal is for what it names, not for a token that
    # expired while a slow machine got through the ones before.
    def fresh() -> str:
        return _token(fab_server, finished_run, "editor")

    token = fresh()
    accepted = _action(fab_server, finished_run, "requeue", "editor", token)
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["by"] == "airflow user editor"
    refusals = {
        "another user's": _action(fab_server, finished_run, "requeue", "editor2", fresh()),
        "another task instance's": _action(fab_server, second_run, "requeue", "editor", fresh()),
        "another map index's": _action(fab_server, {**finished_run, "map_index": 0}, "requeue", "editor", fresh()),
        "none": _action(fab_server, finished_run, "requeue", "editor", None),
        "a forged expiry": _action(fab_server, finished_run, "requeue", "editor", f"9{fresh()}"),
        "one without expiry": _action(fab_server, finished_run, "requeue", "editor", fresh().split(".", 1)[1]),
    }
    for what, reply in refusals.items():
        assert reply.status_code == 403, (what, reply.text)
        assert "missing or wrong X-Pgbg-Token" in reply.json()["detail"], (what, reply.text)

    time.sleep(TOKEN_TTL + 1)
    expired = _action(fab_server, finished_run, "stop", "editor", token)
    assert expired.status_code == 403, expired.text
    assert "X-Pgbg-Token expired" in expired.json()["detail"]
    renewed = _action(fab_server, finished_run, "stop", "editor", _token(fab_server, finished_run, "editor"))
    assert renewed.status_code == 200, renewed.text


def test_the_open_page_renews_its_token_in_a_browser(
    fab_server: ApiServer, finished_run: dict[str, Any], user: psycopg.Connection
) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            # Log in through the FAB auth manager's own login page.
            page.goto(f"{fab_server.url}/")
            page.wait_for_selector("input[name='username']", timeout=30_000)
            page.fill("input[name='username']", "editor")
            page.fill("input[name='password']", fab_server.passwords["editor"])
            page.keyboard.press("Enter")
            page.wait_for_url(lambda url: "login" not in url, timeout=30_000)
            page.goto(page_url(fab_server, finished_run))
            first = console_state(page.content())["actions"]["token"]
            # Left open past the first token's life: the page renewed it (at half-life) on its own.
            page.wait_for_function("Number(document.body.dataset.tokenRenewals || 0) >= 2", timeout=30_000)
            stale = _action(fab_server, finished_run, "requeue", "editor", first)
            assert stale.status_code == 403, stale.text
            assert "expired" in stale.json()["detail"]
            page.once("dialog", lambda dialog: dialog.accept())
            page.locator("button[data-action='requeue']").click()
            page.wait_for_function(
                "document.getElementById('action-message').textContent.includes('queued again')", timeout=30_000
            )
        finally:
            browser.close()
    parent = httpx.get(
        page_url(fab_server, finished_run, ".json"), headers=fab_server.auth("editor"), timeout=30
    ).json()["batch"]["uuid_parent"]
    notes = user.execute("SELECT notes FROM pgbg.batch WHERE uuid_parent = %s", (parent,)).fetchone()[0]
    assert "queued again by airflow user editor" in notes
