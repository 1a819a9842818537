"""Runners killed at each step of a child's life, on both launchers: the promised state, every time.

A runner is held at a precise step by a lock the test holds, then killed there: terminated (as a
person or a pooler does), or with SIGKILL, which makes the server restart (as a crash does). The
promise: no child stuck, none run twice, none done without its effect; an inline child, which rolls
back with its runner, runs again instead of being lost; a child that may have committed in a worker or
job of its own is lost (or, under pg_cron, which records how its job ended, settled as it ended).

The servers are instances of scripts/db.sh of their own (tests.servers), restarted at will.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from airflow_pgbg.hooks.install import install_engine_dsn
from tests.helpers import gate, monitor, poll_until, retire_role, statuses
from tests.servers import FLEET, MANAGED, Instance, local_servers_or_skip


def _running(pid: int) -> bool:
    """Whether a process is there and has not ended (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@dataclass
class Server:
    """A restartable server running the engine on one launcher, with a role of pgbg_user."""

    launcher: str
    instance: Instance
    admin_dsn: str
    user_dsn: str

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(self.admin_dsn, autocommit=True)

    def user(self) -> psycopg.Connection:
        return psycopg.connect(self.user_dsn, autocommit=True)

    def kill(self, pid: int, how: str) -> None:
        """Terminates a backend, or kills it with SIGKILL and waits for the server's crash restart."""
        if how == "terminate":
            with self.admin() as admin:
                assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
            return
        # A process that has just ended on its own, not yet reaped by the postmaster, takes the signal and
        # no crash follows: for the caller, as one that had ended before it (ProcessLookupError).
        if not _running(pid):
            raise ProcessLookupError(pid)
        with self.admin() as witness:
            os.kill(pid, signal.SIGKILL)
            try:
                poll_until(lambda: not self._alive(witness), 30, 0.05, "the server to restart after the crash")
            except AssertionError:
                if not _running(pid):
                    raise ProcessLookupError(pid) from None
                raise
        poll_until(self._accepting, 60, 0.2, "the server to come back from its crash restart")

    @staticmethod
    def _alive(conn: psycopg.Connection) -> bool:
        try:
            conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def _accepting(self) -> bool:
        try:
            with self.admin() as admin:
                return admin.execute("SELECT NOT pg_is_in_recovery()").fetchone()[0]
        except psycopg.OperationalError:
            return False


@pytest.fixture(scope="module", params=["pg_background", "pg_cron"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    local_servers_or_skip()
    instance = FLEET if request.param == "pg_background" else MANAGED
    admin_dsn = instance.start()
    install_engine_dsn(admin_dsn, launcher=request.param)
    name, password = f"pgbg_fault_{secrets.token_hex(3)}", secrets.token_hex(8)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}' IN ROLE pgbg_user")
        conn.execute(f"CREATE SCHEMA {name} AUTHORIZATION {name}")
    yield Server(request.param, instance, admin_dsn, make_conninfo(admin_dsn, user=name, password=password))
    instance.start()  # whatever a test left it in
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        retire_role(conn, name)  # its schema goes with what it owns


@pytest.fixture
def effects(server: Server) -> str:
    """A table whose rows are the children's effects, one per run of a child."""
    table = f"effects_{secrets.token_hex(3)}"
    with server.user() as user:
        user.execute(f"CREATE TABLE {table} (seq int)")
    return table


def _launch(server: Server, statements: list[str], **options: Any) -> str:
    names = "".join(f", p_{k} => %({k})s" for k in options)
    with server.user() as user:
        return str(
            user.execute(
                f"SELECT pgbg.pg_background_launch_num(%(q)s::text[], p_monitor => false{names})",
                {"q": statements, **options},
            ).fetchone()[0]
        )


def _await(server: Server, parent: str) -> str:
    """The batch's final status, waited for as a psql user would (housekeeping included)."""
    with server.user() as user:
        return user.execute("CALL pgbg.pg_background_await(%s, '90 s', NULL)", (parent,)).fetchone()[0]


def _runner_waiting(server: Server, parent: str) -> int | None:
    """The pid of the batch's runner while it waits for a lock the test holds on a table or a row (not
    for a gate: a runner just let through one may still show that wait)."""
    with server.admin() as admin:
        row = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock' "
            "AND wait_event IN ('relation', 'tuple', 'transactionid')",
            (f"pgbg:{parent}",),
        ).fetchone()
    return row[0] if row else None


def _runner_running(server: Server, parent: str) -> int | None:
    with server.admin() as admin:
        row = admin.execute(
            "SELECT a.pid FROM pg_stat_activity a JOIN pgbg.log_background c ON c.pid = a.pid "
            "WHERE a.application_name = %s AND c.uuid_parent = %s AND c.status = 'running'",
            (f"pgbg:{parent}", parent),
        ).fetchone()
    return row[0] if row else None


def _effects(server: Server, table: str) -> list[int]:
    with server.user() as user:
        return sorted(r[0] for r in user.execute(f"SELECT seq FROM {table}").fetchall())


def _children(server: Server, parent: str) -> list[dict[str, Any]]:
    with server.user() as user:
        return monitor(user, parent)


def _schema(server: Server) -> str:
    """The role's own schema, where its tables go (the role's search_path starts with it)."""
    with server.user() as user:
        return user.execute("SELECT current_user").fetchone()[0]


def _held(server: Server, sql: str, then: Callable[[], None]) -> None:
    """Runs ``then`` while a transaction of the admin holds what ``sql`` locks (until then() returns,
    or the server restarts)."""
    holder = server.admin()
    try:
        holder.execute("BEGIN")
        holder.execute(sql)
        then()
    finally:
        with contextlib.suppress(psycopg.Error):  # gone with a crash restart
            holder.close()


KILLS = ["terminate", "sigkill"]


def _history(child: dict[str, Any]) -> list[str]:
    return [e["status"] for e in child["errors"] or []]


def _ran_again_once(child: dict[str, Any], how: str) -> None:
    """An inline child whose runner died ran again, once. After a crash restart it may instead never have
    been claimed: claims commit without waiting for a WAL flush, and one lost in a crash leaves the child
    queued as it was."""
    assert (child["attempt"], _history(child)) in ([(2, ["interrupted"])] + [(1, [])] * (how == "sigkill"))


@pytest.mark.parametrize("how", KILLS)
def test_killed_while_it_records_an_outcome_and_claims_the_next(server: Server, effects: str, how: str) -> None:
    """Held where the outcome of an inline child and the claim of the next commit together."""
    with gate(server.admin_dsn) as g:
        parent = _launch(
            server,
            [f"insert into {effects} select 1 from {g.sql}", f"insert into {effects} values (2)"],
            max_parallel=1,
        )
        g.wait_for(1)  # the first child runs until the counters are locked

        def kill_at_the_claim() -> None:
            g.open()
            pid = poll_until(lambda: _runner_waiting(server, parent), 30, 0.02, "the runner to wait for its count")
            server.kill(pid, how)

        # The counters are written in the transaction of every outcome and claim.
        _held(server, "LOCK TABLE pgbg.batch_progress IN SHARE MODE", kill_at_the_claim)
    assert _await(server, parent) == "done"
    assert _effects(server, effects) == [1, 2]  # each exactly once: the first rolled back with its runner
    first, second = _children(server, parent)
    _ran_again_once(first, how)
    assert (second["attempt"], second["errors"]) == (1, None)  # its claim had not committed


@pytest.mark.parametrize("how", KILLS)
def test_killed_after_the_claim_committed_before_the_statement_did_anything(
    server: Server, effects: str, how: str
) -> None:
    with server.user() as user:
        user.execute(f"CREATE TABLE {effects}_gate ()")
    launched: list[str] = []

    def kill_at_the_statement() -> None:
        launched.append(
            _launch(server, [f"insert into {effects} select 1 from (select count(*) from {effects}_gate) g"])
        )
        pid = poll_until(lambda: _runner_waiting(server, launched[0]), 30, 0.02, "the child to wait for its table")
        server.kill(pid, how)

    _held(server, f"LOCK TABLE {_schema(server)}.{effects}_gate IN ACCESS EXCLUSIVE MODE", kill_at_the_statement)
    (parent,) = launched
    assert _await(server, parent) == "done"
    assert _effects(server, effects) == [1]
    (child,) = _children(server, parent)
    _ran_again_once(child, how)


@pytest.mark.parametrize("how", KILLS)
def test_killed_during_an_inline_statement(server: Server, effects: str, how: str) -> None:
    # The child waits at a gate until its runner is killed (a 2-s child had to outlast the poll and the
    # kill); after a terminate the test opens it for the run again, a crash restart ends its session.
    with gate(server.admin_dsn) as g:
        parent = _launch(server, [f"insert into {effects} select 1 from {g.sql}"])
        pid = poll_until(lambda: _runner_running(server, parent), 30, 0.02, "the child running")
        g.wait_for(1)
        server.kill(pid, how)
        if how == "terminate":
            g.open()
    assert _await(server, parent) == "done"
    assert _effects(server, effects) == [1]
    (child,) = _children(server, parent)
    _ran_again_once(child, how)


@pytest.mark.parametrize("how", KILLS)
def test_killed_after_its_own_worker_committed_before_the_outcome_was_recorded(
    server: Server, effects: str, how: str
) -> None:
    """A statement of its own worker or job (a CALL runs at top level) commits there; its runner dies
    before it records how it ended."""
    with gate(server.admin_dsn) as g:
        with server.user() as user:
            # It ends, after its commit, only once the test holds the row its runner records the outcome in.
            user.execute(
                f"CREATE PROCEDURE {effects}_one() LANGUAGE plpgsql AS "
                f"$$ BEGIN insert into {effects} values (1); COMMIT; PERFORM {g.sql}; END $$"
            )
        parent = _launch(server, [f"call {effects}_one()"])
        poll_until(lambda: statuses(_children(server, parent)) == ["running"], 30, what="the child running")

        def kill_at_the_outcome() -> None:
            poll_until(lambda: _effects(server, effects) == [1], 30, 0.05, "the worker to commit")
            g.wait_for(1)
            g.open()
            pid = poll_until(lambda: _runner_waiting(server, parent), 30, 0.02, "the runner to record the outcome")
            server.kill(pid, how)

        _held(
            server, f"SELECT 1 FROM pgbg.log_background WHERE uuid_parent = '{parent}' FOR UPDATE", kill_at_the_outcome
        )
    if server.launcher == "pg_cron":
        # pg_cron keeps how the child's job ended: the child is settled as it ended.
        assert _await(server, parent) == "done"
        assert _children(server, parent)[0]["result"]["command"] == "CALL"
    else:
        # Nothing says whether it committed: lost (this batch does not retry lost children).
        assert _await(server, parent) == "lost"
    assert _effects(server, effects) == [1]  # never twice
    assert _children(server, parent)[0]["attempt"] == 1


def test_killed_before_it_made_its_childs_job_spent(server: Server, effects: str) -> None:
    """Under pg_cron a child that must run at top level is the command of a job of its own, which pg_cron
    starts again every second until its runner unschedules it; once the run has begun, the runner makes
    that command a no-op. A runner terminated before it could left the statement to run again, a second
    after each run ended (a stop cancelled one run after the other, and the child never settled)."""
    if server.launcher != "pg_cron":
        pytest.skip("a pg_background runner's nested worker runs once")
    with gate(server.admin_dsn) as g:
        with server.user() as user:
            # Its work commits, then it waits at the gate: what it did is there to count.
            user.execute(
                f"CREATE PROCEDURE {effects}_one() LANGUAGE plpgsql AS "
                f"$$ BEGIN insert into {effects} values (1); COMMIT; PERFORM {g.sql}; END $$"
            )
        job = "SELECT jobid FROM cron.job WHERE jobname = 'pgbg_child:' || %s AND command LIKE 'call %%'"
        with server.admin() as admin:

            def child_job() -> int | None:
                uuid = admin.execute(
                    "SELECT uuid_child FROM pgbg.log_background WHERE uuid_parent = %s", (launched[0],)
                ).fetchone()[0]
                row = admin.execute(job, (str(uuid),)).fetchone()
                return row[0] if row else None

            launched = [_launch(server, [f"call {effects}_one()"])]
            jobid = poll_until(child_job, 30, 0.02, "the child's job")
            # Its row in cron.job held: the runner waits there to make the command a no-op.
            holder = server.admin()
            holder.execute("BEGIN")
            holder.execute("SELECT 1 FROM cron.job WHERE jobid = %s FOR UPDATE", (jobid,))
            poll_until(lambda: _effects(server, effects) == [1], 30, 0.05, "the job's run to commit its work")
            g.wait_for(1)
            pid = poll_until(lambda: _runner_waiting(server, launched[0]), 30, 0.02, "the runner to wait for the job")
            server.kill(pid, "terminate")
            holder.close()
            # Whoever settles the child now must first make the job's later runs no-ops.
            poll_until(
                lambda: (
                    not admin.execute(
                        "SELECT 1 FROM cron.job WHERE jobid = %s AND command <> pgbg._cron_spent_command()", (jobid,)
                    ).fetchone()
                ),
                30,
                0.05,
                "the job's command to be spent",
            )
    # The gate is open: the run ends; a run pg_cron starts after it does nothing.
    (parent,) = launched
    with server.user() as user:
        assert user.execute("SELECT pgbg.pg_background_wait(%s, '60 s')", (parent,)).fetchone()[0] == "done"
    assert _effects(server, effects) == [1]  # once
    (child,) = _children(server, parent)
    assert (child["attempt"], child["result"]["command"]) == (1, "CALL")


def test_a_wait_drives_a_batch_whose_runners_all_died(server: Server, effects: str) -> None:
    """After a crash restart nobody runs the batch: a wait settles what the dead runners left and starts
    runners for what it queued again, which must see it (a wait queued it in its own long transaction,
    which its runners waited for in vain until the wait timed out)."""
    # The crash ends the gate's session: the child's rerun goes through.
    with gate(server.admin_dsn) as g:
        parent = _launch(
            server,
            [f"insert into {effects} select 1 from {g.sql}"],
            statement_timeout="5 min",  # its own worker or job: lost with its runner, retried as the batch allows
            retry_lost=True,
            retries=1,
        )
        pid = poll_until(lambda: _runner_running(server, parent), 30, 0.02, "the child running")
        g.wait_for(1)
        with server.admin() as admin:
            admin.execute("CHECKPOINT")  # the claim survives the crash (it committed without a WAL flush)
        server.kill(pid, "sigkill")
    with server.user() as user:
        assert user.execute("SELECT pgbg.pg_background_wait(%s, '60 s')", (parent,)).fetchone()[0] == "done"
    assert _effects(server, effects) == [1]
    (child,) = _children(server, parent)
    # pg_cron runs the job again after its restart, and records how that run ended, if nobody settled the
    # child before.
    assert (child["attempt"], _history(child)) in [(2, ["lost"])] + [(1, [])] * (server.launcher == "pg_cron")


def test_a_wait_returns_when_a_child_job_that_outlived_its_runner_ends(server: Server, effects: str) -> None:
    """Under pg_cron a child's own job runs on when its runner is terminated (under pg_background the
    runner cancels its child's worker as it goes). Nothing is queued, so no runner has work; yet the
    child must be settled once its job ends, and the wait return. The runner jobs settled such a child
    once, found it running, and parked: the wait returned NULL at its timeout."""
    if server.launcher != "pg_cron":
        pytest.skip("a terminated pg_background runner takes its child's worker down with it")
    with gate(server.admin_dsn) as g:
        parent = _launch(server, [f"insert into {effects} select 1 from {g.sql}"], statement_timeout="5 min")
        pid = poll_until(lambda: _runner_running(server, parent), 30, 0.02, "the child running")
        g.wait_for(1)
        with server.admin() as admin:
            killed_at = admin.execute("SELECT clock_timestamp()").fetchone()[0]
        server.kill(pid, "terminate")

        def a_runner_job_has_looked_since() -> bool:
            # A runner job's run that began after the kill lingers only once it has judged the orphan.
            with server.admin() as admin:
                return (
                    admin.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND application_name = 'pgbg:cron' "
                        "AND backend_start > %s AND wait_event = 'PgSleep'",
                        (_schema(server), killed_at),
                    ).fetchone()[0]
                    > 0
                )

        poll_until(a_runner_job_has_looked_since, 30, 0.05, "a runner job to find the child running in its job")
        # Held long enough for a runner job that would give up on the child to have done so: its run
        # lingers settings.cron_linger, and the run pg_cron starts for a tick that came meanwhile ends
        # at once. Later, the end of the child's job is the only thing left to notice.
        with server.admin() as admin:
            linger = admin.execute("SELECT extract(epoch FROM cron_linger) FROM pgbg.settings").fetchone()[0]
        time.sleep(float(linger) + 2)
        with server.admin() as admin:  # an administrator's housekeeping sees the job too
            admin.execute("SELECT pgbg._housekeep(NULL::uuid)")
        assert statuses(_children(server, parent)) == ["running"]
    # The gate is open: the child's job ends, and nothing but the runner jobs can settle the child.
    with server.user() as user:
        assert user.execute("SELECT pgbg.pg_background_wait(%s, '60 s')", (parent,)).fetchone()[0] == "done", (
            _diagnosis(server, parent)
        )
    assert _effects(server, effects) == [1]
    (child,) = _children(server, parent)
    assert (child["attempt"], child["errors"]) == (1, None)


def _diagnosis(server: Server, parent: str) -> str:
    """What a batch that did not end looks like, and what could run it."""
    with server.admin() as admin:
        children = admin.execute(
            "SELECT seq, status, attempt, pid, errors FROM pgbg.log_background WHERE uuid_parent = %s "
            "AND status <> 'done' ORDER BY seq",
            (parent,),
        ).fetchall()
        sessions = admin.execute(
            "SELECT pid, application_name, backend_type, state, wait_event FROM pg_stat_activity "
            "WHERE application_name LIKE 'pgbg%%'"
        ).fetchall()
        jobs = (
            admin.execute("SELECT jobname, schedule, active FROM cron.job ORDER BY jobid").fetchall()
            if server.launcher == "pg_cron"
            else []
        )
        counts = admin.execute(
            "SELECT shard, queued, running, done, failed, stopped, lost FROM pgbg.batch_progress "
            "WHERE uuid_parent = %s",
            (parent,),
        ).fetchall()
        rows = admin.execute(
            "SELECT status::text, count(*) FROM pgbg.log_background WHERE uuid_parent = %s GROUP BY 1", (parent,)
        ).fetchall()
    return f"batch {parent}: {children}\ncounts: {counts}\nrows: {rows}\nsessions: {sessions}\njobs: {jobs}"


def test_a_batch_seen_ended_is_still_ended_after_a_crash(server: Server) -> None:
    """Children that wrote nothing are recorded by commits that need not wait for a WAL flush; a crash
    may lose those and put the children back in the queue. Not the batch's end: a waiter that saw it has
    told Airflow the task succeeded. A crash right after the watcher's poll saw the end (the WAL writer
    made slow, so only a commit that waited for its flush is sure to survive) leaves it ended."""
    # Children over a millisecond (recorded one per commit) and short ones (in bursts), on two runners.
    statements = ["SELECT pg_sleep(0.002)"] * 10 + ["SELECT 1"] * 200
    with server.admin() as admin:
        admin.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
        admin.execute("SELECT pg_reload_conf()")
    try:
        parent = _launch(server, statements, max_parallel=2)
        with server.user() as watcher:
            # The trigger's watcher's poll: housekeeping, then the batch's row.

            def ended() -> bool:
                row = watcher.execute("SELECT status FROM pgbg.pg_background_poll_many(%s::uuid[])", ([parent],))
                return row.fetchone()[0] == "done"

            poll_until(ended, 60, 0.005, "the batch to end")
            server.kill(watcher.info.backend_pid, "sigkill")
    finally:
        with server.admin() as admin:
            admin.execute("ALTER SYSTEM RESET wal_writer_delay")
            admin.execute("SELECT pg_reload_conf()")
    with server.user() as user:
        row = user.execute("SELECT status, done FROM pgbg.pg_background_poll(%s)", (parent,)).fetchone()
    assert row == ("done", len(statements)), _diagnosis(server, parent)


def test_a_terminated_runner_goes_and_a_shutdown_does_not_wait_for_batches(server: Server, effects: str) -> None:
    """pg_background turns a terminate into a cancel: a runner that ran on after one (rerunning the
    child it cut short) kept the server's fast shutdown waiting for its whole batch."""
    # Each child takes 10 minutes until the server has restarted (no race with what runs it again then):
    # a shutdown that waited for the batch would not end within the bound, however slow the machine.
    with server.admin() as admin:
        booted = admin.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
    pause = f"pg_sleep(case when pg_postmaster_start_time() = '{booted.isoformat()}' then 600 else 0 end)"
    statements = [f"insert into {effects} select {i} from {pause}" for i in range(10)]
    parent = _launch(server, statements, max_parallel=1)
    pid = poll_until(lambda: _runner_running(server, parent), 30, what="a child running")
    server.kill(pid, "terminate")
    with server.admin() as admin:
        poll_until(
            lambda: not admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0],
            30,
            what=f"the terminated runner {pid} to go",
        )
    # What is left runs on once something polls; then the server shuts down under it.
    with server.user() as user:
        user.execute("SELECT pgbg.pg_background_poll(%s)", (parent,))
    poll_until(lambda: _runner_running(server, parent), 30, what="a child running again")
    started = time.monotonic()
    server.instance.stop()
    took = time.monotonic() - started
    server.instance.start()
    assert took < 30, f"the shutdown waited {took:.1f} s for the batch's runner"  # its rest takes 90 min
    assert _await(server, parent) == "done", _diagnosis(server, parent)
    assert _effects(server, effects) == list(range(10))  # each child's work once, cut short ones run again


def test_under_load_runners_die_every_second_and_nothing_is_lost_or_run_twice(server: Server, effects: str) -> None:
    """Batches of inline inserts launched continuously for half a minute, while a runner is terminated
    every second, runners are killed with SIGKILL twice (the server restarts after a crash each time) and
    the server is restarted once: afterwards no child is stuck, none is lost, each ran exactly once, and
    none is done without its effect."""
    stop = threading.Event()

    def load() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            statements = [f"insert into {effects} select {k * 100 + i} from pg_sleep(0.02)" for i in range(20)]
            with contextlib.suppress(psycopg.OperationalError):  # restarting: the next one, once it is back
                _launch(server, statements, max_parallel=4, label="soak")
            time.sleep(0.1)

    def runner_pids() -> list[int]:
        try:
            with server.admin() as admin:
                return [
                    r[0]
                    for r in admin.execute(
                        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'pgbg:%%-%%' AND usename = %s",
                        (_schema(server),),
                    ).fetchall()
                ]
        except psycopg.OperationalError:
            return []

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    crashes = [8, 18]  # from these seconds on, at the first runner still there to kill
    try:
        for second in range(30):
            time.sleep(1)
            pids = runner_pids()
            if not pids:
                continue
            if crashes and second >= crashes[0]:
                with contextlib.suppress(ProcessLookupError):  # it may just have ended
                    server.kill(pids[0], "sigkill")
                    crashes.pop(0)
            elif second == 25:
                server.instance.restart()
            else:
                with contextlib.suppress(psycopg.Error), server.admin() as admin:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pids[0],))  # it may just have ended
    finally:
        stop.set()
        loader.join()
    with server.user() as user:
        parents = [
            str(r[0]) for r in user.execute("SELECT uuid_parent FROM pgbg.batch WHERE label = 'soak'").fetchall()
        ]
    assert len(parents) > 50
    for parent in parents:
        assert _await(server, parent) == "done", _diagnosis(server, parent)
    with server.user() as user:
        counts = user.execute(
            "SELECT count(*), count(*) FILTER (WHERE c.status = 'done'), count(*) FILTER (WHERE c.errors IS NOT NULL) "
            "FROM pgbg.log_background c JOIN pgbg.batch b USING (uuid_parent) WHERE b.label = 'soak'"
        ).fetchone()
        ran = user.execute(f"SELECT seq, count(*) FROM {effects} GROUP BY seq").fetchall()
        # What a failure needs to be understood (a child done without its effect was seen twice, rarely):
        # every child that is not done, or has no effect.
        odd = user.execute(
            "SELECT c.query, c.status, c.attempt, c.pid, c.run_mode, c.start_time_exec, c.end_time_exec, c.errors, "
            "c.interruptions, c.result FROM pgbg.log_background c JOIN pgbg.batch b USING (uuid_parent) "
            f"WHERE b.label = 'soak' AND (c.status <> 'done' OR NOT EXISTS "
            f"(SELECT 1 FROM {effects} e WHERE e.seq = substring(c.query FROM 'select ([0-9]+) from')::int))"
        ).fetchall()
    assert not crashes
    children, done, interrupted = counts
    assert children == done == len(ran), odd  # no child stuck or lost; each did its work
    twice = [seq for seq, n in ran if n != 1]
    with server.user() as user:
        doubled = user.execute(
            "SELECT c.seq, c.attempt, c.errors, c.interruptions FROM pgbg.log_background c JOIN pgbg.batch b "
            "USING (uuid_parent) WHERE b.label = 'soak' AND c.query LIKE ANY (%s)",
            ([f"%select {seq} from%" for seq in twice],),
        ).fetchall()
    assert not twice, [(s, a, [(e["at"], e["status"]) for e in es], n) for s, a, es, n in doubled]  # none ran twice
    assert interrupted > 0  # the chaos did reach running children
