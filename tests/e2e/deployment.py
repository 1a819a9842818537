"""A real Airflow deployment on loopback: api-server, scheduler (LocalExecutor), dag-processor and
triggerer as separate processes, metadata in a PostgreSQL database of their own, driven through the
public REST API (the calls the UI makes). Used by the end-to-end suite, by ``make bench`` (W8) and,
with CeleryExecutor and every service doubled, by the deployment tests (tests/deploy).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psutil
import psycopg
from psycopg.conninfo import conninfo_to_dict

from tests.helpers import poll_until

ROLE = "pgbg_e2e"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    return poll_until(predicate, timeout, interval, what)


class Deployment:
    """The running services, an authenticated REST client, and the engine's view of the batches."""

    def __init__(
        self,
        home: Path,
        env: dict[str, str],
        url: str,
        admin_dsn: str,
        fleet_dsn: str | None,
        managed_dsn: str | None = None,
    ) -> None:
        self.home = home
        self.env = env
        self.url = url
        self.admin_dsn = admin_dsn
        self.fleet_dsn = fleet_dsn
        """Superuser DSN of the restartable server (tests.servers.FLEET), or None when not available."""
        self.managed_dsn = managed_dsn
        """Superuser DSN of the pg_cron server (tests.servers.MANAGED), or None when not available."""
        self.engine_dsn: str | None = None
        """The server the engine queries below go to when not told (None: the main one); a scenario
        that runs on another launcher points it at that launcher's server."""
        self.procs: dict[str, subprocess.Popen] = {}
        self.marks_table = "pgbg_e2e.marks"
        """Where the DAGs' children write their numbers (see :meth:`marks`)."""
        self._client: httpx.Client | None = None

    # -- processes ------------------------------------------------------------------------------

    def start(self, name: str, *args: str) -> None:
        log = open(self.home / f"{name}.log", "a")  # noqa: SIM115 - the service writes to it while it runs
        # From AIRFLOW_HOME, as a deployment runs: from the checkout, `-m` would put the editable
        # install's egg-info on sys.path, Airflow would see every plugin of this package twice, and its
        # task runner stops loading plugins at a duplicate (the OpenLineage listener comes after it).
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "airflow", *args],
            cwd=self.home,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Signals the service and every process it started (a supervisor may put its children in
        sessions of their own), and waits for all of them to be gone."""
        proc = self.procs.pop(name)
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)
        _, alive = psutil.wait_procs(tree, timeout=30)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def logs(self) -> str:
        return "\n".join(f"==== {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.home.glob("*.log")))

    # -- REST API -------------------------------------------------------------------------------

    @property
    def api(self) -> httpx.Client:
        if self._client is None:
            password = json.loads((self.home / "passwords.json").read_text())["admin"]
            token = httpx.post(f"{self.url}/auth/token", json={"username": "admin", "password": password}).json()[
                "access_token"
            ]
            self._client = httpx.Client(
                base_url=f"{self.url}/api/v2", timeout=30, headers={"Authorization": f"Bearer {token}"}
            )
        return self._client

    def trigger(self, dag_id: str) -> str:
        r = self.api.post(f"/dags/{dag_id}/dagRuns", json={"logical_date": None})
        r.raise_for_status()
        return r.json()["dag_run_id"]

    def ti(self, dag_id: str, run_id: str, task_id: str = "batch") -> dict[str, Any]:
        r = self.api.get(f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}")
        r.raise_for_status()
        return r.json()

    def mark(self, dag_id: str, run_id: str, state: str, task_id: str = "batch") -> None:
        r = self.api.patch(
            f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}", json={"new_state": state}
        )
        r.raise_for_status()

    def clear(self, dag_id: str, run_id: str, task_id: str = "batch") -> None:
        r = self.api.post(
            f"/dags/{dag_id}/clearTaskInstances",
            json={"dag_run_id": run_id, "task_ids": [task_id], "dry_run": False, "only_failed": False},
        )
        r.raise_for_status()

    def worker_runs(self, dag_id: str) -> int:
        """How many times the executor ran a task of the DAG in a worker process (the schedulers log
        every executor event; a task started and ended in the triggerer has none)."""
        log = "".join(p.read_text() for p in sorted(self.home.glob("scheduler*.log")))
        return log.count(
            f"Received executor event with state success for task instance TaskInstanceKey(dag_id='{dag_id}'"
        )

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.api.get(f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}").json()["state"]

    # -- the engine's view (dsn=..., else engine_dsn, else the main server) -------------------------

    def sql(self, query: str, *params: Any, dsn: str | None = None) -> list[tuple]:
        with psycopg.connect(dsn or self.engine_dsn or self.admin_dsn, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()

    def batches(self, dag_id: str, run_id: str, dsn: str | None = None) -> list[str]:
        rows = self.sql(
            "SELECT uuid_parent FROM pgbg.batch WHERE origin LIKE %s ORDER BY created_at",
            f"{dag_id}/{run_id}/%",
            dsn=dsn,
        )
        return [str(r[0]) for r in rows]

    def children(self, parent: str, dsn: str | None = None) -> list[dict[str, Any]]:
        rows = self.sql(
            "SELECT seq, status::text, start_time_exec, end_time_exec, attempt "
            "FROM pgbg.log_background WHERE uuid_parent = %s ORDER BY seq",
            parent,
            dsn=dsn,
        )
        return [dict(zip(("seq", "status", "start", "end", "attempt"), r, strict=True)) for r in rows]

    def statuses(self, parent: str, dsn: str | None = None) -> list[str]:
        return [c["status"] for c in self.children(parent, dsn)]

    def workers(self, parent: str, dsn: str | None = None) -> int:
        return self.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", f"pgbg:{parent}", dsn=dsn)[
            0
        ][0]

    def watched(self, parent: str, dsn: str | None = None) -> bool:
        """Someone waits for the batch: a trigger (through its triggerer's watcher) or the task on its
        worker holds a watch lock on it."""
        return self.sql("SELECT pgbg.pg_background_watched(%s)", parent, dsn=dsn)[0][0]

    def marks(self, run_id: str, dsn: str | None = None) -> list[int]:
        return [
            r[0] for r in self.sql(f"SELECT n FROM {self.marks_table} WHERE run_id = %s ORDER BY n", run_id, dsn=dsn)
        ]


@contextlib.contextmanager
def running_deployment(
    admin_dsn: str,
    home: Path,
    dags: Path,
    connections: dict[str, str],
    *,
    meta_db: str,
    dag_prefix: str,
    expected_dags: int,
    fleet_dsn: str | None = None,
    managed_dsn: str | None = None,
    settings: dict[str, str] | None = None,
    services: Sequence[tuple[str, Sequence[str]]] = (
        ("scheduler", ("scheduler",)),
        ("dag-processor", ("dag-processor",)),
        ("triggerer", ("triggerer",)),
    ),
    meta_through: str | None = None,
) -> Iterator[Deployment]:
    """Starts the api-server and ``services`` ((name, airflow arguments), by default one scheduler,
    dag-processor and triggerer) with their metadata in ``meta_db`` on the server of ``admin_dsn``
    (recreated; the services reach it through the pooler of DSN ``meta_through`` if given, the
    migration always directly), the DAGs of ``dags``, the Airflow ``connections`` (id -> URI) and more
    ``settings`` (environment variables, e.g. the executor); stops them on exit."""
    params = conninfo_to_dict(admin_dsn)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {meta_db} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {meta_db}")
    meta_user = params.get("user", "postgres")
    meta_password = quote(params.get("password", ""), safe="")

    def meta_url(dsn: str) -> str:
        p = conninfo_to_dict(dsn)
        return (
            f"postgresql+psycopg://{meta_user}:{meta_password}@{p.get('host', '127.0.0.1')}:"
            f"{p.get('port', '5432')}/{meta_db}"
        )

    api_port = _free_port()
    url = f"http://127.0.0.1:{api_port}"
    (home / "passwords.json").write_text(json.dumps({"admin": secrets.token_urlsafe(12)}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta_url(meta_through or admin_dsn),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
            "AIRFLOW__API__BASE_URL": url,
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            # Fast enough for a suite: a dead task found in seconds, a dead triggerer's triggers taken over
            # within a few seconds, a running task told of a state change at its next heartbeat.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "10",
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "5",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        }
    )
    env.update(settings or {})
    env.update({f"AIRFLOW_CONN_{conn_id.upper()}": uri for conn_id, uri in connections.items()})
    d = Deployment(home, env, url, admin_dsn, fleet_dsn, managed_dsn)
    try:
        # Directly: the migration holds a session advisory lock, which a pooler in transaction mode would
        # leave on a server connection.
        migrate_env = {**env, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta_url(admin_dsn)}
        subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"], env=migrate_env, check=True, capture_output=True
        )
        d.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(api_port), "--workers", "1")
        for name, args in services:
            d.start(name, *args)

        def healthy() -> bool:
            try:
                h = httpx.get(f"{url}/api/v2/monitor/health", timeout=2).json()
            except (httpx.HTTPError, ValueError):
                return False
            return all(
                h.get(c, {}).get("status") == "healthy"
                for c in ("metadatabase", "scheduler", "triggerer", "dag_processor")
            )

        wait_for(healthy, 120, "all services healthy", 0.5)
        wait_for(
            lambda: d.api.get("/dags", params={"dag_id_pattern": dag_prefix}).json()["total_entries"] >= expected_dags,
            120,
            "the DAGs parsed",
            0.5,
        )
        yield d
    except BaseException:
        print(d.logs())
        raise
    finally:
        for name in list(d.procs):
            d.kill(name)


def role_uri(dsn: str, role: str, password: str) -> str:
    """The Airflow connection URI of ``role`` on the server of ``dsn``."""
    p = conninfo_to_dict(dsn)
    auth = f"{role}:{quote(password, safe='')}" if password else role
    return f"postgresql://{auth}@{p.get('host', '127.0.0.1')}:{p.get('port', 5432)}/{p.get('dbname', 'postgres')}"
