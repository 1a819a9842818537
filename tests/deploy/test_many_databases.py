"""One triggerer waiting for batches on twenty databases (twenty Airflow connections, see conftest): at
most two connections per database, every batch ends, and the console and the mark listener work for
each database."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter

import httpx
import pytest

from airflow_pgbg.compat import CAN_START_FROM_TRIGGER
from airflow_pgbg.hooks.watcher import WATCHER_APPLICATION_NAME
from airflow_pgbg.links.batch import batch_page_path
from tests.deploy.conftest import Deployment, database_name, service_args, wait_for
from tests.deploy.dags.deploy_dags import DATABASES, GATE
from tests.helpers import gate

pytestmark = pytest.mark.skipif(DATABASES < 2, reason="needs several databases")


class PerDatabase:
    """Peak number of watcher connections per database on the server, sampled every 50 ms."""

    def __init__(self, d: Deployment) -> None:
        self.d = d
        self.peak: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rows = self.d.sql(
                # A backend still starting shows its application_name before its database.
                "SELECT datname, count(*) FROM pg_stat_activity WHERE application_name LIKE %s "
                "AND datname IS NOT NULL GROUP BY 1",
                WATCHER_APPLICATION_NAME + "%",
            )
            for db, n in rows:
                self.peak[db] = max(self.peak[db], n)
            time.sleep(0.05)

    def __enter__(self) -> PerDatabase:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _page(d: Deployment, dag_id: str, run: str, suffix: str = "") -> str:
    base, _, query = batch_page_path(dag_id, run, "batch").partition("?")
    return f"{d.url}{base}{suffix}?{query}"


def test_one_triggerer_waits_on_twenty_databases(celery: Deployment, databases: dict[str, str], record) -> None:
    d = celery
    d.kill("triggerer-2")  # one triggerer for all of them
    try:
        started = time.monotonic()
        with PerDatabase(d) as sampler:
            runs = {i: d.trigger(f"deploy_db_{i:02d}") for i in range(DATABASES)}
            wait_for(
                lambda: all(d.run_state(f"deploy_db_{i:02d}", run) in ("success", "failed") for i, run in runs.items()),
                240,
                "the twenty runs to end",
                1,
            )
        record("twenty runs on twenty databases, wall time (s)", time.monotonic() - started)
        assert {i: d.run_state(f"deploy_db_{i:02d}", run) for i, run in runs.items()} == dict.fromkeys(runs, "success")
        watched = {db for db in sampler.peak if db.startswith("pgbg_deploy_db_")}
        assert watched == {database_name(i) for i in range(DATABASES)}, sampler.peak
        assert max(sampler.peak[db] for db in watched) <= 2, sampler.peak
        record("watcher connections per database, peak", max(sampler.peak[db] for db in watched), 2)
        token = d.api.headers["Authorization"]
        for i, run in runs.items():
            db = databases[f"db_{i:02d}"]
            (parent,) = d.batches(f"deploy_db_{i:02d}", run, dsn=db)
            assert d.statuses(parent, dsn=db) == ["done"] * 3
            assert d.marks(run, dsn=db) == [1, 2, 3]
            # The console reads each batch over its own task's connection.
            reply = httpx.get(_page(d, f"deploy_db_{i:02d}", run, ".json"), headers={"Authorization": token})
            assert reply.status_code == 200, reply.text
            assert reply.json()["batch"]["uuid_parent"] == parent
            assert reply.json()["batch"]["counts"]["done"] == 3
            page = httpx.get(_page(d, f"deploy_db_{i:02d}", run), headers={"Authorization": token})
            assert page.status_code == 200
            assert parent in page.text
        if CAN_START_FROM_TRIGGER:
            assert sum(d.worker_runs(f"deploy_db_{i:02d}") for i in range(DATABASES)) == 0
    finally:
        d.start("triggerer-2", *service_args("triggerer-2"))


def test_a_mark_before_any_triggerer_runs_stops_the_batch_on_each_database(
    celery: Deployment, databases: dict[str, str], record
) -> None:
    """The API server's listener stops each batch over its own connection, with no trigger running."""
    d = celery
    d.kill("triggerer-1")
    d.kill("triggerer-2")
    # A gate in each database (advisory locks are per database), never opened: each batch still runs
    # when its mark comes, however long the twenty runs take to launch and defer; only the stop ends it.
    with contextlib.ExitStack() as gates:
        for i in range(DATABASES):
            gates.enter_context(gate(databases[f"db_{i:02d}"], GATE))
        try:
            runs = {i: d.trigger(f"deploy_db_mark_{i:02d}") for i in range(DATABASES)}
            parents = {}
            for i, run in runs.items():
                db = databases[f"db_{i:02d}"]
                parents[i] = wait_for(
                    lambda i=i, run=run, db=db: (
                        (b := d.batches(f"deploy_db_mark_{i:02d}", run, dsn=db))
                        and d.ti(f"deploy_db_mark_{i:02d}", run)["state"] == "deferred"
                        and b[-1]
                    ),
                    240,
                    f"deploy_db_mark_{i:02d} deferred after launching on a Celery worker",
                    0.5,
                )
            marked = time.monotonic()
            for i, run in runs.items():
                d.mark(f"deploy_db_mark_{i:02d}", run, "failed")
            for i, parent in parents.items():
                db = databases[f"db_{i:02d}"]
                wait_for(
                    lambda p=parent, db=db: set(d.statuses(p, dsn=db)) == {"stopped"} and d.workers(p, dsn=db) == 0,
                    120,
                    f"the batch on {database_name(i)} to stop",
                    0.2,
                )
                assert d.sql("SELECT stop_requested_by FROM pgbg.batch WHERE uuid_parent = %s", parent, dsn=db)[0][
                    0
                ] == ("airflow: task instance marked failed")
            record("twenty batches stopped after their marks (s)", time.monotonic() - marked)
        finally:
            d.start("triggerer-1", *service_args("triggerer-1"))
            d.start("triggerer-2", *service_args("triggerer-2"))
