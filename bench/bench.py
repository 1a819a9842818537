"""make bench: the engine against the alternatives, side by side in one run.

Workloads (issue 6): W1 400 x pg_sleep(0.02) at cap 8; W2 5,000 x SELECT 1 at cap 2; W3 launching
10,000 statements and the median poll on a 10,000-child batch; W4 W1 through Airflow (dag.test).
Baselines: ``thread_pool`` (a psycopg connection per slot, statements run directly), ``seed_style``
(one pg_background worker per statement, queued ones started only when a 1 s poll happens), and
``ideal`` (work / cap). Figures go to bench/results.json and a table on stdout.

Runs in a database of its own (pgbg_bench) with a fresh engine, so other work on the server does not
share its global cap.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from airflow_pgbg.hooks.install import install_engine_dsn  # noqa: E402

SEED_POLL = 1.0  # seconds between polls of the seed-style baseline, as a trigger would poll


def server_dsn() -> str:
    if os.environ.get("PGBG_TEST_DSN"):
        return os.environ["PGBG_TEST_DSN"]
    out = subprocess.run(["bash", str(REPO / "scripts/db.sh")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def bench_database(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS pgbg_bench WITH (FORCE)")
        conn.execute("CREATE DATABASE pgbg_bench")
    bench = make_conninfo(dsn, dbname="pgbg_bench")
    install_engine_dsn(bench)
    return bench


# -- the engine ------------------------------------------------------------------------------------


def engine_run(dsn: str, statements: list[str], cap: int) -> float:
    """Makespan in seconds: from the batch's registration to the end of its last child."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        parent = conn.execute(
            "SELECT pgbg.pg_background_launch_num(%s::text[], p_monitor => false, p_max_parallel => %s)",
            (statements, cap),
        ).fetchone()[0]
        status = conn.execute("SELECT pgbg.pg_background_wait(%s)", (parent,)).fetchone()[0]
        assert status == "done", status
        return conn.execute(
            "SELECT extract(epoch FROM max(c.end_time_exec) - b.created_at)::float8 "
            "FROM pgbg.batch b JOIN pgbg.log_background c USING (uuid_parent) "
            "WHERE b.uuid_parent = %s GROUP BY b.created_at",
            (parent,),
        ).fetchone()[0]


# -- baselines -------------------------------------------------------------------------------------


def thread_pool_run(dsn: str, statements: list[str], cap: int) -> float:
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(cap)]
    try:
        per_thread = [statements[i::cap] for i in range(cap)]

        def work(i: int) -> None:
            for sql in per_thread[i]:
                conns[i].execute(sql)

        started = time.perf_counter()
        with ThreadPoolExecutor(cap) as pool:
            list(pool.map(work, range(cap)))
        return time.perf_counter() - started
    finally:
        for conn in conns:
            conn.close()


def seed_style_run(dsn: str, statements: list[str], cap: int) -> float:
    """One worker per statement; finished ones noticed and replaced only at each poll."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        queue = list(statements)
        running: list[tuple[int, int]] = []
        started = time.perf_counter()
        while queue or running:
            still = []
            for pid, cookie in running:
                if conn.execute("SELECT pg_background_wait_v2(%s, %s, 0)", (pid, cookie)).fetchone()[0]:
                    conn.execute("SELECT pg_background_detach_v2(%s, %s)", (pid, cookie))
                else:
                    still.append((pid, cookie))
            running = still
            while queue and len(running) < cap:
                running.append(conn.execute("SELECT * FROM pg_background_launch_v2(%s)", (queue.pop(),)).fetchone())
            if queue or running:
                time.sleep(SEED_POLL)
        return time.perf_counter() - started


# -- W3 --------------------------------------------------------------------------------------------


def w3(dsn: str) -> tuple[float, float]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        parent = conn.execute(
            "SELECT pgbg.pg_background_launch_num(%s::text[], p_monitor => false, p_max_parallel => 1)",
            (["select pg_sleep(0.01)"] * 10_000,),
        ).fetchone()[0]
        registered = time.perf_counter() - started
        while (
            conn.execute(
                "SELECT count(*) FROM pgbg.log_background WHERE uuid_parent = %s AND start_time_exec IS NOT NULL",
                (parent,),
            ).fetchone()[0]
            == 0
        ):
            time.sleep(0.001)
        first_child = time.perf_counter() - started
        polls = []
        for _ in range(50):
            t = time.perf_counter()
            conn.execute("SELECT * FROM pgbg.pg_background_poll(%s)", (parent,)).fetchone()
            polls.append(time.perf_counter() - t)
            time.sleep(0.02)
        conn.execute("SELECT pgbg.pg_background_stop(%s)", (parent,))
    print(f"  W3 launch: registered in {registered:.3f} s, first child started after {first_child:.3f} s")
    return first_child, statistics.median(polls) * 1000


# -- W4 --------------------------------------------------------------------------------------------

W4_DAG = """
from datetime import datetime
from airflow.sdk import DAG
from airflow_pgbg.operators.batch import PgBackgroundBatchOperator

with DAG("bench_w4", schedule=None, start_date=datetime(2025, 1, 1), catchup=False) as dag:
    PgBackgroundBatchOperator(task_id="w1", postgres_conn_id="pgbg_bench",
                              sql=["select pg_sleep(0.02)"] * 400, max_parallel=8,
                              deferrable=True, poll_interval=1.0)
"""

W4_RUN = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("bench_w4", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
walls = []
for _ in range(2):  # the first run pays the in-process task start-up of a cold interpreter
    dr = module.dag.test()
    (ti,) = dr.get_task_instances()
    assert ti.state == "success", ti.state
    walls.append((ti.end_date - ti.start_date).total_seconds())
print("W4RESULT " + json.dumps({"cold": walls[0], "warm": walls[1]}))
"""


def w4(dsn: str) -> tuple[float, float]:
    """Task wall time (TI start to end) of a warm and of a cold dag.test run."""
    p = conninfo_to_dict(dsn)
    uri = f"postgresql://{p.get('user', 'postgres')}@{p.get('host', 'localhost')}:{p.get('port', 5432)}/{p['dbname']}"
    with tempfile.TemporaryDirectory(prefix="pgbg-bench-") as home:
        dags = Path(home, "dags")
        dags.mkdir()
        (dags / "bench_w4.py").write_text(textwrap.dedent(W4_DAG))
        env = {
            **os.environ,
            "AIRFLOW_HOME": home,
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW_CONN_PGBG_BENCH": uri,
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        }
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True)
        out = subprocess.run(
            [sys.executable, "-c", W4_RUN, str(dags / "bench_w4.py")], env=env, capture_output=True, text=True
        )
        line = next((l for l in out.stdout.splitlines() if l.startswith("W4RESULT ")), None)
        if line is None:
            raise RuntimeError(f"W4 failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        result = json.loads(line.removeprefix("W4RESULT "))
        return result["warm"], result["cold"]


# -- main ------------------------------------------------------------------------------------------


def machine(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        ext = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_background'").fetchone()[0]
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores, {mem_gb:.0f} GB, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, PostgreSQL {version} on loopback, pg_background {ext}"
    )


def main() -> None:
    dsn = bench_database(server_dsn())
    r: dict[str, object] = {}

    w1 = ["select pg_sleep(0.02)"] * 400
    r["w1_ideal"] = 400 * 0.02 / 8
    r["w1_makespan"] = engine_run(dsn, w1, 8)
    r["w1_thread_pool"] = thread_pool_run(dsn, w1, 8)
    subset = 80  # the seed style would need ~50 s for all 400; its rate is stable on a fifth
    r["w1_seed_style"] = seed_style_run(dsn, w1[:subset], 8) * len(w1) / subset
    print(f"  W1 seed_style measured on {subset} of {len(w1)} statements and scaled")

    w2 = ["select 1"] * 5000
    r["w2_children_per_s"] = len(w2) / engine_run(dsn, w2, 2)
    r["w2_thread_pool_per_s"] = len(w2) / thread_pool_run(dsn, w2, 2)
    subset = 10  # about 2 statements per 1 s poll: the whole workload would take most of an hour
    r["w2_seed_style_per_s"] = subset / seed_style_run(dsn, w2[:subset], 2)
    print(f"  W2 seed_style measured on {subset} of {len(w2)} statements")

    r["w3_launch_10k"], r["w3_monitor_10k_median_ms"] = w3(dsn)

    r["w4_ideal"] = r["w1_ideal"]
    r["w4_poll_interval"] = 1.0
    r["w4_task_wall"], r["w4_task_wall_cold"] = w4(dsn)
    print("  W4 task_wall is the second dag.test run in one interpreter; the first (cold) one is w4_task_wall_cold")

    r["machine"] = machine(dsn)
    r["when"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for key, value in r.items():
        print(f"{key:28} {value:.3f}" if isinstance(value, float) else f"{key:28} {value}")
    (REPO / "bench" / "results.json").write_text(json.dumps(r, indent=2) + "\n")
    print(f"written {REPO / 'bench' / 'results.json'}")


if __name__ == "__main__":
    main()
