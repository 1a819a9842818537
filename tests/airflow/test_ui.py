"""The batch view in a real `airflow api-server`: endpoints, auth, escaping, and a real browser."""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest

from airflow_pgbg.links.batch import batch_page_path
from tests.airflow.apiserver import ApiServer, chromium
from tests.airflow.apiserver import api_server as running_api_server
from tests.airflow.apiserver import console_state as _state
from tests.airflow.apiserver import page_url as _page
from tests.helpers import Gate, gate

PAGE_RATIO = 15
"""How much longer the first page of a 10,000-child batch may take than that of a 10-child one (2x on 2
busy cores: 0.20 s and 0.10 s); a page that read every preview takes seconds more."""
"""The first page of a 10,000-child batch with 64 KB previews, through the API server."""


@pytest.fixture(scope="module")
def api_server(airflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """A real API server on the tests' Airflow home, with an admin and a read-only user ("viewer")."""
    out = tmp_path_factory.mktemp("api-server")
    passwords = {"admin": secrets.token_urlsafe(12), "viewer": secrets.token_urlsafe(12)}
    (out / "passwords.json").write_text(json.dumps(passwords))
    env = {
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(out / "passwords.json"),
    }
    with running_api_server(out, passwords, env) as server:
        yield server


def test_endpoints_need_an_authenticated_user(api_server: ApiServer, finished_run: dict[str, Any]) -> None:
    for suffix in ("", ".json", ".csv"):
        r = httpx.get(_page(api_server, finished_run, suffix))
        assert r.status_code in (401, 403), (suffix, r.status_code)
        assert "marks" not in r.text


def test_json_csv_and_page(api_server: ApiServer, finished_run: dict[str, Any], pgbg_conn: str) -> None:
    assert finished_run["state"] == "failed"  # one child fails on purpose
    auth = api_server.auth()
    reply = httpx.get(_page(api_server, finished_run, ".json"), headers=auth)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["task_instance"]["task_id"] == finished_run["task_id"]
    assert data["batch"]["status"] == "failed"
    assert data["batch"]["counts"] == {"queued": 0, "running": 0, "done": 3, "failed": 1, "stopped": 0, "lost": 0}
    # A failed batch shows its problems first; seq order on request.
    assert [c["status"] for c in data["children"]] == ["failed", "done", "done", "done"]
    expected_view = {"sort": "status", "order": "desc", "matching": 4, "page": 1, "pages": 1}
    assert {k: data["view"][k] for k in expected_view} == expected_view
    children = httpx.get(_page(api_server, finished_run, ".json") + "&sort=seq", headers=auth).json()["children"]
    assert [c["status"] for c in children] == ["done", "done", "failed", "done"]
    assert set(children[0]) >= {
        "uuid_child",
        "status",
        "attempt",
        "query",
        "command",
        "has_preview",
        "sqlstate",
        "error",
        "start_time_exec",
        "end_time_exec",
        "queue_seconds",
        "seconds",
    }
    assert "result" not in children[0]  # previews load one child at a time
    assert children[2]["sqlstate"] == "22012"
    assert data["figures"]["started"] is True
    assert len(data["figures"]["bins"]) == 60
    # No connection secret anywhere: the page knows the connection only by its id.
    password = pgbg_conn.split("password=")[1].split()[0]
    assert password not in json.dumps(data)

    rows = list(csv.DictReader(io.StringIO(httpx.get(_page(api_server, finished_run, ".csv"), headers=auth).text)))
    assert [r["status"] for r in rows] == ["done", "done", "failed", "done"]
    assert rows[2]["sqlstate"] == "22012"

    html = httpx.get(_page(api_server, finished_run), headers=auth).text
    assert data["batch"]["uuid_parent"] in html
    assert "<script>alert(1)</script>" not in html  # the hostile query is shown as text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # The batch's settings, a custom one holding markup among them, shown as text.
    assert data["batch"]["settings"]["work_mem"] == "8MB"
    assert "pgbg_test.note = &lt;b&gt;bold&lt;/b&gt;" in html
    assert "<b>bold</b>" not in html
    assert password not in html
    assert '<svg id="timeline"' in html
    assert 'http-equiv="refresh"' not in html  # live updates come from the JSON endpoint


def test_one_child_on_demand_and_clear_errors_for_bad_views(
    api_server: ApiServer, finished_run: dict[str, Any], user: psycopg.Connection
) -> None:
    auth = api_server.auth()
    base = _page(api_server, finished_run, ".json")
    children = httpx.get(base + "&sort=seq", headers=auth).json()["children"]
    path, _, query = _page(api_server, finished_run).partition("?")
    hostile = httpx.get(f"{path}/children/{children[1]['uuid_child']}.json?{query}", headers=auth).json()
    assert hostile["result"]["preview"] == [{"x": "<script>alert(1)</script>"}]
    assert hostile["query"] == "select '<script>alert(1)</script>' as x"
    # A child of another batch is not reachable through this task instance.
    other = user.execute("SELECT pgbg.pg_background_launch_num(ARRAY['select 1'], p_monitor => false)").fetchone()[0]
    stranger = user.execute("SELECT uuid_child FROM pgbg.log_background WHERE uuid_parent = %s", (other,)).fetchone()[0]
    assert httpx.get(f"{path}/children/{stranger}.json?{query}", headers=auth).status_code == 404

    failed = httpx.get(base + "&status=failed,lost", headers=auth).json()
    assert [c["seq"] for c in failed["children"]] == [3]
    assert httpx.get(base + "&sqlstate=22012", headers=auth).json()["view"]["matching"] == 1
    assert httpx.get(base + "&q=ALERT", headers=auth).json()["view"]["matching"] == 1  # any case, literal
    assert httpx.get(base + "&q=%25", headers=auth).json()["view"]["matching"] == 0  # % is not a wildcard
    injection = httpx.get(base + "&q=' or 1=1; drop table pgbg.batch; --", headers=auth)
    assert injection.status_code == 200
    assert injection.json()["view"]["matching"] == 0
    for bad, says in [
        ("&sort=pid", "unknown sort 'pid'"),
        ("&status=finished", "unknown status 'finished'"),
        ("&order=up", "order is asc or desc"),
        ("&page=0", "page must be a whole number"),
        ("&page=9", "page 9 is past the last page, 1"),
        ("&per_page=5000", "per_page must be a whole number from 1 to 1000"),
        ("&sqlstate=1;drop", "a SQLSTATE is five letters or digits"),
    ]:
        reply = httpx.get(base + bad, headers=auth)
        assert reply.status_code == 400, (bad, reply.text)
        assert says in reply.json()["detail"], (bad, reply.text)
    page = httpx.get(_page(api_server, finished_run) + "&sort=pid", headers=auth)
    assert page.status_code == 400
    assert "unknown sort" in page.text


def test_requeue_is_recorded_and_says_the_task_has_ended(
    api_server: ApiServer, finished_run: dict[str, Any], user: psycopg.Connection
) -> None:
    auth = api_server.auth()
    token = _state(httpx.get(_page(api_server, finished_run), headers=auth).text)["actions"]["token"]
    path, _, query = _page(api_server, finished_run).partition("?")
    reply = httpx.post(f"{path}/requeue.json?{query}", headers={**auth, "X-Pgbg-Token": token}, json={})
    assert reply.status_code == 200, reply.text
    assert reply.json()["queued"] == 1
    assert reply.json()["task_waits"] is False
    assert "clear the task" in reply.json()["message"]
    parent = httpx.get(_page(api_server, finished_run, ".json"), headers=auth).json()["batch"]["uuid_parent"]
    notes = user.execute("SELECT notes FROM pgbg.batch WHERE uuid_parent = %s", (parent,)).fetchone()[0]
    assert "1 children queued again by airflow user admin at " in notes


def test_read_only_users_see_no_action_and_forged_requests_are_refused(
    api_server: ApiServer, finished_run: dict[str, Any]
) -> None:
    path, _, query = _page(api_server, finished_run).partition("?")
    viewer = api_server.auth("viewer")
    html = httpx.get(_page(api_server, finished_run), headers=viewer)
    assert html.status_code == 200
    assert 'id="actions"' not in html.text
    assert '<button type="button" data-action' not in html.text
    assert _state(html.text)["actions"] is None
    admin_token = _state(httpx.get(_page(api_server, finished_run), headers=api_server.auth()).text)["actions"]["token"]
    for action in ("stop", "requeue"):
        # Airflow's permission first: the viewer may not edit, whatever token it sends.
        refused = httpx.post(f"{path}/{action}.json?{query}", headers={**viewer, "X-Pgbg-Token": admin_token}, json={})
        assert refused.status_code == 403, refused.text
        # An editor's cookie or token without the page's token: a cross-site request.
        forged = httpx.post(f"{path}/{action}.json?{query}", headers=api_server.auth(), json={})
        assert forged.status_code == 403, forged.text
        assert "X-Pgbg-Token" in forged.json()["detail"]


def test_a_big_batch_opens_within_the_bound(
    api_server: ApiServer, run_dag: Callable[..., Any], stored_connection: str
) -> None:
    dr = run_dag("big_batch")
    (ti,) = dr.get_task_instances()
    run = {"dag_id": dr.dag_id, "run_id": dr.run_id, "task_id": ti.task_id}
    small_dr = run_dag("small_batch")
    (small_ti,) = small_dr.get_task_instances()
    small = {"dag_id": small_dr.dag_id, "run_id": small_dr.run_id, "task_id": small_ti.task_id}
    auth = api_server.auth()
    took: dict[str, list[float]] = {"big": [], "small": []}
    # Turn about, the best of three each: whatever else the machine does weighs on both pages alike.
    for _ in range(3):
        for name, which in (("small", small), ("big", run)):
            started = time.monotonic()
            page = httpx.get(_page(api_server, which, ""), headers=auth, timeout=60)
            took[name].append(time.monotonic() - started)
            assert page.status_code == 200, page.text[-2000:]
    big, ten = min(took["big"]), min(took["small"])
    print(
        f"\n[ui] first page of a 10,000-child batch: {len(page.content) / 1024:.0f} KiB in {big:.2f} s"
        f" (of a 10-child one: {ten:.2f} s)"
    )
    # The first page shows 100 children without their previews, whatever the batch's size.
    assert len(page.content) <= 1024 * 1024
    # README: 0.37 s on 2 cores; the page that read every preview (132.7 MB) took far longer.
    assert big <= PAGE_RATIO * ten, took
    data = httpx.get(_page(api_server, run, ".json"), headers=auth, timeout=60).json()
    assert data["batch"]["children"] == 10_000
    assert data["view"]["matching"] == 10_000
    assert data["view"]["pages"] == 100
    # The failed ones first (the batch failed), and one filter away.
    assert [c["status"] for c in data["children"][:10]] == ["failed"] * 10
    failed = httpx.get(_page(api_server, run, ".json") + "&status=failed", headers=auth, timeout=60).json()
    assert [c["seq"] for c in failed["children"]] == list(range(1000, 10_001, 1000))
    last = httpx.get(_page(api_server, run, ".json") + "&sort=seq&page=100", headers=auth, timeout=60).json()
    assert last["children"][-1]["seq"] == 10_000
    # Every child in the CSV, streamed.
    with httpx.stream("GET", _page(api_server, run, ".csv"), headers=auth, timeout=120) as reply:
        lines = sum(chunk.count("\n") for chunk in reply.iter_text())
    assert lines == 10_001


def test_unknown_task_instance_is_a_clear_404(api_server: ApiServer, finished_run: dict[str, Any]) -> None:
    auth = {"Authorization": f"Bearer {api_server.token()}"}
    unknown = {**finished_run, "run_id": "manual__1999-01-01T00:00:00+00:00"}
    page = httpx.get(_page(api_server, unknown), headers=auth)
    assert page.status_code == 404
    assert "No batch for task" in page.text
    assert "Traceback" not in page.text
    assert httpx.get(_page(api_server, unknown, ".json"), headers=auth).status_code == 404


def test_the_plugin_tab_and_the_extra_link_are_registered(api_server: ApiServer, finished_run: dict[str, Any]) -> None:
    auth = {"Authorization": f"Bearer {api_server.token()}"}
    plugins = httpx.get(f"{api_server.url}/api/v2/plugins", headers=auth).json()["plugins"]
    (ours,) = [p for p in plugins if p["name"] == "airflow_pgbg"]
    assert ours["external_views"][0]["destination"] == "task_instance"
    links = httpx.get(
        f"{api_server.url}/api/v2/dags/{finished_run['dag_id']}/dagRuns/{quote(finished_run['run_id'], safe='')}"
        f"/taskInstances/{finished_run['task_id']}/links",
        headers=auth,
    ).json()["extra_links"]
    assert links["PG Background batch"].endswith(
        batch_page_path(finished_run["dag_id"], finished_run["run_id"], finished_run["task_id"])
    )


def test_in_a_real_browser(api_server: ApiServer, finished_run: dict[str, Any], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            # Log in through Airflow's own login page.
            page.goto(f"{api_server.url}/")
            page.wait_for_selector("input[name='username']", timeout=30_000)
            page.fill("input[name='username']", "admin")
            page.fill("input[name='password']", api_server.password)
            page.keyboard.press("Enter")
            page.wait_for_url(lambda url: "login" not in url, timeout=30_000)

            # The task instance page, its "PG Background" tab.
            ti_url = (
                f"{api_server.url}/dags/{finished_run['dag_id']}/runs/"
                f"{quote(finished_run['run_id'], safe='')}/tasks/{finished_run['task_id']}"
            )
            page.goto(ti_url)
            tab = page.get_by_role("link", name="PG Background", exact=True)
            tab.first.wait_for(timeout=30_000)
            tab.first.click()
            frame = page.frame_locator("iframe").first
            frame.locator("#batch-status").wait_for(timeout=30_000)
            assert frame.locator("#batch-status").inner_text() == "failed"
            assert frame.locator("#children tbody tr").count() == 4
            page.screenshot(path=str(tmp_path / "task-instance-tab.png"), full_page=True)

            # The extra link opens the same batch page directly.
            direct = browser.new_page()
            direct.context.add_cookies(page.context.cookies())
            direct.goto(_page(api_server, finished_run))
            assert direct.locator("#batch-status").inner_text() == "failed"
            statuses = direct.locator("#children tbody tr").evaluate_all("rows => rows.map(r => r.dataset.status)")
            assert statuses == ["failed", "done", "done", "done"]  # problems first in a failed batch
            direct.goto(_page(api_server, finished_run) + "&sort=seq")
            statuses = direct.locator("#children tbody tr").evaluate_all("rows => rows.map(r => r.dataset.status)")
            assert statuses == ["done", "done", "failed", "done"]
            hostile = direct.locator("#children tbody tr").nth(1)
            assert "<script>alert(1)</script>" in hostile.locator("summary code").inner_text()  # text, never run
            hostile.locator("summary").click()  # its result preview loads on demand
            direct.wait_for_function("document.querySelectorAll('pre.detail')[1].textContent.includes('preview')")
            assert "<script>alert(1)</script>" in hostile.locator("pre.detail").inner_text()
            assert direct.locator("#timeline rect").count() == 60  # aggregated: bins, not one bar per child
            assert direct.locator("#timeline").get_attribute("data-peak") == "1"  # cap 1
            direct.screenshot(path=str(tmp_path / "batch-page.png"), full_page=True)
        finally:
            browser.close()
    print(f"\nscreenshots: {tmp_path}")


def _run_in_background(name: str, scratch: str, conf: dict[str, Any] | None = None) -> subprocess.Popen:
    from tests.airflow.conftest import dag_test_command

    return subprocess.Popen(dag_test_command(name, scratch, conf), env=os.environ.copy(), stdout=subprocess.DEVNULL)


def test_live_updates_and_an_editor_stops_one_child_in_a_browser(
    api_server: ApiServer, stored_connection: str, dsn: str, user: psycopg.Connection, scratch: str, tmp_path: Path
) -> None:
    # See the DAG: child 2 runs until the editor stops it, child 3 until the test lets it end, and the
    # rest stay queued meanwhile, however slowly the machine answers.
    with gate(dsn) as hold, gate(dsn) as one, gate(dsn) as rest:
        _watch_live_batch(
            api_server, user, scratch, tmp_path, {"hold": hold.key, "one": one.key, "rest": rest.key}, one
        )
    print(f"\nscreenshots: {tmp_path}")


def _watch_live_batch(
    api_server: ApiServer, user: psycopg.Connection, scratch: str, tmp_path: Path, conf: dict[str, int], one: Gate
) -> None:
    from airflow.models import DagRun
    from airflow.utils.session import create_session
    from playwright.sync_api import sync_playwright

    from tests.helpers import poll_until

    proc = _run_in_background("ui_live", scratch, conf)
    try:

        def running_run() -> dict[str, Any] | None:
            with create_session() as session:
                runs = session.query(DagRun).filter(DagRun.dag_id == "pgbg_ui_live").all()
                run_ids = [r.run_id for r in runs]
            for run_id in run_ids:
                run = {"dag_id": "pgbg_ui_live", "run_id": run_id, "task_id": "batch"}
                reply = httpx.get(_page(api_server, run, ".json"), headers=api_server.auth())
                if reply.status_code == 200 and reply.json()["batch"]["counts"]["running"] == 2:
                    return run
            return None

        run = poll_until(running_run, 60, 0.5, "the live batch to run")
        with sync_playwright() as p:
            browser = chromium(p)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"{api_server.url}/")
                page.wait_for_selector("input[name='username']", timeout=30_000)
                page.fill("input[name='username']", "admin")
                page.fill("input[name='password']", api_server.password)
                page.keyboard.press("Enter")
                page.wait_for_url(lambda url: "login" not in url, timeout=30_000)
                page.goto(_page(api_server, run) + "&sort=seq")
                page.evaluate("window.__not_reloaded = true")
                # A person opens a queued child's row; live updates must leave it open.
                seventh = page.locator("#children tbody tr").nth(6)
                assert seventh.get_attribute("data-status") == "queued"
                seventh.locator("summary").click()
                page.wait_for_function(
                    "document.querySelectorAll('#children tbody tr')[6].querySelector('pre').textContent"
                    ".includes('pg_advisory_xact_lock_shared')"
                )
                # The second child is the one stopped later; the third, running when the page shows it,
                # ends while the page watches. Both by id: a locator by status names another row once the
                # live updates change it.
                child = page.locator("#children tbody tr").nth(1).get_attribute("data-child")
                watched = page.locator("#children tbody tr").nth(2).get_attribute("data-child")
                page.wait_for_selector(f"tr[data-child='{watched}'][data-status='running']")
                one.open()
                page.wait_for_function(
                    f"document.querySelector(\"tr[data-child='{watched}']\").dataset.status === 'done'",
                    timeout=20_000,
                )
                assert page.evaluate("window.__not_reloaded") is True
                assert int(page.evaluate("document.body.dataset.updates")) >= 1
                assert page.locator("#children tbody tr").nth(6).locator("details").get_attribute("open") is not None
                assert page.locator("[data-count='done']").inner_text() != "0"

                # The editor stops one running child, from its row, after confirming.
                running = page.locator(f"tr[data-child='{child}']")
                assert running.get_attribute("data-status") == "running"
                page.once("dialog", lambda dialog: dialog.accept())
                running.locator("button[data-action='stop-child']").click()
                page.wait_for_function(
                    f"document.querySelector(\"tr[data-child='{child}']\").dataset.status === 'stopped'",
                    timeout=20_000,
                )
                stopped_row = page.locator(f"tr[data-child='{child}']")
                assert "airflow user admin" in stopped_row.inner_text()
                page.screenshot(path=str(tmp_path / "live-batch.png"), full_page=True)
            finally:
                browser.close()
        assert user.execute(
            "SELECT status, stopped_by FROM pgbg.log_background WHERE uuid_child = %s", (child,)
        ).fetchone() == ("stopped", "airflow user admin")
    finally:
        # The rest of the batch is not needed: its task then ends and the process with it.
        user.execute("SELECT pgbg.pg_background_stop(uuid_parent) FROM pgbg.batch WHERE role_name = current_user")
        proc.wait(90)


# -- what a task's own code cannot make the console or the listener do -----------------------------


def _launch_elsewhere(conn: psycopg.Connection, origin: str) -> str:
    """A running batch that belongs to another task instance (another team's, say)."""
    row = conn.execute(
        "SELECT pgbg.pg_background_launch_num(ARRAY['select pg_sleep(60)', 'select pg_sleep(60)'], "
        "p_monitor => false, p_origin => %s)",
        (origin,),
    ).fetchone()
    return str(row[0])


def _statuses(conn: psycopg.Connection, parent: str) -> set[str]:
    rows = conn.execute("SELECT status::text FROM pgbg.log_background WHERE uuid_parent = %s", (parent,))
    return {r[0] for r in rows}


def _mark(server: ApiServer, run: dict[str, Any], state: str) -> None:
    reply = httpx.patch(
        f"{server.url}/api/v2/dags/{run['dag_id']}/dagRuns/{quote(run['run_id'], safe='')}"
        f"/taskInstances/{run['task_id']}",
        headers=server.auth(),
        json={"new_state": state},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text


def _every_endpoint_refuses(server: ApiServer, run: dict[str, Any], victim: str, says: str) -> None:
    """Page, JSON, CSV, a child, and both actions (with a valid token) are refused, saying why."""
    auth = server.auth()
    path, _, query = _page(server, run).partition("?")
    token = httpx.get(_page(server, run, "/token.json"), headers=auth).json()["token"]
    replies = {
        "page": httpx.get(_page(server, run), headers=auth),
        "json": httpx.get(_page(server, run, ".json"), headers=auth),
        "csv": httpx.get(_page(server, run, ".csv"), headers=auth),
        "child": httpx.get(f"{path}/children/{victim}.json?{query}", headers=auth),
        "stop": httpx.post(f"{path}/stop.json?{query}", headers={**auth, "X-Pgbg-Token": token}, json={}),
        "requeue": httpx.post(f"{path}/requeue.json?{query}", headers={**auth, "X-Pgbg-Token": token}, json={}),
    }
    for name, reply in replies.items():
        assert reply.status_code == 409, (name, reply.status_code, reply.text[-500:])
        assert says in unescape(reply.text), (name, reply.text[-500:])
        assert "pg_sleep" not in reply.text, name  # nothing of the other batch is shown
    assert "Batch reference refused" in replies["page"].text


def _listener_refuses(server: ApiServer, run: dict[str, Any], what: str, conn: psycopg.Connection, victim: str) -> None:
    """A person marks the task: the listener refuses the reference (logged) instead of stopping the batch."""
    from tests.helpers import poll_until

    refusals = server.log_text().count(what)
    _mark(server, run, "failed")
    poll_until(
        lambda: server.log_text().count(what) > refusals or "stopped" in _statuses(conn, victim),
        30,
        0.2,
        "the listener to act",
    )
    time.sleep(1)  # a stop would have come by now
    assert "stopped" not in _statuses(conn, victim)
    assert server.log_text().count(what) > refusals


def test_a_reference_to_another_connection_is_refused_by_the_console_and_the_listener(
    api_server: ApiServer,
    run_dag: Callable[..., Any],
    stored_connection: str,
    make_role: Callable[..., str],
) -> None:
    from psycopg.conninfo import conninfo_to_dict

    from tests.airflow.conftest import store_connection

    # Another team's role and its Airflow connection, with a batch of theirs running.
    other_dsn = make_role()
    p = conninfo_to_dict(other_dsn)
    store_connection("pgbg_other", f"postgresql://{p['user']}:{p['password']}@{p['host']}:{p['port']}/{p['dbname']}")
    with psycopg.connect(other_dsn, autocommit=True) as other:
        victim = _launch_elsewhere(other, "team_b_dag/run/load/-1")
        dr = run_dag("forged_ref", conf={"victim": victim, "conn": "pgbg_other"})
        (ti,) = dr.get_task_instances()
        assert ti.state == "success"
        run = {"dag_id": dr.dag_id, "run_id": dr.run_id, "task_id": ti.task_id}
        says = "XCom names connection 'pgbg_other'"
        _every_endpoint_refuses(api_server, run, victim, says)
        assert "but the task is defined with connection 'pgbg_test'" in api_server.log_text()
        _listener_refuses(api_server, run, "refused the batch of task pgbg_forged_ref.batch", other, victim)
        other.execute("SELECT pgbg.pg_background_stop(%s)", (victim,))


def test_a_reference_to_another_task_instances_batch_is_refused(
    api_server: ApiServer, run_dag: Callable[..., Any], stored_connection: str, user: psycopg.Connection
) -> None:
    # Same connection and role, but a batch the engine records as another task instance's.
    victim = _launch_elsewhere(user, "another_dag/manual__1/other_task/-1")
    dr = run_dag("forged_ref", conf={"victim": victim})
    (ti,) = dr.get_task_instances()
    run = {"dag_id": dr.dag_id, "run_id": dr.run_id, "task_id": ti.task_id}
    _every_endpoint_refuses(api_server, run, victim, "was launched by 'another_dag/manual__1/other_task/-1'")
    _listener_refuses(api_server, run, f"batch {victim} was launched by", user, victim)
    user.execute("SELECT pgbg.pg_background_stop(%s)", (victim,))


def test_a_reference_published_by_a_task_that_runs_no_batch_is_refused(
    api_server: ApiServer, run_dag: Callable[..., Any], stored_connection: str, user: psycopg.Connection
) -> None:
    victim = _launch_elsewhere(user, "another_dag/manual__1/other_task/-1")
    dr = run_dag("forger", conf={"victim": victim})
    (ti,) = dr.get_task_instances()
    assert ti.state == "success"
    run = {"dag_id": dr.dag_id, "run_id": dr.run_id, "task_id": ti.task_id}
    _every_endpoint_refuses(api_server, run, victim, "its definition names no connection")
    _listener_refuses(api_server, run, "refused the batch of task pgbg_forger.batch", user, victim)
    user.execute("SELECT pgbg.pg_background_stop(%s)", (victim,))
