"""The engine where PostgreSQL has pg_cron and no pg_background, as on the managed services.

These run in ``make test``'s second pass, against a server started without pg_background
(``scripts/db.sh --without pg_background``); on a server with pg_background they are skipped, and the
rest of the engine suite runs on both.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from airflow_pgbg.hooks.install import PgBackgroundMissing, PgCronUnusable, install_engine_dsn
from tests.helpers import gate, launch, monitor, poll_until, statuses, stop, wait


@pytest.fixture(autouse=True)
def _only_on_pg_cron(launcher: str) -> None:
    if launcher != "pg_cron":
        pytest.skip("the engine here runs on pg_background (make test's second pass runs these)")


def _jobs(admin: psycopg.Connection, role: str) -> list[str]:
    """The role's jobs that pg_cron runs (a parked runner job, schedule @reboot, runs only at its start)."""
    return [
        r[0]
        for r in admin.execute(
            "SELECT jobname FROM cron.job WHERE username = %s AND schedule <> '@reboot' ORDER BY jobname", (role,)
        )
    ]


def _parked(admin: psycopg.Connection, role: str) -> list[int]:
    return [
        r[0]
        for r in admin.execute(
            "SELECT jobid FROM cron.job WHERE username = %s AND schedule = '@reboot' ORDER BY jobid", (role,)
        )
    ]


@pytest.fixture
def ticks(admin: psycopg.Connection) -> Iterator[Callable[[int], None]]:
    """pg_cron's own clock: a job of the test's that runs every second. ticks(n) returns once n more of its
    runs have started, so that a test waits for pg_cron's scheduler to come round, however slowly it does
    on a loaded machine, instead of for seconds of the wall clock."""
    job = admin.execute(
        "SELECT cron.schedule(%s, '1 seconds', 'select 1')", (f"pgbg_tick_{secrets.token_hex(3)}",)
    ).fetchone()[0]

    def wait_ticks(n: int) -> None:
        seen = admin.execute(
            "SELECT coalesce(max(runid), 0) FROM cron.job_run_details WHERE jobid = %s", (job,)
        ).fetchone()[0]
        poll_until(
            lambda: (
                admin.execute(
                    "SELECT count(*) FROM cron.job_run_details WHERE jobid = %s AND runid > %s", (job, seen)
                ).fetchone()[0]
                >= n
            ),
            60,
            0.05,
            f"{n} ticks of pg_cron",
        )

    try:
        yield wait_ticks
    finally:
        with contextlib.suppress(psycopg.Error):
            admin.execute("SELECT cron.unschedule(%s)", (job,))
        admin.execute("DELETE FROM cron.job_run_details WHERE jobid = %s", (job,))


def _runs(admin: psycopg.Connection, role: str) -> tuple[int, int]:
    """The newest run of the role's jobs, and how many of its runs go on. By run id, not by a count of rows:
    a runner deletes the finished runs of its role's runner jobs."""
    return admin.execute(
        "SELECT coalesce(max(runid), 0), count(*) FILTER (WHERE status NOT IN ('succeeded', 'failed')) "
        "FROM cron.job_run_details WHERE username = %s",
        (role,),
    ).fetchone()


def _no_more_runs(admin: psycopg.Connection, role: str, ticks: Callable[[int], None], going_on: int) -> None:
    """That the role's jobs start no run over 3 ticks of pg_cron (a job scheduled every second would start
    one at each), with ``going_on`` runs still going. pg_cron runs a parked job once more for a tick that
    came while its last run went on: each window that saw such a run is followed by another, up to 3."""
    for _ in range(3):
        before = _runs(admin, role)
        ticks(3)
        after = _runs(admin, role)
        if before == after and after[1] == going_on:
            return
    raise AssertionError(f"the role's jobs went on running: newest run and runs going on {before}, then {after}")


def test_install_picks_pg_cron_and_says_why_pg_background_cannot_be(admin: psycopg.Connection, dsn: str) -> None:
    assert admin.execute("SELECT launcher FROM pgbg.settings").fetchone()[0] == "pg_cron"
    # Installing again keeps it; asking for pg_background on this server is one clear error.
    assert install_engine_dsn(dsn) == install_engine_dsn(dsn, launcher="pg_cron")
    with pytest.raises(PgBackgroundMissing, match="pg_background"):
        install_engine_dsn(dsn, launcher="pg_background")
    assert admin.execute("SELECT launcher FROM pgbg.settings").fetchone()[0] == "pg_cron"


@pytest.fixture
def other_db(dsn: str) -> Iterator[str]:
    name = f"pgbg_db_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield make_conninfo(dsn, dbname=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_a_database_pg_cron_does_not_serve_is_refused_before_anything(other_db: str) -> None:
    with pytest.raises(PgCronUnusable, match=r"cron\.database_name"):
        install_engine_dsn(other_db)
    with psycopg.connect(other_db) as conn:
        assert conn.execute("SELECT to_regnamespace('pgbg')").fetchone()[0] is None


def test_waiting_in_the_launching_statement_is_refused_with_a_way_out(user: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="needs the pg_background launcher") as caught:
        launch(user, ["select 1"], monitor=True)
    assert "p_monitor => false" in (caught.value.diag.message_hint or "")
    assert user.execute("SELECT count(*) FROM pgbg.batch").fetchone()[0] == 0


def test_runner_jobs_run_the_batch_then_park(
    admin: psycopg.Connection, user: psycopg.Connection, ticks: Callable[[int], None]
) -> None:
    role = user.info.user
    parent = launch(user, ["select pg_sleep(0.3)"] * 6, max_parallel=3)
    poll_until(lambda: _jobs(admin, role), 5, what="runner jobs")
    assert all(j.startswith("pgbg_runner:") for j in _jobs(admin, role))
    assert len(_jobs(admin, role)) <= 3
    assert wait(user, parent) == "done"
    # Nothing of the batch runs on in pg_cron: its jobs are parked, and (the next runner clears them)
    # no run history stays.
    poll_until(lambda: not _jobs(admin, role), 20, what="runner jobs to park themselves")
    parked = _parked(admin, role)
    assert 1 <= len(parked) <= 3
    # pg_cron runs a job once more when a tick came while its last run went on (the runners lingered):
    # that run sees its job parked and ends at once. After those, nothing runs.
    _no_more_runs(admin, role, ticks, 0)
    # The next batch wakes the parked jobs (pg_cron starts a job it knows at once) instead of adding any.
    later = launch(user, ["select pg_sleep(0.3)"] * 2, max_parallel=2)
    assert wait(user, later) == "done"
    poll_until(lambda: not _jobs(admin, role), 20, what="runner jobs to park themselves")
    assert set(_parked(admin, role)) <= set(parked)
    assert (
        admin.execute(
            "SELECT count(*) FROM cron.job_run_details d WHERE d.username = %s AND d.status IN ('succeeded', 'failed') "
            "AND d.command LIKE 'CALL pgbg._cron_runner()'",
            (role,),
        ).fetchone()[0]
        <= 2  # at most one finished run per job: each run deletes those before it
    )


def test_a_runner_takes_the_roles_next_batch_before_it_parks(user: psycopg.Connection) -> None:
    # The same backend runs both: the runner stayed, instead of pg_cron starting its job again.
    first = launch(user, ["select 1"], max_parallel=1)
    assert wait(user, first) == "done"
    second = launch(user, ["select 2"], max_parallel=1)
    assert wait(user, second) == "done"
    assert monitor(user, second)[0]["pid"] == monitor(user, first)[0]["pid"]


def test_runners_without_a_slot_park_instead_of_running_every_second(
    dsn: str, admin: psycopg.Connection, user: psycopg.Connection, ticks: Callable[[int], None]
) -> None:
    role = user.info.user
    first = launch(user, ["select pg_sleep(0.3)"] * 4, max_parallel=4)
    assert wait(user, first) == "done"
    # Its runners linger; a batch with cap 1 wakes them all, and those without a slot (its next
    # children wait for the first, held at a gate for as long as the test looks) park.
    with gate(dsn) as g:
        slow = launch(user, [f"select {g.sql}"] * 3, max_parallel=1)
        poll_until(lambda: len(_jobs(admin, role)) == 1, 30, what="the runners without a slot to park")
        g.wait_for(1)
        _no_more_runs(admin, role, ticks, 1)  # the slot holder's run goes on
        g.open()
        assert wait(user, slow) == "done"


def test_top_level_children_run_in_jobs_of_their_own(
    admin: psycopg.Connection, user: psycopg.Connection, scratch: str
) -> None:
    user.execute(f"CREATE TABLE {scratch}.t AS SELECT g AS a FROM generate_series(1, 1000) g")
    parent = launch(
        user,
        [f"vacuum (analyze) {scratch}.t", f"create index concurrently t_a on {scratch}.t (a)", "vacuum nowhere"],
        max_parallel=1,  # VACUUM and CREATE INDEX CONCURRENTLY on one table wait for each other
    )
    # Short statements: CONCURRENTLY waits for every older transaction, a long wait's too.
    poll_until(lambda: all(r["status"] not in ("queued", "running") for r in monitor(user, parent)), 30)
    rows = monitor(user, parent)
    assert statuses(rows) == ["done", "done", "failed"]
    assert rows[0]["result"]["command"] == "VACUUM"
    assert rows[2]["sqlstate"] == "42P01"  # named from pg_cron's message
    assert (
        "records the error's text but not its SQLSTATE"
        in user.execute(
            "SELECT error_detail FROM pgbg.log_background WHERE uuid_parent = %s AND seq = 3", (parent,)
        ).fetchone()[0]
    )
    assert user.execute(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", (f"{scratch}.t_a",)
    ).fetchone()[0]
    poll_until(lambda: not _jobs(admin, user.info.user), 10, what="child and runner jobs to go")


def test_stopping_a_top_level_child_ends_its_job(dsn: str, admin: psycopg.Connection, user: psycopg.Connection) -> None:
    # The DO block waits at a gate that never opens: only the stop can end the child's job (a 60-s sleep
    # had to outlast the test), so the wait's 60 s are a guard, not a bound on the stop.
    with gate(dsn) as never:
        parent = launch(user, [f"do $$ begin perform {never.sql}; end $$"])
        poll_until(
            lambda: admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_cron' AND query LIKE 'do $$%%'"
            ).fetchone()[0],
            10,
            what="the child's job to start",
        )
        never.wait_for(1)
        stop(user, parent)
        assert wait(user, parent, "60s") == "stopped"
        poll_until(
            lambda: (
                not admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_cron' AND query LIKE 'do $$%%'"
                ).fetchone()[0]
            ),
            10,
            what="the child's job to end",
        )
    poll_until(lambda: not _jobs(admin, user.info.user), 10, what="jobs to go")


def test_a_killed_runner_comes_back_with_its_job_and_finishes_without_a_poll(
    dsn: str, admin: psycopg.Connection, user: psycopg.Connection, scratch: str
) -> None:
    user.execute(f"CREATE TABLE {scratch}.marks (n int)")
    # The runners run two children, then each waits at the gate in the middle of one when it is killed
    # (a runner that had finished would have renamed itself, and nothing would be killed).
    with gate(dsn) as g:
        parent = launch(
            user,
            [f"insert into {scratch}.marks select {i} from pg_sleep(0.2)" for i in range(2)]
            + [f"insert into {scratch}.marks select {i} from {g.sql}" for i in range(2, 8)],
            max_parallel=2,
        )
        g.wait_for(2)
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
            (f"pgbg:{parent}",),
        ).fetchone()[0]
        assert killed == 2
        g.open()
    # No wait, monitor or poll: pg_cron runs the killed runners' jobs again, and they settle what the
    # dead ones left (run inline, it rolled back with them: queued again) and run the rest.
    poll_until(
        lambda: user.execute(
            "SELECT count(*) FILTER (WHERE status IN ('queued', 'running')) = 0 FROM pgbg.log_background "
            "WHERE uuid_parent = %s",
            (parent,),
        ).fetchone()[0],
        20,
        what="every child to settle",
    )
    rows = monitor(user, parent)
    assert statuses(rows) == ["done"] * 8
    assert sorted(r[0] for r in user.execute(f"SELECT n FROM {scratch}.marks").fetchall()) == list(range(8))
    # Each killed runner was in the middle of a child: that one ran again, once.
    assert sum(r["attempt"] for r in rows) - 8 == killed


def test_the_global_cap_follows_pg_cron(admin: psycopg.Connection, user: psycopg.Connection) -> None:
    cap, source = user.execute("SELECT pgbg._global_cap(), pgbg._cap_source()").fetchone()
    running_jobs = int(admin.execute("SHOW cron.max_running_jobs").fetchone()[0])
    # Each runner may need a second job (a child at top level): half of pg_cron's jobs at most.
    assert cap <= running_jobs // 2
    assert cap < running_jobs // 2 or "cron.max_running_jobs" in source
    parent = launch(user, ["select 1"] * 3, max_parallel=cap + 5)
    assert wait(user, parent) == "done"
    note = user.execute("SELECT notes FROM pgbg.batches WHERE uuid_parent = %s", (parent,)).fetchone()[0]
    assert f"global cap {cap}" in note
