"""Stopping batches and children, fail_fast, retry, timeouts, and workers that die."""

from __future__ import annotations

import psycopg
import pytest

from tests.helpers import gate, launch, monitor, poll_until, statuses, stop, wait


def _running(conn: psycopg.Connection, parent: str, n: int) -> None:
    poll_until(lambda: statuses(monitor(conn, parent)).count("running") == n, 20)


def test_stop_a_batch_cancels_running_and_skips_queued(dsn: str, user: psycopg.Connection) -> None:
    # The gate never opens: only the stop can end the children, so a batch that ends at all (within the
    # wait's guard) was ended by the stop, and no bound on the stop's latency is needed.
    with gate(dsn) as never:
        parent = launch(user, [f"select {never.sql}"] * 6, max_parallel=2)
        never.wait_for(2)
        _running(user, parent, 2)
        assert stop(user, parent) == 6
        assert wait(user, parent, "20s") == "stopped"
    rows = monitor(user, parent)
    assert statuses(rows) == ["stopped"] * 6
    assert sum(1 for r in rows if r["start_time_exec"] is None) == 4  # never started
    assert stop(user, parent) == 0
    # No worker of the batch is left.
    assert (
        user.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (f"pgbg:{parent}",)
        ).fetchone()[0]
        == 0
    )


def test_stop_one_child_leaves_the_others(dsn: str, user: psycopg.Connection) -> None:
    # Children 1 and 3 run until the stop of child 2 is made; only the stop ends child 2 (its gate never
    # opens: let through, it could end done before the stop's cancel reached it).
    with gate(dsn) as g, gate(dsn) as never:
        parent = launch(user, [f"select {g.sql}", f"select {never.sql}", f"select {g.sql}"], max_parallel=3)
        g.wait_for(2)
        never.wait_for(1)
        _running(user, parent, 3)
        child = monitor(user, parent)[1]["uuid_child"]
        assert stop(user, str(child)) == 1
        assert stop(user, str(child)) == 0
        g.open()
        assert wait(user, parent) == "stopped"
    assert statuses(monitor(user, parent)) == ["done", "stopped", "done"]


def test_stop_a_child_running_in_its_own_worker(dsn: str, user: psycopg.Connection, scratch: str) -> None:
    with gate(dsn) as never:  # never opens: the procedure runs until the stop ends it
        user.execute(
            f"CREATE PROCEDURE {scratch}.slow() LANGUAGE plpgsql AS $$ BEGIN PERFORM {never.sql}; COMMIT; END $$"
        )
        parent = launch(user, [f"call {scratch}.slow()"])
        _running(user, parent, 1)
        never.wait_for(1)
        poll_until(
            lambda: (
                user.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = %s", (f"call {scratch}.slow()",)
                ).fetchone()[0]
                == 1
            )
        )
        assert stop(user, parent) == 1
        assert wait(user, parent, "20s") == "stopped"
    poll_until(
        lambda: (
            user.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query = %s", (f"call {scratch}.slow()",)
            ).fetchone()[0]
            == 0
        )
    )


def test_a_stop_reaches_a_childs_own_job_after_its_runner_died(
    dsn: str, admin: psycopg.Connection, user: psycopg.Connection, scratch: str, launcher: str
) -> None:
    """A runner passes a stop on to its child's own job; one that died first (of the stop's own cancel,
    as it entered a statement block: seen under load) cannot. Housekeeping passes it on then: the child
    ends stopped at once, not when its minute is up."""
    if launcher != "pg_cron":
        pytest.skip("a terminated pg_background runner gets a cancel, and takes its nested worker down itself")
    with gate(dsn) as never:  # never opens: the child's own job runs until the stop reaches it
        user.execute(
            f"CREATE PROCEDURE {scratch}.slow() LANGUAGE plpgsql AS $$ BEGIN PERFORM {never.sql}; COMMIT; END $$"
        )
        parent = launch(user, [f"call {scratch}.slow()"])
        _running(user, parent, 1)
        own = "SELECT count(*) FROM pg_stat_activity WHERE query = %s"
        poll_until(lambda: user.execute(own, (f"call {scratch}.slow()",)).fetchone()[0] == 1)
        never.wait_for(1)
        assert admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pgbg.log_background "
            "WHERE uuid_parent = %s AND status = 'running'",
            (parent,),
        ).fetchone()[0]
        assert stop(user, parent) == 1
        assert wait(user, parent, "20s") == "stopped"
        assert statuses(monitor(user, parent)) == ["stopped"]
        poll_until(lambda: user.execute(own, (f"call {scratch}.slow()",)).fetchone()[0] == 0)


def test_a_terminated_worker_turns_its_child_lost(
    dsn: str, admin: psycopg.Connection, user: psycopg.Connection, launcher: str
) -> None:
    # A statement of its own worker (a statement timeout puts it there), whose work may have committed; an
    # inline one is queued again instead (test_retries).
    with gate(dsn) as never:  # never opens: only the terminate ends child 1
        parent = launch(user, [f"select {never.sql}", "select 1"], max_parallel=1, statement_timeout="5 min")
        _running(user, parent, 1)
        never.wait_for(1)
        pid = monitor(user, parent)[0]["pid"]  # the runner's
        if launcher == "pg_cron":
            # A pg_cron runner's death leaves its child's own job running (see the test above); this test
            # only passed there while the terminate beat the job's tick. Terminate the job itself: the
            # process waiting at the gate.
            pid = admin.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 AND objid = %s "
                "AND objsubid = 1 AND NOT granted",
                (never.key,),
            ).fetchone()[0]
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        poll_until(
            lambda: admin.execute("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]
        )
    # The next monitor call notices, and starts a new runner for the rest. On pg_cron the runner, still
    # alive, notices when it next looks at its child's job.
    if launcher == "pg_cron":
        rows = poll_until(lambda: (r := monitor(user, parent))[0]["status"] != "running" and r, what="the loss")
    else:
        rows = monitor(user, parent)
    assert rows[0]["status"] == "lost"
    assert "terminated" in rows[0]["error"]
    assert wait(user, parent) == "lost"
    assert statuses(monitor(user, parent)) == ["lost", "done"]


@pytest.mark.pg_background_only
def test_a_worker_cancelled_before_its_statement_began_is_not_done(admin: psycopg.Connection) -> None:
    # pg_background reports such a worker as ended without an error; a stop or a cancelled runner lands
    # there when its cancel comes within a millisecond of the launch. Not every cancel does: many tries.
    ext = admin.execute(
        "SELECT extnamespace::regnamespace FROM pg_extension WHERE extname = 'pg_background'"
    ).fetchone()[0]
    admin.execute(
        f"""
        CREATE OR REPLACE FUNCTION pg_temp.cancel_at_once() RETURNS text LANGUAGE plpgsql AS $$
        DECLARE h record;
        BEGIN
            SELECT * INTO h FROM pgbg._start_top_level('select pg_sleep(30)', gen_random_uuid(), NULL, '{{}}');
            PERFORM {ext}.pg_background_cancel_v2(h.pid, h.cookie, 0);
            PERFORM {ext}.pg_background_wait_v2(h.pid, h.cookie, 10000);
            RETURN pgbg._top_level_result(h.pid, h.cookie)::text;
        EXCEPTION WHEN query_canceled THEN
            RETURN 'cancelled';
        END $$
        """
    )
    ended = [admin.execute("SELECT pg_temp.cancel_at_once()").fetchone()[0] for _ in range(150)]
    assert ended == ["cancelled"] * 150


def test_stop_never_signals_a_process_that_reused_the_pid(
    dsn: str, admin: psycopg.Connection, user: psycopg.Connection
) -> None:
    # The gate stays shut until the test has cancelled the runner itself: the child cannot end before the
    # stop, which counts it only while it runs.
    with gate(dsn) as never:
        parent = launch(user, [f"select {never.sql}"])
        _running(user, parent, 1)
        never.wait_for(1)
        # Make the row claim a pid that now belongs to an unrelated session (as after PID reuse).
        with psycopg.connect(admin.info.dsn, autocommit=True) as bystander:
            other = bystander.execute("SELECT pg_backend_pid()").fetchone()[0]
            admin.execute("UPDATE pgbg.log_background SET pid = %s WHERE uuid_parent = %s", (other, parent))
            assert stop(user, parent) == 1
            # Same pid, other backend_start: the bystander is neither cancelled nor terminated.
            assert bystander.execute("SELECT 1").fetchone()[0] == 1
            bystander.execute("SELECT pg_sleep(0.2)")
            assert bystander.execute("SELECT 2").fetchone()[0] == 2
        admin.execute(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (f"pgbg:{parent}",)
        )


def test_fail_fast_stops_the_rest_after_the_first_failure(dsn: str, user: psycopg.Connection) -> None:
    # The gate never opens: child 1 is still running when child 2 fails, and only fail_fast's stop ends it.
    with gate(dsn) as never:
        parent = user.execute(
            "SELECT pgbg.pg_background_launch_num(%s::text[], p_monitor => false, p_max_parallel => 2, "
            "p_fail_fast => true)",
            ([f"select {never.sql}", "select 1/0"] + [f"select {never.sql}"] * 4,),
        ).fetchone()[0]
        assert wait(user, str(parent), "20s") == "failed"
    assert statuses(monitor(user, str(parent))) == ["stopped", "failed"] + ["stopped"] * 4


def test_statement_timeout_fails_only_the_slow_child(user: psycopg.Connection) -> None:
    parent = user.execute(
        "SELECT pgbg.pg_background_launch_num(%s::text[], p_monitor => false, p_statement_timeout => '300ms')",
        (["select pg_sleep(5)", "select 2 as two"],),
    ).fetchone()[0]
    assert wait(user, str(parent), "10s") == "failed"
    rows = monitor(user, str(parent))
    assert (rows[0]["status"], rows[0]["sqlstate"]) == ("failed", "57014")
    assert "statement timeout" in rows[0]["error"]
    assert rows[1]["status"] == "done"


def test_retry_requeues_only_what_did_not_succeed(user: psycopg.Connection, scratch: str) -> None:
    user.execute(f"CREATE TABLE {scratch}.effects (seq int)")
    user.execute(f"CREATE TABLE {scratch}.gate (open boolean)")
    user.execute(f"INSERT INTO {scratch}.gate VALUES (false)")
    user.execute(
        f"""CREATE FUNCTION {scratch}.second() RETURNS void LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO {scratch}.effects VALUES (2);
                IF NOT (SELECT open FROM {scratch}.gate) THEN RAISE EXCEPTION 'gate closed'; END IF;
            END $$"""
    )
    parent = launch(
        user,
        [
            f"insert into {scratch}.effects values (1)",
            f"select {scratch}.second()",
            f"insert into {scratch}.effects values (3)",
        ],
        max_parallel=1,
    )
    assert wait(user, parent) == "failed"
    user.execute(f"UPDATE {scratch}.gate SET open = true")
    assert user.execute("SELECT pgbg.pg_background_retry(%s)", (parent,)).fetchone()[0] == 1
    assert wait(user, parent) == "done"
    assert user.execute(f"SELECT array_agg(seq ORDER BY seq) FROM {scratch}.effects").fetchone()[0] == [1, 2, 3]
    assert [r["attempt"] for r in monitor(user, parent)] == [1, 2, 1]
    assert user.execute("SELECT pgbg.pg_background_retry(%s)", (parent,)).fetchone()[0] == 0


def test_a_stop_for_an_earlier_holder_leaves_a_claimed_batch_alone(dsn: str, user: psycopg.Connection) -> None:
    # The gate never opens: the child still runs at both stops, so the first one's 0 is its refusal and
    # not a batch already over.
    with gate(dsn) as never:
        parent = launch(user, [f"select {never.sql}"])
        user.execute("SELECT pgbg.pg_background_claim(%s, 'try 1')", (parent,))
        user.execute("SELECT pgbg.pg_background_claim(%s, 'try 2')", (parent,))
        _running(user, parent, 1)
        never.wait_for(1)
        assert user.execute("SELECT pgbg.pg_background_stop(%s, 'try 1')", (parent,)).fetchone()[0] == 0
        assert statuses(monitor(user, parent)) == ["running"]
        assert user.execute("SELECT pgbg.pg_background_stop(%s, 'try 2')", (parent,)).fetchone()[0] == 1
        assert wait(user, parent, "20s") == "stopped"


def test_a_stop_that_holds_a_finished_childs_row_does_not_deadlock_with_its_runner(
    dsn: str, user: psycopg.Connection, admin: psycopg.Connection
) -> None:
    """A stop marks the running children's rows, then stops the queued ones. Its runner, recording the
    child that has just ended, waits for that row; had it locked the next queued child first (as engine
    1.1.5 did before its release, found by W3 of make bench), each would wait for the other."""
    with gate(dsn) as g:
        parent = launch(user, [f"select {g.sql}", "select 2", "select 3"], max_parallel=1)
        g.wait_for(1)
        first, second, _ = monitor(user, parent)
        with psycopg.connect(dsn) as stopper:  # one transaction, as a stop's
            stopper.execute(
                "SELECT 1 FROM pgbg.log_background WHERE uuid_child = %s FOR UPDATE", (first["uuid_child"],)
            )
            g.open()  # the first child ends, and its runner waits to record it

            def runner_waits() -> bool:
                return (
                    admin.execute(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE application_name = %s AND wait_event = 'transactionid'",
                        (f"pgbg:{parent}",),
                    ).fetchone()[0]
                    == 1
                )

            poll_until(runner_waits, 30, what="the runner to wait for the first child's row")
            stopper.execute("SET LOCAL lock_timeout = '20s'")  # bounds a wait that is no deadlock
            assert stopper.execute("SELECT pgbg.pg_background_stop(%s)", (second["uuid_child"],)).fetchone()[0] == 1
    assert wait(user, parent) == "stopped"
    rows = monitor(user, parent)
    assert [(r["status"], r["attempt"]) for r in rows] == [("done", 1), ("stopped", 0), ("done", 1)]
