"""W8: a batch task's DAG run on a real deployment, against the same statements as mapped tasks; and
what Airflow's loop settings change in it (the README's "Tuning Airflow for short batches").

The deployment of the end-to-end suite (tests/e2e/deployment.py: api-server, scheduler with
LocalExecutor parallelism 8, dag-processor, triggerer, metadata in PostgreSQL). Each DAG run's wall
time is its end minus its start as Airflow records them; "from trigger" starts at the REST call's
``queued_at`` instead, which adds the scheduler's pick-up of the queued run. "Worker runs" counts the
executor's task processes for the DAG (on Airflow 3.3 a deferrable batch task starts and ends in the
triggerer). Every Airflow figure is the median of ``RUNS`` DAG runs, the runs kept alongside; the
mapped alternative at 1,000 statements takes minutes: it runs once, with PGBG_BENCH_SLOW=1 only.

CPU is user + system time of a service's whole process tree (the scheduler with its executor, the
triggerer with its trigger runner) and of the PostgreSQL server that holds the metadata and the batch,
read from /proc through psutil: per DAG run, and idle (a deployment with no run, over ``IDLE_S``).

Run alone (``python bench/worker_free.py``) for the tuning figures only; they go into
bench/results.json next to the others.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.e2e.deployment import Deployment, running_deployment, wait_for  # noqa: E402

SLEEP, CAP = 0.05, 8
DEFER_AFTER = 30  # the bench DAG's defer_after: far beyond its batch
RUNS = 3
IDLE_S = 20.0

DAGS = """
from datetime import UTC, datetime
from airflow.sdk import DAG
from airflow.providers.common.sql.operators.sql import SQLExecuteQueryOperator
from airflow_pgbg.operators.batch import PgBackgroundBatchOperator

def statements(n):
    return [f"select pg_sleep({SLEEP}), {{i}} as n" for i in range(n)]

with DAG("bench_w8_warmup", schedule=None, start_date=datetime(2025, 1, 1), catchup=False) as warmup:
    PgBackgroundBatchOperator(task_id="batch", postgres_conn_id="pgbg_bench", sql="select 1", deferrable=True,
                              poll_interval=1)

for n in (200, 1000):
    with DAG(f"bench_w8_batch_{{n}}", schedule=None, start_date=datetime(2025, 1, 1), catchup=False) as dag:
        PgBackgroundBatchOperator(task_id="batch", postgres_conn_id="pgbg_bench", sql=statements(n),
                                  max_parallel={CAP}, deferrable=True, poll_interval=1)
    globals()[f"batch_{{n}}"] = dag
    with DAG(f"bench_w8_mapped_{{n}}", schedule=None, start_date=datetime(2025, 1, 1), catchup=False,
             max_active_tasks={CAP}) as dag:
        SQLExecuteQueryOperator.partial(task_id="statement", conn_id="pgbg_bench").expand(sql=statements(n))
    globals()[f"mapped_{{n}}"] = dag

# The operator's default poll interval, and the task started on a worker instead of in the triggerer.
with DAG("bench_w8_batch_200_poll5", schedule=None, start_date=datetime(2025, 1, 1), catchup=False) as poll5:
    PgBackgroundBatchOperator(task_id="batch", postgres_conn_id="pgbg_bench", sql=statements(200),
                              max_parallel={CAP}, deferrable=True, poll_interval=5)
with DAG("bench_w8_batch_200_worker", schedule=None, start_date=datetime(2025, 1, 1), catchup=False) as worker:
    PgBackgroundBatchOperator(task_id="batch", postgres_conn_id="pgbg_bench", sql=statements(200),
                              max_parallel={CAP}, deferrable=True, poll_interval=1, start_from_trigger=False)
# ... and waiting there for the batch to end before it would defer.
with DAG("bench_w8_batch_200_worker_wait", schedule=None, start_date=datetime(2025, 1, 1), catchup=False) as wait:
    PgBackgroundBatchOperator(task_id="batch", postgres_conn_id="pgbg_bench", sql=statements(200),
                              max_parallel={CAP}, deferrable=True, poll_interval=1, defer_after={DEFER_AFTER})
"""
EXPECTED_DAGS = 8

# Airflow's own names of the settings the tuning section varies; the deployment's other settings stay.
TUNED: dict[str, dict[str, str]] = {
    "idle_0_25": {"AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.25"},
    "idle_0_1": {"AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.1"},
}

SERVICES = ("scheduler", "triggerer")


# -- CPU -------------------------------------------------------------------------------------------


def _tree_cpu(root: psutil.Process) -> float:
    """CPU seconds of a process and its descendants, those that ended included (a parent's
    children_* times hold the children it has reaped)."""
    total = 0.0
    for p in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def _postmaster(dsn: str) -> psutil.Process:
    with psycopg.connect(dsn) as conn:
        return psutil.Process(conn.execute("SELECT pg_backend_pid()").fetchone()[0]).parent()


def cpu(d: Deployment, postmaster: psutil.Process) -> dict[str, float]:
    out = {name: _tree_cpu(psutil.Process(d.procs[name].pid)) for name in SERVICES}
    out["postgres"] = _tree_cpu(postmaster)
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


# -- one DAG run -----------------------------------------------------------------------------------


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def dag_run(d: Deployment, dag_id: str, bench_dsn: str, postmaster: psutil.Process | None = None) -> dict[str, Any]:
    """One DAG run: its wall time, from the trigger, the phases of its task (single-task DAGs) and
    the CPU the services spent meanwhile."""
    before = cpu(d, postmaster) if postmaster else None
    run = d.trigger(dag_id)
    wait_for(lambda: d.run_state(dag_id, run) in ("success", "failed"), 1800, f"{dag_id} to end", 0.5)
    after = cpu(d, postmaster) if postmaster else None
    info = d.api.get(f"/dags/{dag_id}/dagRuns/{quote(run, safe='')}").json()
    if info["state"] != "success":
        raise RuntimeError(f"{dag_id} ended {info['state']}")
    start, end, queued = _ts(info["start_date"]), _ts(info["end_date"]), _ts(info["queued_at"])
    out: dict[str, Any] = {"wall": (end - start).total_seconds(), "from_trigger": (end - queued).total_seconds()}
    if before and after:
        out["cpu"] = _delta(after, before)
    if "mapped" not in dag_id:
        ti = d.ti(dag_id, run)
        ti_start, ti_end = _ts(ti["start_date"]), _ts(ti["end_date"])
        created, last_end = d.sql(
            "SELECT b.created_at, max(c.end_time_exec) FROM pgbg.batch b JOIN pgbg.log_background c "
            "USING (uuid_parent) WHERE b.origin LIKE %s GROUP BY b.created_at",
            f"{dag_id}/{run}/%",
            dsn=bench_dsn,
        )[0]
        out["phases"] = {
            "queued": (start - queued).total_seconds(),
            "to_task": (ti_start - start).total_seconds(),
            "to_batch": (created - ti_start).total_seconds(),
            "batch": (last_end - created).total_seconds(),
            "to_task_end": (ti_end - last_end).total_seconds(),
            "to_run_end": (end - ti_end).total_seconds(),
        }
    return out


def median_runs(
    d: Deployment, dag_id: str, bench_dsn: str, prefix: str, postmaster: psutil.Process | None = None, runs: int = RUNS
) -> dict[str, Any]:
    """``runs`` DAG runs as results.json keys: the median wall and from-trigger time with the runs,
    the median of each phase and of the CPU per run."""
    done = [dag_run(d, dag_id, bench_dsn, postmaster) for _ in range(runs)]
    r: dict[str, Any] = {
        f"{prefix}_run_wall": statistics.median(x["wall"] for x in done),
        f"{prefix}_run_wall_runs": [x["wall"] for x in done],
        f"{prefix}_from_trigger": statistics.median(x["from_trigger"] for x in done),
        f"{prefix}_from_trigger_runs": [x["from_trigger"] for x in done],
    }
    if "phases" in done[0]:
        r[f"{prefix}_phases"] = {k: statistics.median(x["phases"][k] for x in done) for k in done[0]["phases"]}
    if "cpu" in done[0]:
        r[f"{prefix}_cpu_s"] = {k: statistics.median(x["cpu"][k] for x in done) for k in done[0]["cpu"]}
    return r


def idle_cpu(d: Deployment, postmaster: psutil.Process, seconds: float = IDLE_S) -> dict[str, float]:
    """Share of one core each service uses with no DAG run, over ``seconds``."""
    time.sleep(2)  # the last run's closing work is not idle time
    before, started = cpu(d, postmaster), time.monotonic()
    time.sleep(seconds)
    took = time.monotonic() - started
    return {k: v / took for k, v in _delta(cpu(d, postmaster), before).items()}


# -- deployments -----------------------------------------------------------------------------------


@contextlib.contextmanager
def deployment(bench_dsn: str, settings: dict[str, str] | None = None) -> Iterator[Deployment]:
    p = conninfo_to_dict(bench_dsn)
    uri = f"postgresql://{p.get('user', 'postgres')}@{p['host']}:{p['port']}/{p['dbname']}"
    admin = make_conninfo(bench_dsn, dbname="postgres")
    with tempfile.TemporaryDirectory(prefix="pgbg-bench-w8-") as tmp:
        home = Path(tmp)
        dags = home / "dags"
        dags.mkdir()
        (dags / "bench_w8.py").write_text(textwrap.dedent(DAGS.format(SLEEP=SLEEP, CAP=CAP, DEFER_AFTER=DEFER_AFTER)))
        with running_deployment(
            admin,
            home,
            dags,
            {"pgbg_bench": uri},
            meta_db="pgbg_bench_airflow",
            dag_prefix="bench_w8",
            expected_dags=EXPECTED_DAGS,
            settings=settings,
        ) as d:
            # A long-running triggerer has imported the provider and connected: warm it up once.
            dag_run(d, "bench_w8_warmup", bench_dsn)
            yield d


def w8(bench_dsn: str) -> dict[str, Any]:
    """W8 on the deployment's settings (Airflow's defaults for every loop), with the default column of
    the tuning section: idle CPU, the operator's default poll interval, the task started on a worker."""
    slow = bool(os.environ.get("PGBG_BENCH_SLOW"))
    postmaster = _postmaster(bench_dsn)
    r: dict[str, Any] = {"w8_ideal_200": 200 * SLEEP / CAP, "w8_ideal_1000": 1000 * SLEEP / CAP, "w8_runs": RUNS}
    with deployment(bench_dsn) as d:
        r["w8_idle_cpu"] = idle_cpu(d, postmaster)
        r.update(median_runs(d, "bench_w8_batch_200", bench_dsn, "w8_batch_200", postmaster))
        r["w8_batch_200_worker_runs"] = d.worker_runs("bench_w8_batch_200")
        r.update(median_runs(d, "bench_w8_batch_200_poll5", bench_dsn, "w8_poll5_200", postmaster))
        r.update(median_runs(d, "bench_w8_batch_200_worker", bench_dsn, "w8_on_worker_200", postmaster))
        r["w8_on_worker_200_worker_runs"] = d.worker_runs("bench_w8_batch_200_worker")
        r.update(median_runs(d, "bench_w8_batch_200_worker_wait", bench_dsn, "w8_worker_wait_200", postmaster))
        r["w8_worker_wait_200_worker_runs"] = d.worker_runs("bench_w8_batch_200_worker_wait")
        r["w8_worker_wait_defer_after"] = DEFER_AFTER
        r.update(median_runs(d, "bench_w8_batch_1000", bench_dsn, "w8_batch_1000"))
        r.update(median_runs(d, "bench_w8_mapped_200", bench_dsn, "w8_mapped_200"))
        if slow:
            r.update(median_runs(d, "bench_w8_mapped_1000", bench_dsn, "w8_mapped_1000", runs=1))
    print(
        f"  W8 200 x {SLEEP * 1000:.0f} ms at cap {CAP}, median of {RUNS}: batch DAG run "
        f"{r['w8_batch_200_run_wall']:.2f} s ({r['w8_batch_200_worker_runs']} worker runs), "
        f"mapped {r['w8_mapped_200_run_wall']:.2f} s; 1,000: batch {r['w8_batch_1000_run_wall']:.2f} s"
        + (f", mapped {r['w8_mapped_1000_run_wall']:.2f} s" if slow else " (mapped: PGBG_BENCH_SLOW=1)")
    )
    print(f"  W8 phases (median): {r['w8_batch_200_phases']}")
    return r


def w8_tuning(bench_dsn: str) -> dict[str, Any]:
    """W8's 200-statement run and idle CPU on a deployment of its own for each of ``TUNED``."""
    postmaster = _postmaster(bench_dsn)
    r: dict[str, Any] = {"w8_tuned_settings": TUNED}
    for name, settings in TUNED.items():
        with deployment(bench_dsn, settings) as d:
            r[f"w8_tuned_{name}_idle_cpu"] = idle_cpu(d, postmaster)
            r.update(median_runs(d, "bench_w8_batch_200", bench_dsn, f"w8_tuned_{name}_200", postmaster))
        print(
            f"  W8 tuned {name}: run {r[f'w8_tuned_{name}_200_run_wall']:.2f} s, from trigger "
            f"{r[f'w8_tuned_{name}_200_from_trigger']:.2f} s, idle scheduler "
            f"{r[f'w8_tuned_{name}_idle_cpu']['scheduler'] * 100:.1f} % of a core"
        )
    return r


def main() -> None:
    """The W8 and tuning figures alone, as a dated snapshot in bench/results.json's history (the
    README renders them, marked, where the complete run lacks them; the next complete run of the
    same engine supersedes it)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench import bench_database, engine_version, machine, server_dsn

    dsn = bench_database(server_dsn())
    figures = {**w8(dsn), **w8_tuning(dsn)}
    path = REPO / "bench" / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    snapshot = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "engine": engine_version(dsn),
        "machine": machine(dsn),
        "note": ALONE,
        "figures": figures,
    }
    results["history"] = [snapshot, *(h for h in results.get("history", []) if h.get("note") != ALONE)]
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"written {path}")


ALONE = "`python bench/worker_free.py` alone (W8 and its tuning deployments, not a complete `make bench`)"


if __name__ == "__main__":
    main()
