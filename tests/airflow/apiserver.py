"""A real `airflow api-server` process on the tests' Airflow home, and a real headless Chromium."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from airflow_pgbg.links.batch import batch_page_path

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiServer:
    def __init__(self, url: str, passwords: dict[str, str], log: Path) -> None:
        self.url = url
        self.passwords = passwords
        self.log = log
        self._tokens: dict[str, str] = {}

    @property
    def password(self) -> str:
        return self.passwords["admin"]

    def token(self, username: str = "admin") -> str:
        """An API token of ``username`` (one per user: logging in costs a password hash)."""
        if username not in self._tokens:
            r = httpx.post(
                f"{self.url}/auth/token",
                json={"username": username, "password": self.passwords[username]},
                timeout=30,
            )
            r.raise_for_status()
            self._tokens[username] = r.json()["access_token"]
        return self._tokens[username]

    def auth(self, username: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(username)}"}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def api_server(out: Path, passwords: dict[str, str], env: dict[str, str]) -> Iterator[ApiServer]:
    """Starts `airflow api-server` with ``env`` on top of the tests' environment; stops it afterwards."""
    port = _free_port()
    # Unbuffered: tests read what the server logged while it runs.
    env = {**os.environ, "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}", "PYTHONUNBUFFERED": "1", **env}
    log_path = out / "api-server.log"
    log = open(log_path, "w")  # noqa: SIM115 - the server writes to it for as long as it runs
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow", "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"api-server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield ApiServer(url, passwords, log_path)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def chromium(playwright: Any) -> Any:
    return playwright.chromium.launch(
        executable_path=os.environ.get("PGBG_CHROMIUM", "/usr/bin/chromium"), args=CHROMIUM_ARGS
    )


def page_url(server: ApiServer, run: dict[str, Any], suffix: str = "") -> str:
    """The URL of a task instance's batch page, or of its ``suffix`` (".json", ".csv", "/token.json")."""
    path = batch_page_path(run["dag_id"], run["run_id"], run["task_id"], run.get("map_index", -1))
    base, _, query = path.partition("?")
    return f"{server.url}{base}{suffix}?{query}"


def console_state(html: str) -> dict[str, Any]:
    """The page's state block (URLs, and the action token for users who may edit)."""
    block = html.split('<script type="application/json" id="console-state">', 1)[1].split("</script>", 1)[0]
    return json.loads(block)
