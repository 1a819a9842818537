"""CeleryExecutor with two schedulers, two triggerers and two Celery workers (see conftest): batch tasks
with and without a worker, a Celery worker killed while its task waits, a triggerer killed while it
holds deferred batches, and marks that stop a batch."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from datetime import datetime

import psutil
from psycopg.conninfo import make_conninfo

from airflow_pgbg.compat import CAN_START_FROM_TRIGGER, TRIGGER_HAS_ON_KILL
from airflow_pgbg.hooks.watcher import WATCHER_APPLICATION_NAME
from tests.deploy.conftest import META_DB, Deployment, service_args, wait_for
from tests.deploy.dags.deploy_dags import GATE
from tests.helpers import gate

WORKERS = ("worker-1", "worker-2")


def _service_of(d: Deployment, pid: int, names: tuple[str, ...]) -> str | None:
    """The service whose process tree holds ``pid``."""
    for name in names:
        proc = d.procs.get(name)
        if proc is None:
            continue
        try:
            root = psutil.Process(proc.pid)
            if pid == root.pid or pid in {c.pid for c in root.children(recursive=True)}:
                return name
        except psutil.NoSuchProcess:
            continue
    return None


def _processes_with(d: Deployment, where: str, *params: object) -> set[int]:
    """Local processes whose connections to the main server match ``where`` (on pg_stat_activity)."""
    ports = {r[0] for r in d.sql(f"SELECT client_port FROM pg_stat_activity WHERE {where}", *params)}
    return {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port in ports and c.pid}


def _watching(d: Deployment, parent: str, names: tuple[str, ...]) -> set[str]:
    """The services among ``names`` whose processes hold a watch lock on the batch (the triggers and
    the blocking task connect to the batch's database directly: a watch is a lock, not a heartbeat)."""
    pids = _processes_with(
        d,
        "pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 "
        "AND classid = pgbg._watch_key(%s)::oid)",
        parent,
    )
    return {name for pid in pids if (name := _service_of(d, pid, names))}


def _batch(d: Deployment, dag_id: str, run_id: str, state: str, running: int) -> str:
    def ready() -> str | None:
        batches = d.batches(dag_id, run_id)
        if (
            batches
            and d.ti(dag_id, run_id)["state"] == state
            and d.statuses(batches[-1]).count("running") >= running
            and d.watched(batches[-1])
        ):
            return batches[-1]
        return None

    return wait_for(ready, 120, f"{dag_id} {state} with {running} running children", 0.3)


def test_1_a_worker_free_and_a_blocking_batch_task_succeed(celery: Deployment, record) -> None:
    d = celery
    started = time.monotonic()
    free, blocking = d.trigger("deploy_worker_free"), d.trigger("deploy_blocking")
    wait_for(lambda: d.run_state("deploy_worker_free", free) == "success", 120, "the worker-free run")
    wait_for(lambda: d.run_state("deploy_blocking", blocking) == "success", 120, "the blocking run")
    record("both runs, wall time (s)", time.monotonic() - started)
    assert d.marks(free) == [1, 2, 3, 4]
    assert d.marks(blocking) == [1, 2, 3, 4]
    wait_for(lambda: d.worker_runs("deploy_blocking") >= 1, 30, "the Celery run to be logged", 0.5)
    assert d.worker_runs("deploy_blocking") == 1
    if CAN_START_FROM_TRIGGER:
        assert d.worker_runs("deploy_worker_free") == 0  # started and ended in a triggerer


def test_2_a_killed_celery_worker_s_retry_takes_the_batch_s_outcome(celery: Deployment, record) -> None:
    """The whole Celery worker (main process, pool and task processes) dies by SIGKILL while its task
    waits for a batch: the batch runs on; the retry, on the other worker, takes its outcome. Nothing is
    launched again and no child runs twice (issue #27)."""
    d = celery
    # The children wait at the gate until the retry waits for the batch: the worker dies while its task
    # waits, and the retry attaches to a batch still running, however slow the machine.
    with gate(d.admin_dsn, GATE) as g:
        run = d.trigger("deploy_worker_killed")
        parent = _batch(d, "deploy_worker_killed", run, "running", 2)
        # The worker that runs the try, by the task process's pid that Airflow records: a session left idle
        # by the other worker's earlier task, its last query a poll too, once named the wrong one (which
        # was killed, and the try never retried).
        worker = wait_for(
            lambda: (pid := d.ti("deploy_worker_killed", run).get("pid")) and _service_of(d, pid, WORKERS),
            30,
            "the worker running the try",
        )
        wait_for(
            lambda: (
                {
                    _service_of(d, pid, WORKERS)
                    for pid in _processes_with(
                        d,
                        "usename = 'pgbg_deploy' AND backend_type = 'client backend' AND state = 'active' "
                        "AND query LIKE '%%pg_background_poll%%'",
                    )
                }
                == {worker}
            ),
            30,
            f"the task polling the batch from {worker}",
        )
        other = next(w for w in WORKERS if w != worker)
        d.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        try:
            wait_for(
                lambda: d.ti("deploy_worker_killed", run)["try_number"] == 2 and _watching(d, parent, (other,)),
                240,
                f"the retry on {other} to wait for the batch",
                0.5,
            )
            assert d.statuses(parent).count("running") == 2  # the retry found it still running
            g.open()
            wait_for(lambda: d.run_state("deploy_worker_killed", run) in ("success", "failed"), 240, "the retry to end")
            record("success after a Celery worker SIGKILL (s)", time.monotonic() - killed)
            assert d.run_state("deploy_worker_killed", run) == "success"
            assert d.ti("deploy_worker_killed", run)["try_number"] == 2
            assert d.batches("deploy_worker_killed", run) == [parent]  # nothing relaunched
            assert d.statuses(parent) == ["done"] * 4
            assert [c["attempt"] for c in d.children(parent)] == [1] * 4  # no child ran twice
            assert d.marks(run) == [1, 2, 3, 4]
        finally:
            d.start(worker, *service_args(worker))


def _deferred_on_triggerer_1(d: Deployment, dag_id: str, n: int) -> dict[str, str]:
    """``n`` runs of ``dag_id`` deferred on triggerer-1 alone, then triggerer-2 back up: run -> batch."""
    d.kill("triggerer-2")
    try:
        runs = [d.trigger(dag_id) for _ in range(n)]
        parents = {run: _batch(d, dag_id, run, "deferred", 0) for run in runs}
    finally:
        d.start("triggerer-2", *service_args("triggerer-2"))
    wait_for(lambda: len(_live_triggerers(d)) == 2, 60, "both triggerers alive", 0.5)
    assigned = dict(
        d.sql("SELECT triggerer_id, count(*) FROM trigger WHERE triggerer_id IS NOT NULL GROUP BY 1", dsn=_meta_dsn(d))
    )
    assert list(assigned.values()) == [n], assigned
    return parents


def test_3_a_killed_triggerer_s_deferred_batches_all_end_done(celery: Deployment, record) -> None:
    """Triggerer-1 holds ten deferred batches and dies by SIGKILL: triggerer-2 takes them over, all end
    done, nothing is launched twice."""
    d = celery
    # Gated until triggerer-2 watches every batch: none ends before the takeover it is there to prove.
    with gate(d.admin_dsn, GATE) as g:
        parents = _deferred_on_triggerer_1(d, "deploy_many_deferred", 10)
        d.kill("triggerer-1", signal.SIGKILL)
        killed = time.monotonic()
        try:
            wait_for(
                lambda: all(_watching(d, p, ("triggerer-2",)) for p in parents.values()),
                180,
                "triggerer-2 to watch the ten batches",
                1,
            )
            g.open()
            wait_for(
                lambda: all(d.run_state("deploy_many_deferred", run) in ("success", "failed") for run in parents),
                180,
                "the ten runs to end",
                1,
            )
            record("ten deferred runs ended after a triggerer SIGKILL (s)", time.monotonic() - killed)
            assert {run: d.run_state("deploy_many_deferred", run) for run in parents} == dict.fromkeys(
                parents, "success"
            )
            for run, parent in parents.items():
                assert d.batches("deploy_many_deferred", run) == [parent]
                assert d.statuses(parent) == ["done"] * 3
                assert [c["attempt"] for c in d.children(parent)] == [1] * 3
                assert d.marks(run) == [1, 2, 3]
        finally:
            d.start("triggerer-1", *service_args("triggerer-1"))


def test_3b_a_stalled_triggerer_loses_its_triggers_and_the_batches_run_on(celery: Deployment, record) -> None:
    """A triggerer frozen (SIGSTOP) for longer than the health check threshold: the other one takes its
    triggers over; when it thaws, Airflow 3.3 cancels its copies "by user action" and calls their
    on_kill(), which must not stop the batches the other triggerer now waits for."""
    d = celery
    # Gated until the thawed triggerer is done with its copies: a batch that ended before would prove
    # nothing about their on_kill.
    with gate(d.admin_dsn, GATE) as g:
        parents = _deferred_on_triggerer_1(d, "deploy_long_deferred", 4)  # 12 runners: under the cap of 15
        runs = list(parents)
        (first_id,) = dict(
            d.sql(
                "SELECT triggerer_id, count(*) FROM trigger WHERE triggerer_id IS NOT NULL GROUP BY 1",
                dsn=_meta_dsn(d),
            )
        )
        root = psutil.Process(d.procs["triggerer-1"].pid)
        frozen = [root, *root.children(recursive=True)]
        for p in frozen:
            p.send_signal(signal.SIGSTOP)
        try:
            # AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD is 5 s in these deployments.
            second_id = wait_for(
                lambda: (
                    (
                        ids := d.sql(
                            "SELECT DISTINCT triggerer_id FROM trigger WHERE triggerer_id IS NOT NULL", dsn=_meta_dsn(d)
                        )
                    )
                    and len(ids) == 1
                    and ids[0][0] != first_id
                    and ids[0][0]
                ),
                60,
                "the other triggerer to take the triggers over",
            )
            # Triggerer-2's copies wait for the batches, and its watcher has been through a round since
            # (where it asks for their watches), before the thaw: else it would be the thawed
            # triggerer that let the watches go first. A trigger that can launch its batch waits right
            # after it logs the batch attached; one that cannot, right after it starts.
            waits = " attached " if CAN_START_FROM_TRIGGER else " starting"
            attached = wait_for(
                lambda: (
                    (at := [_trigger_log_time(d, "deploy_long_deferred", run, second_id, waits) for run in runs])
                    and all(at)
                    and max(at)
                ),
                60,
                "triggerer-2's copies to attach to the batches",
                0.5,
            )
            wait_for(
                lambda: _watcher_round_since(d, "triggerer-2", attached),
                60,
                "triggerer-2's watcher to go through a round",
                0.5,
            )
        finally:
            for p in frozen:
                p.send_signal(signal.SIGCONT)
        thawed = time.monotonic()
        if TRIGGER_HAS_ON_KILL:
            # The triggerer logs "trigger completed" once on_kill() has returned (or timed out).
            wait_for(
                lambda: all(
                    _trigger_log_time(d, "deploy_long_deferred", run, first_id, '"trigger completed"') for run in runs
                ),
                120,
                "the thawed triggerer to end its copies",
                0.5,
            )
        else:
            wait_for(
                lambda: not any(_watching(d, p, ("triggerer-1",)) for p in parents.values()),
                120,
                "the thawed triggerer to let its copies go",
                0.5,
            )
        stopped = {
            run: (
                d.sql("SELECT stop_requested_at FROM pgbg.batch WHERE uuid_parent = %s", parent)[0][0],
                set(d.statuses(parent)) - {"running", "queued"},
            )
            for run, parent in parents.items()
        }
        assert stopped == {run: (None, set()) for run in runs}, (
            "the thawed triggerer stopped batches that triggerer-2 waits for",
            stopped,
        )
        g.open()
        wait_for(
            lambda: all(d.run_state("deploy_long_deferred", run) in ("success", "failed") for run in runs),
            180,
            "the runs to end",
            1,
        )
    record("runs ended after the stalled triggerer thawed (s)", time.monotonic() - thawed)
    assert {run: d.run_state("deploy_long_deferred", run) for run in runs} == dict.fromkeys(runs, "success")
    for run, parent in parents.items():
        assert d.batches("deploy_long_deferred", run) == [parent]
        assert d.statuses(parent) == ["done"] * 3
        assert d.marks(run) == [1, 2, 3]


def _trigger_log_time(d: Deployment, dag_id: str, run_id: str, triggerer_id: int, text: str) -> datetime | None:
    """When the log that triggerer wrote for the run's trigger first held ``text`` (None: not yet)."""
    for path in (d.home / "logs").glob(f"dag_id={dag_id}/run_id={run_id}/task_id=batch/*.trigger.{triggerer_id}.log"):
        for line in path.read_text(errors="replace").splitlines():
            if text in line:
                with contextlib.suppress(ValueError, KeyError):
                    return datetime.fromisoformat(json.loads(line)["timestamp"])
    return None


def _watcher_round_since(d: Deployment, service: str, since: datetime) -> bool:
    """Whether the service's batch watcher sent a query after ``since``."""
    ports = {
        r[0]
        for r in d.sql(
            "SELECT client_port FROM pg_stat_activity WHERE application_name = %s AND query_start > %s",
            WATCHER_APPLICATION_NAME,
            since,
        )
    }
    pids = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port in ports and c.pid}
    return any(_service_of(d, pid, (service,)) for pid in pids)


def _live_triggerers(d: Deployment) -> list[int]:
    rows = d.sql(
        "SELECT id FROM job WHERE job_type = 'TriggererJob' AND state = 'running' "
        "AND latest_heartbeat > now() - interval '3 seconds'",
        dsn=_meta_dsn(d),
    )
    return [r[0] for r in rows]


def test_4_marking_a_task_failed_stops_its_children(celery: Deployment, record) -> None:
    d = celery
    # The gate never opens: only the stop of the mark ends the children.
    with gate(d.admin_dsn, GATE):
        deferred, blocking = d.trigger("deploy_mark_failed"), d.trigger("deploy_blocking_mark_failed")
        deferred_parent = _batch(d, "deploy_mark_failed", deferred, "deferred", 2)
        blocking_parent = _batch(d, "deploy_blocking_mark_failed", blocking, "running", 2)
        for dag_id, run, parent, kind in (
            ("deploy_mark_failed", deferred, deferred_parent, "deferred (trigger's on_kill)"),
            ("deploy_blocking_mark_failed", blocking, blocking_parent, "on a Celery worker (on_kill)"),
        ):
            marked = time.monotonic()
            d.mark(dag_id, run, "failed")
            wait_for(lambda p=parent: set(d.statuses(p)) == {"stopped"} and d.workers(p) == 0, 60, "the batch to stop")
            record(f"children stopped after mark failed, {kind} (s)", time.monotonic() - marked, 30)
            assert d.sql("SELECT stop_requested_at IS NOT NULL FROM pgbg.batch WHERE uuid_parent = %s", parent)[0][0]


def _meta_dsn(d: Deployment) -> str:
    """The metadata database, directly (not through the pooler the services use)."""
    return make_conninfo(d.admin_dsn, dbname=META_DB)
