"""W5: a thousand deferred batches on one triggerer process, against a stock-sized server.

A server of its own (scripts/db.sh --instance bench, max_connections 100) holds 1,000 batches of a
few short children; one process runs their 1,000 PgBackgroundBatchTrigger on one asyncio loop, as a
triggerer does. The children wait on an advisory lock until every trigger is subscribed, so each
event's latency is measured from its batch's real end. Reported: the connections that process holds
(peak), the triggers that did not end in success, the end-event latency after a batch's last child
(p50/p95) and the event loop's lag (p99).
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from airflow_pgbg.hooks.install import install_engine_dsn  # noqa: E402
from airflow_pgbg.hooks.watcher import WATCHER_APPLICATION_NAME  # noqa: E402

BATCHES = 1000
CHILDREN = 3
GATE = 4242  # advisory lock the children wait on until every trigger is subscribed

TRIGGERER = """
import asyncio, json, sys, time
from airflow_pgbg.triggers.batch import PgBackgroundBatchTrigger

parents = json.loads(sys.stdin.read())
ended, lags = {}, []

async def ticker(stop):
    while not stop.is_set():
        before = time.monotonic()
        await asyncio.sleep(0.01)
        lags.append(time.monotonic() - before - 0.01)

async def one(parent):
    async for event in PgBackgroundBatchTrigger(parent, "pgbg_w5", poll_interval=5.0).run():
        ended[parent] = (time.time(), type(event).__name__)
        return

async def main():
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(stop))
    tasks = [asyncio.create_task(one(p)) for p in parents]
    await asyncio.sleep(3)  # every trigger subscribed and polled once
    print("SUBSCRIBED", flush=True)
    await asyncio.gather(*tasks)
    stop.set()
    await tick

asyncio.run(main())
print("W5RESULT " + json.dumps({"ended": ended, "lags": lags}), flush=True)
"""


def _server() -> str:
    out = subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "db.sh"),
            "start",
            "--instance",
            "bench",
            "--port",
            "54320",
            "-c",
            "max_connections=100",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def w5() -> dict[str, Any]:
    admin = _server()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS pgbg_w5 WITH (FORCE)")
        conn.execute("CREATE DATABASE pgbg_w5")
        max_connections = int(conn.execute("SHOW max_connections").fetchone()[0])
    admin = make_conninfo(admin, dbname="pgbg_w5")
    install_engine_dsn(admin)
    role, password = f"pgbg_w5_{secrets.token_hex(3)}", secrets.token_hex(8)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE pgbg_user")
    user = make_conninfo(admin, user=role, password=password)
    gate = psycopg.connect(admin, autocommit=True)
    gate.execute("SELECT pg_advisory_lock(%s)", (GATE,))
    try:
        statements = [f"select pg_advisory_xact_lock_shared({GATE}), pg_sleep(0.02)"] * CHILDREN
        with psycopg.connect(user, autocommit=True) as conn:
            parents = [
                str(
                    conn.execute(
                        "SELECT pgbg.pg_background_launch_num(%s::text[], p_monitor => false, p_max_parallel => 2)",
                        (statements,),
                    ).fetchone()[0]
                )
                for _ in range(BATCHES)
            ]
        p = conninfo_to_dict(user)
        with tempfile.TemporaryDirectory(prefix="pgbg-w5-") as home:
            env = {
                **os.environ,
                "AIRFLOW_HOME": home,
                "AIRFLOW__LOGGING__LOGGING_LEVEL": "ERROR",
                "AIRFLOW_CONN_PGBG_W5": f"postgresql://{role}:{password}@{p['host']}:{p['port']}/{p['dbname']}",
            }
            proc = subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(TRIGGERER)],
                env=env,
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert proc.stdin
            assert proc.stdout
            proc.stdin.write(json.dumps(parents))
            proc.stdin.close()
            peak = 0
            sampling = threading.Event()

            def sample() -> None:
                nonlocal peak
                with psycopg.connect(admin, autocommit=True) as conn:
                    while not sampling.is_set():
                        n = conn.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND backend_type = "
                            "'client backend' AND application_name LIKE %s",
                            (role, WATCHER_APPLICATION_NAME + "%"),
                        ).fetchone()[0]
                        peak = max(peak, n)
                        time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            line = proc.stdout.readline()
            if not line.startswith("SUBSCRIBED"):
                raise RuntimeError(f"W5 trigger process failed: {line}{proc.stderr.read()[-3000:]}")
            gate.execute("SELECT pg_advisory_unlock(%s)", (GATE,))  # every batch may run from now
            out = proc.stdout.read()
            err = proc.stderr.read() if proc.stderr else ""
            proc.wait(600)
            sampling.set()
            sampler.join()
        result_line = next((x for x in out.splitlines() if x.startswith("W5RESULT ")), None)
        if result_line is None:
            raise RuntimeError(f"W5 trigger process failed:\n{out[-2000:]}\n{err[-3000:]}")
        result = json.loads(result_line.removeprefix("W5RESULT "))
        with psycopg.connect(admin, autocommit=True) as conn:
            ends = {
                str(r[0]): r[1]
                for r in conn.execute(
                    "SELECT uuid_parent, extract(epoch FROM max(end_time_exec)) FROM pgbg.log_background "
                    "GROUP BY uuid_parent"
                ).fetchall()
            }
    finally:
        gate.close()
    latencies = [result["ended"][p][0] - float(ends[p]) for p in parents if p in result["ended"]]
    failed = BATCHES - sum(1 for p in parents if result["ended"].get(p, (0, ""))[1] == "TaskSuccessEvent")
    figures = {
        "w5_batches": BATCHES,
        "w5_server_max_connections": max_connections,
        "w5_connections_peak": peak,
        "w5_tasks_failed": failed,
        "w5_end_latency_p50_ms": _percentile(latencies, 50) * 1000,
        "w5_end_latency_p95_ms": _percentile(latencies, 95) * 1000,
        "w5_loop_lag_p99_ms": _percentile(result["lags"], 99) * 1000,
    }
    print(
        f"  W5 {BATCHES} triggers on one loop: {peak} connections at peak, {failed} failed, "
        f"end latency p50 {figures['w5_end_latency_p50_ms']:.0f} ms p95 {figures['w5_end_latency_p95_ms']:.0f} ms, "
        f"loop lag p99 {figures['w5_loop_lag_p99_ms']:.1f} ms"
    )
    return figures


if __name__ == "__main__":
    print(json.dumps(w5(), indent=2))
