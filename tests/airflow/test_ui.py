"""The batch view in a real `airflow api-server`: endpoints, auth, escaping, and a real browser."""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest

from airflow_pgbg.links.batch import batch_page_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiServer:
    def __init__(self, url: str, password: str) -> None:
        self.url = url
        self.password = password

    def token(self) -> str:
        r = httpx.post(f"{self.url}/auth/token", json={"username": "admin", "password": self.password})
        r.raise_for_status()
        return r.json()["access_token"]


@pytest.fixture(scope="module")
def api_server(airflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """A real API server on the tests' Airflow home, with a known admin password."""
    out = tmp_path_factory.mktemp("api-server")
    password = secrets.token_urlsafe(12)
    passwords = out / "passwords.json"
    passwords.write_text(json.dumps({"admin": password}))
    port = _free_port()
    env = {
        **os.environ,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
    }
    log = open(out / "api-server.log", "w")  # noqa: SIM115 - the server writes to it for as long as it runs
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow", "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"api-server did not start:\n{(out / 'api-server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield ApiServer(url, password)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture
def finished_run(run_dag: Callable[..., Any], user: psycopg.Connection, scratch: str) -> dict[str, Any]:
    """A DAG run whose batch has done, failed and hostile-looking children."""
    from airflow.models import Connection
    from airflow.utils.session import create_session

    # The API server finds the connection where a deployment keeps it: in the metadata database.
    with create_session() as session:
        session.query(Connection).filter(Connection.conn_id == "pgbg_test").delete()
        session.add(Connection(conn_id="pgbg_test", uri=os.environ["AIRFLOW_CONN_PGBG_TEST"]))
    user.execute(f"CREATE TABLE {scratch}.marks (n int)")
    dr = run_dag("ui_batch")
    (ti,) = dr.get_task_instances()
    return {"dag_id": dr.dag_id, "run_id": dr.run_id, "task_id": ti.task_id, "state": ti.state}


def _page(server: ApiServer, run: dict[str, Any], suffix: str = "") -> str:
    path = batch_page_path(run["dag_id"], run["run_id"], run["task_id"])
    base, _, query = path.partition("?")
    return f"{server.url}{base}{suffix}?{query}"


def test_endpoints_need_an_authenticated_user(api_server: ApiServer, finished_run: dict[str, Any]) -> None:
    for suffix in ("", ".json", ".csv"):
        r = httpx.get(_page(api_server, finished_run, suffix))
        assert r.status_code in (401, 403), (suffix, r.status_code)
        assert "marks" not in r.text


def test_json_csv_and_page(api_server: ApiServer, finished_run: dict[str, Any], pgbg_conn: str) -> None:
    assert finished_run["state"] == "failed"  # one child fails on purpose
    auth = {"Authorization": f"Bearer {api_server.token()}"}
    reply = httpx.get(_page(api_server, finished_run, ".json"), headers=auth)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["task_instance"]["task_id"] == finished_run["task_id"]
    assert data["batch"]["status"] == "failed"
    assert data["batch"]["counts"] == {"queued": 0, "running": 0, "done": 3, "failed": 1, "stopped": 0, "lost": 0}
    children = data["children"]
    assert [c["status"] for c in children] == ["done", "done", "failed", "done"]
    assert set(children[0]) >= {
        "uuid_child",
        "pid",
        "status",
        "query",
        "result",
        "sqlstate",
        "error",
        "start_time_exec",
        "end_time_exec",
        "seconds",
    }
    assert children[2]["sqlstate"] == "22012"
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
    assert password not in html
    assert '<svg id="timeline"' in html


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
        browser = p.chromium.launch(
            executable_path=os.environ.get("PGBG_CHROMIUM", "/usr/bin/chromium"),
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
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
            assert statuses == ["done", "done", "failed", "done"]
            hostile = direct.locator("#children tbody tr").nth(1).locator("summary code").inner_text()
            assert "<script>alert(1)</script>" in hostile  # shown as text, never run
            assert direct.locator("#timeline rect").count() == 4
            direct.screenshot(path=str(tmp_path / "batch-page.png"), full_page=True)
        finally:
            browser.close()
    print(f"\nscreenshots: {tmp_path}")
