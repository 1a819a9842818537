"""make bench: the engine against the alternatives, side by side in one run.

Workloads (issue 6): W1 400 x pg_sleep(0.02) at cap 8; W2 5,000 x SELECT 1 at cap 2; W3 launching
10,000 statements and the median poll on a 10,000-child batch; W4 W1 through Airflow (dag.test); W5-W8
(fleet, polls at 100,000, deadlock retries, worker-free DAG runs); W9 the console's queries at 100,000;
W1 and W2 again on the pg_cron launcher; W10 the OpenLineage lineage of a 10,000-statement batch.
Baselines: ``thread_pool`` (a psycopg connection per slot, statements run directly), ``seed_style``
(one pg_background worker per statement, queued ones started only when a 1 s poll happens),
``bare_runner`` (the least an in-server runner with a commit per child does, for W1), and ``ideal``
(work / cap). Figures go to bench/results.json and a table on stdout.

Runs in a database of its own (pgbg_bench) with a fresh engine, so other work on the server does not
share its global cap.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from fleet import w5  # noqa: E402
from lineage_bench import w10  # noqa: E402
from report import with_history  # noqa: E402
from worker_free import RUNS, w8, w8_tuning  # noqa: E402

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
    return engine_run_detail(dsn, statements, cap)[0]


def engine_run_detail(dsn: str, statements: list[str], cap: int) -> tuple[float, float]:
    """Makespan in seconds from the batch's registration, and from the start of its first child."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        parent = conn.execute(
            "SELECT pgbg.pg_background_launch_num(%s::text[], p_monitor => false, p_max_parallel => %s)",
            (statements, cap),
        ).fetchone()[0]
        status = conn.execute("SELECT pgbg.pg_background_wait(%s)", (parent,)).fetchone()[0]
        assert status == "done", status
        return conn.execute(
            "SELECT extract(epoch FROM max(c.end_time_exec) - b.created_at)::float8, "
            "extract(epoch FROM max(c.end_time_exec) - min(c.start_time_exec))::float8 "
            "FROM pgbg.batch b JOIN pgbg.log_background c USING (uuid_parent) "
            "WHERE b.uuid_parent = %s GROUP BY b.created_at",
            (parent,),
        ).fetchone()


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


BARE_RUNNER = """
CREATE TABLE bench_bare_queue (id int PRIMARY KEY, sql text NOT NULL, claimed boolean NOT NULL DEFAULT false,
                               started timestamptz, ended timestamptz);
CREATE INDEX ON bench_bare_queue (id) WHERE NOT claimed;
CREATE PROCEDURE bench_bare_runner()
LANGUAGE plpgsql
AS $$
DECLARE
    c record;
    v_prev int;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', false);
    LOOP
        UPDATE bench_bare_queue SET ended = clock_timestamp() WHERE id = v_prev;
        UPDATE bench_bare_queue SET claimed = true, started = clock_timestamp()
         WHERE id = (SELECT q.id FROM bench_bare_queue q WHERE NOT q.claimed ORDER BY q.id LIMIT 1
                     FOR UPDATE SKIP LOCKED)
        RETURNING id, sql INTO c;
        COMMIT;
        EXIT WHEN c.id IS NULL;
        BEGIN
            EXECUTE c.sql;
        EXCEPTION WHEN OTHERS THEN
            NULL;
        END;
        v_prev := c.id;
    END LOOP;
END
$$;
"""


def bare_runner_run(dsn: str, statements: list[str], cap: int) -> float:
    """W1 through the least an in-server runner does: ``cap`` sessions, already connected, each claiming
    the next statement, running it in a subtransaction and recording its end with the next claim, one
    commit per child (not waiting for a WAL flush), and nothing else: no counts, outcome, settings,
    crash recovery or launch. What one commit per child costs on this machine, under the engine's."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('bench_bare_queue')").fetchone()[0] is None:
            conn.execute(BARE_RUNNER)
        conn.execute("TRUNCATE bench_bare_queue")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO bench_bare_queue (id, sql) VALUES (%s, %s)", list(enumerate(statements)))
        conn.execute("VACUUM ANALYZE bench_bare_queue")
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(cap)]
    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(cap) as pool:
            list(pool.map(lambda c: c.execute("CALL bench_bare_runner()"), conns))
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


def w4(dsn: str, runs: int = RUNS) -> dict[str, object]:
    """Task wall time (TI start to end) of a warm and of a cold dag.test run, each the median of
    ``runs`` interpreters."""
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
        results = []
        for _ in range(runs):
            out = subprocess.run(
                [sys.executable, "-c", W4_RUN, str(dags / "bench_w4.py")], env=env, capture_output=True, text=True
            )
            line = next((x for x in out.stdout.splitlines() if x.startswith("W4RESULT ")), None)
            if line is None:
                raise RuntimeError(f"W4 failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
            results.append(json.loads(line.removeprefix("W4RESULT ")))
    warm, cold = [x["warm"] for x in results], [x["cold"] for x in results]
    return {
        "w4_task_wall": statistics.median(warm),
        "w4_task_wall_runs": warm,
        "w4_task_wall_cold": statistics.median(cold),
        "w4_task_wall_cold_runs": cold,
    }


# -- W6, W7 (engine 0.2.0) -------------------------------------------------------------------------


def _median_poll_ms(conn: psycopg.Connection, parent: str, query: str, n: int = 50) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        conn.execute(query, (parent,)).fetchall()
        times.append(time.perf_counter() - t)
        time.sleep(0.005)
    return statistics.median(times) * 1000


def w6(dsn: str) -> dict[str, float]:
    """A poll of a batch of 100 and of 100,000 children (one running, the rest queued), on engine 0.2.0
    and, for the record, on 0.1.0 in a database of its own."""
    old = make_conninfo(dsn, dbname="pgbg_bench_010")
    with psycopg.connect(make_conninfo(dsn, dbname="postgres"), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS pgbg_bench_010 WITH (FORCE)")
        conn.execute("CREATE DATABASE pgbg_bench_010")
    install_engine_dsn(old, target="0.1.0")
    out: dict[str, float] = {}
    for label, target in (("", dsn), ("_0_1_0", old)):
        with psycopg.connect(target, autocommit=True) as conn:
            for n in (100, 100_000):
                parent = str(
                    conn.execute(
                        "SELECT pgbg.pg_background_launch_num(%s::text[], p_monitor => false, p_max_parallel => 1)",
                        (["select pg_sleep(60)"] * n,),
                    ).fetchone()[0]
                )
                while (
                    conn.execute(
                        "SELECT count(*) FROM pgbg.log_background WHERE uuid_parent = %s AND status = 'running'",
                        (parent,),
                    ).fetchone()[0]
                    == 0
                ):
                    time.sleep(0.01)
                conn.execute("ANALYZE pgbg.log_background")
                out[f"w6_poll_{n}{label}_ms"] = _median_poll_ms(
                    conn, parent, "SELECT * FROM pgbg.pg_background_poll(%s)"
                )
                if not label and n == 100_000:
                    out.update(w9(conn, parent))
                conn.execute("SELECT pgbg.pg_background_stop(%s)", (parent,))
    print(
        f"  W6 poll: {out['w6_poll_100_ms']:.2f} ms at 100 children, {out['w6_poll_100000_ms']:.2f} ms at "
        f"100,000 (engine 0.1.0: {out['w6_poll_100_0_1_0_ms']:.2f} / {out['w6_poll_100000_0_1_0_ms']:.2f} ms)"
    )
    return out


def w9(conn: psycopg.Connection, parent: str, n: int = 20) -> dict[str, float]:
    """The database side of the console's first page of a 100,000-child batch: one page of 100 children
    (problems first, then by seq; and filtered by status) and the figures with 60 bins."""
    queries = {
        "page": "SELECT count(*) FROM pgbg.pg_background_children_page(%s, p_sort => 'status', p_descending => true)",
        "filtered": "SELECT count(*) FROM pgbg.pg_background_children_page(%s, ARRAY['running'])",
        "figures": "SELECT pgbg.pg_background_figures(%s, 60)",
    }
    out = {f"w9_console_{k}_100000_ms": _median_poll_ms(conn, parent, q, n) for k, q in queries.items()}
    print(
        "  W9 console at 100,000 children: page {:.1f} ms, filtered {:.1f} ms, figures {:.1f} ms".format(*out.values())
    )
    return out


def w7(dsn: str) -> dict[str, object]:
    """200 children at cap 8, of which a fifth deadlock pairwise: every child ends done through automatic
    retries of the deadlock victims (deadlock_timeout 100 ms in the bench database)."""
    pairs, sleep, cap = 20, 0.05, 8
    with psycopg.connect(make_conninfo(dsn, dbname="postgres"), autocommit=True) as conn:
        conn.execute("ALTER DATABASE pgbg_bench SET deadlock_timeout = '100ms'")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS w7_acct")
        conn.execute("CREATE TABLE w7_acct (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO w7_acct (id) SELECT g FROM generate_series(1, %s) g", (2 * pairs,))

        def crossing(first: int, second: int) -> str:
            return (
                f"with a as (update w7_acct set v = v + 1 where id = {first} returning 1), "
                f"s as (select pg_sleep({sleep}) from a) "
                f"update w7_acct set v = v + 1 where id = {second} and exists (select 1 from s)"
            )

        statements: list[str] = []
        for k in range(pairs):
            a, b = 2 * k + 1, 2 * k + 2
            statements += [crossing(a, b), crossing(b, a)] + [f"select pg_sleep({sleep})"] * 8
        parent = conn.execute(
            "SELECT pgbg.pg_background_launch_num(%s::text[], p_monitor => false, p_max_parallel => %s, "
            "p_retries => 5, p_retry_delay => '0.05 s')",
            (statements, cap),
        ).fetchone()[0]
        status = conn.execute("SELECT pgbg.pg_background_wait(%s)", (parent,)).fetchone()[0]
        makespan, retried = conn.execute(
            "SELECT extract(epoch FROM max(c.end_time_exec) - b.created_at)::float8, "
            "count(*) FILTER (WHERE c.errors IS NOT NULL) "
            "FROM pgbg.batch b JOIN pgbg.log_background c USING (uuid_parent) WHERE b.uuid_parent = %s "
            "GROUP BY b.created_at",
            (parent,),
        ).fetchone()
        total = conn.execute("SELECT sum(v) FROM w7_acct").fetchone()[0]
    out = {
        "w7_status": status,
        "w7_children_retried": retried,
        "w7_makespan": makespan,
        "w7_ideal": len(statements) * sleep / cap,
        "w7_effects_exactly_once": total == 4 * pairs,
    }
    print(
        f"  W7 {len(statements)} children, {2 * pairs} crossing pairwise: {status} in {makespan:.2f} s "
        f"(ideal {out['w7_ideal']:.2f} s), {retried} deadlock victims retried"
    )
    return out


# -- the pg_cron launcher -------------------------------------------------------------------------


def cron_launcher(runs: int = 3) -> dict[str, object]:
    """W1 and W2 on a server like a managed service (pg_cron, no pg_background), median of ``runs``.

    pg_cron runs jobs only in cron.database_name, so this uses the postgres database of its own server
    (scripts/db.sh --instance managed), with the engine installed afresh.
    """
    out = subprocess.run(
        ["bash", str(REPO / "scripts/db.sh"), "--instance", "managed", "--port", "54321", "--without", "pg_background"],
        check=True,
        capture_output=True,
        text=True,
    )
    dsn = out.stdout.strip().splitlines()[-1]
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('cron.job') IS NOT NULL").fetchone()[0]:
            conn.execute("DELETE FROM cron.job WHERE jobname LIKE 'pgbg%%'")
        conn.execute("DROP SCHEMA IF EXISTS pgbg CASCADE")
    install_engine_dsn(dsn, launcher="pg_cron")
    w1 = [engine_run_detail(dsn, ["select pg_sleep(0.02)"] * 400, 8) for _ in range(runs)]
    w2 = [engine_run_detail(dsn, ["select 1"] * 5000, 2) for _ in range(runs)]
    # W1 and W2 launch right after the batch before, which the role's runners, still there for
    # settings.cron_linger, take at once. A batch launched after they parked waits for pg_cron to start
    # their jobs again: within its next loop, or up to 2 s if the last run has only just ended.
    linger = settings_interval(dsn, "cron_linger")
    return {
        "pg_cron": pg_cron_version(dsn),
        "cron_w1_makespan": statistics.median(r[0] for r in w1),
        "cron_w1_from_first_start": statistics.median(r[1] for r in w1),
        "cron_w1_first_start": statistics.median(r[0] - r[1] for r in w1),
        "cron_w2_children_per_s": statistics.median(5000 / r[0] for r in w2),
        "cron_w2_from_first_start_per_s": statistics.median(5000 / r[1] for r in w2),
        **first_starts(dsn, "cron_", linger, "parked"),
    }


def first_starts(dsn: str, prefix: str, linger: float, gone: str, samples: int = 6) -> dict[str, float]:
    """When the first child of a small batch starts, launched while the role's runners of the batch
    before still linger, and once they have gone (pg_cron: parked, its jobs started again by pg_cron's
    next loop; pg_background: new workers, which compile the engine's routines first)."""
    pauses = random.Random(0)

    def starts(low: float, high: float) -> list[float]:
        out = []
        for _ in range(samples):
            time.sleep(pauses.uniform(low, high))
            makespan, from_first_start = engine_run_detail(dsn, ["select 1"] * 4, 2)
            out.append(makespan - from_first_start)
        return out

    lingering = starts(0.2, linger * 0.8)
    after = starts(linger + 1.5, linger + 3.0)
    return {
        f"{prefix}linger_s": linger,
        f"{prefix}first_start_lingering_median": statistics.median(lingering),
        f"{prefix}first_start_lingering_max": max(lingering),
        f"{prefix}first_start_{gone}_median": statistics.median(after),
        f"{prefix}first_start_{gone}_max": max(after),
    }


def sleep_floor(dsn: str, seconds: float, n: int = 100) -> float:
    """The mean time ``pg_sleep(seconds)`` itself takes in one session, in seconds: the floor under W1.
    PostgreSQL sleeps in whole milliseconds, and sleeps one more when the wait returns a hair early, so
    on some kernels pg_sleep(0.02) takes 21 ms about half the time."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return float(
            conn.execute(
                "SELECT avg(extract(epoch FROM t1 - t0)) FROM (SELECT clock_timestamp() AS t0, pg_sleep(%s),"
                " clock_timestamp() AS t1 FROM generate_series(1, %s)) s",
                (seconds, n),
            ).fetchone()[0]
        )


def settings_interval(dsn: str, column: str) -> float:
    with psycopg.connect(dsn) as conn:
        return float(conn.execute(f"SELECT extract(epoch FROM {column}) FROM pgbg.settings").fetchone()[0])


# -- main ------------------------------------------------------------------------------------------


def pg_cron_version(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'").fetchone()[0]


def machine(dsn: str, cron: str | None = None) -> str:
    with psycopg.connect(dsn) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        ext = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_background'").fetchone()[0]
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores, {mem_gb:.0f} GB, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, PostgreSQL {version} on loopback, pg_background {ext}"
        + (f", pg_cron {cron}" if cron else "")
        + f", openlineage-sql {importlib.metadata.version('openlineage-sql')}"
    )


def engine_version(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT version FROM pgbg.meta").fetchone()[0]


def main() -> None:
    dsn = bench_database(server_dsn())
    r: dict[str, object] = {}

    w1 = ["select pg_sleep(0.02)"] * 400
    r["w1_ideal"] = 400 * 0.02 / 8
    r["w1_floor"] = 400 / 8 * sleep_floor(dsn, 0.02)
    # Back to back, as the pg_cron figures: the first run after the install starts its runners afresh
    # (kept apart as the cold figure); the next ones find the runners of the one before still there.
    runs = [engine_run(dsn, w1, 8) for _ in range(RUNS + 1)]
    r["w1_makespan_cold"], r["w1_makespan_runs"] = runs[0], runs[1:]
    r["w1_makespan"] = statistics.median(runs[1:])
    r["w1_thread_pool_runs"] = [thread_pool_run(dsn, w1, 8) for _ in range(RUNS)]
    r["w1_thread_pool"] = statistics.median(r["w1_thread_pool_runs"])
    r["w1_bare_runner_runs"] = [bare_runner_run(dsn, w1, 8) for _ in range(RUNS)]
    r["w1_bare_runner"] = statistics.median(r["w1_bare_runner_runs"])
    subset = 80  # the seed style would need ~50 s for all 400; its rate is stable on a fifth
    r["w1_seed_style"] = seed_style_run(dsn, w1[:subset], 8) * len(w1) / subset
    print(f"  W1 seed_style measured on {subset} of {len(w1)} statements and scaled")

    w2 = ["select 1"] * 5000
    r["w2_children_per_s_runs"] = [len(w2) / engine_run(dsn, w2, 2) for _ in range(RUNS)]
    r["w2_children_per_s"] = statistics.median(r["w2_children_per_s_runs"])
    r["w2_thread_pool_per_s_runs"] = [len(w2) / thread_pool_run(dsn, w2, 2) for _ in range(RUNS)]
    r["w2_thread_pool_per_s"] = statistics.median(r["w2_thread_pool_per_s_runs"])
    r.update(first_starts(dsn, "", settings_interval(dsn, "linger"), "cold"))
    subset = 10  # about 2 statements per 1 s poll: the whole workload would take most of an hour
    r["w2_seed_style_per_s"] = subset / seed_style_run(dsn, w2[:subset], 2)
    print(f"  W2 seed_style measured on {subset} of {len(w2)} statements")

    r["w3_launch_10k"], r["w3_monitor_10k_median_ms"] = w3(dsn)

    r["w4_ideal"] = r["w1_ideal"]
    r["w4_poll_interval"] = 1.0
    r.update(w4(dsn))
    print(
        f"  W4 task_wall is the second dag.test run in one interpreter, the first (cold) one is w4_task_wall_cold; "
        f"medians of {RUNS} interpreters: {r['w4_task_wall']:.2f} s, cold {r['w4_task_wall_cold']:.2f} s"
    )

    r.update(w5())
    r.update(w6(dsn))
    r.update(w7(dsn))
    r.update(w8(dsn))
    r.update(w8_tuning(dsn))
    r.update(cron_launcher())
    r.update(w10(dsn))

    r["engine"] = engine_version(dsn)
    r["airflow"] = importlib.metadata.version("apache-airflow")
    r["machine"] = machine(dsn, str(r.pop("pg_cron")))
    r["when"] = datetime.now(UTC).isoformat(timespec="seconds")
    for key, value in r.items():
        print(f"{key:28} {value:.3f}" if isinstance(value, float) else f"{key:28} {value}")
    path = REPO / "bench" / "results.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(with_history(r, previous), indent=2, ensure_ascii=False) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
