"""Children run as their submitter; roles are isolated; nothing is granted to PUBLIC."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import psycopg
import pytest

from tests.helpers import gate, launch, monitor, poll_until, statuses, stop, wait


def test_children_run_as_the_submitting_role(user_dsn: str, user: psycopg.Connection) -> None:
    me = user.execute("SELECT current_user").fetchone()[0]
    parent = launch(user, ["select current_user as who, session_user as sess"])
    assert wait(user, parent) == "done"
    assert monitor(user, parent)[0]["result"]["preview"] == [{"who": me, "sess": me}]
    assert monitor(user, parent)[0]["user_name"] == me


def test_a_child_cannot_do_what_its_role_cannot(user: psycopg.Connection) -> None:
    parent = launch(user, ["select count(*) from pg_authid", "alter system set work_mem = '1GB'"])
    assert wait(user, parent) == "failed"
    assert [r["sqlstate"] for r in monitor(user, parent)] == ["42501", "42501"]


def test_two_roles_cannot_see_or_stop_each_other(dsn: str, make_role: Callable[..., str]) -> None:
    alice_dsn, bob_dsn, carol_dsn = make_role(), make_role(), make_role("pgbg_admin")
    with (
        psycopg.connect(alice_dsn, autocommit=True) as alice,
        psycopg.connect(bob_dsn, autocommit=True) as bob,
        psycopg.connect(carol_dsn, autocommit=True) as carol,
        gate(dsn) as never,  # never opens: the batch is unfinished until carol's stop, which counts 2
    ):
        parent = launch(alice, [f"select {never.sql}"] * 2, max_parallel=1)
        child = str(monitor(alice, parent)[1]["uuid_child"])

        assert monitor(bob, parent) == []
        assert all(str(r["uuid_parent"]) != parent for r in monitor(bob))
        assert bob.execute("SELECT count(*) FROM pgbg.log_background").fetchone()[0] == 0
        assert bob.execute("SELECT count(*) FROM pgbg.batches").fetchone()[0] == 0
        for uuid in (parent, child):
            with pytest.raises(psycopg.errors.NoDataFound):
                stop(bob, uuid)
        with pytest.raises(psycopg.errors.NoDataFound):
            bob.execute("SELECT pgbg.pg_background_retry(%s)", (parent,))
        # Direct writes are fenced too: bob cannot edit, delete, or add work to alice's batch.
        assert bob.execute("UPDATE pgbg.log_background SET status = 'done'").rowcount == 0
        assert bob.execute("DELETE FROM pgbg.batch").rowcount == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            bob.execute(
                "INSERT INTO pgbg.log_background (uuid_parent, seq, query, run_mode, role_name) "
                "VALUES (%s, 99, 'select 1', 'inline', %s)",
                (parent, alice.info.user),
            )
        # Nor under his own name: a child joins only a batch of its role, and only one that exists.
        for batch in (parent, bob.execute("SELECT gen_random_uuid()::text").fetchone()[0]):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                bob.execute(
                    "INSERT INTO pgbg.log_background (uuid_parent, seq, query, run_mode) "
                    "VALUES (%s, 99, 'select 1', 'inline')",
                    (batch,),
                )
        assert len(monitor(alice, parent)) == 2  # bob's DELETE above left alice's children alone
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            alice.execute("UPDATE pgbg.log_background SET query = 'select 2'")

        # The admin role sees and stops everything.
        assert len(monitor(carol, parent)) == 2
        assert stop(carol, parent) == 2
        assert wait(alice, parent, "20s") == "stopped"


def test_nothing_is_security_definer_or_granted_to_public(admin: psycopg.Connection) -> None:
    definers = admin.execute(
        "SELECT array_agg(proname) FROM pg_proc WHERE pronamespace = 'pgbg'::regnamespace AND prosecdef"
    ).fetchone()[0]
    assert definers is None
    public_routines = admin.execute(
        "SELECT array_agg(p.oid::regprocedure::text) FROM pg_proc p "
        "WHERE p.pronamespace = 'pgbg'::regnamespace AND has_function_privilege('public', p.oid, 'EXECUTE')"
    ).fetchone()[0]
    assert public_routines is None
    public_tables = admin.execute(
        "SELECT array_agg(c.relname) FROM pg_class c WHERE c.relnamespace = 'pgbg'::regnamespace "
        "AND c.relkind IN ('r', 'v') AND has_table_privilege('public', c.oid, 'SELECT')"
    ).fetchone()[0]
    assert public_tables is None
    assert admin.execute("SELECT has_schema_privilege('public', 'pgbg', 'USAGE')").fetchone()[0] is False
    roles = admin.execute(
        "SELECT array_agg(rolname ORDER BY rolname) FROM pg_roles "
        "WHERE rolname IN ('pgbg_user', 'pgbg_admin') AND NOT rolcanlogin"
    ).fetchone()[0]
    assert roles == ["pgbg_admin", "pgbg_user"]


def test_a_role_without_pgbg_user_cannot_use_the_engine(make_role: Callable[..., str]) -> None:
    with (
        psycopg.connect(make_role("pg_monitor"), autocommit=True) as outsider,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        launch(outsider, ["select 1"])


def test_a_stop_signals_only_the_engines_own_processes(dsn: str, make_role: Callable[..., str]) -> None:
    """pid and backend_start of a child are columns its role may write: pointing them at another process
    (another role's session, or a plain session of the same role) must not get that process cancelled."""
    alice_dsn, bob_dsn, carol_dsn = make_role(), make_role(), make_role("pgbg_admin")
    with (
        psycopg.connect(alice_dsn, autocommit=True) as alice,
        psycopg.connect(alice_dsn, autocommit=True) as alice_elsewhere,
        psycopg.connect(bob_dsn, autocommit=True) as bob,
        psycopg.connect(carol_dsn, autocommit=True) as carol,
        gate(dsn) as never,  # never opens: each forged child still runs at its stop, which counts it
    ):
        victims = {}
        for name, conn in (("bob", bob), ("alice_elsewhere", alice_elsewhere)):
            conn.execute("SET application_name = 'victim'")
            victims[name] = conn.execute(
                "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            ).fetchone()
        # Both victims run a long query meanwhile, in threads of their own.
        import threading

        outcomes: dict[str, str] = {}

        def sleep(name: str, conn: psycopg.Connection) -> None:
            try:
                conn.execute("SELECT pg_sleep(4)")
                outcomes[name] = "finished"
            except psycopg.errors.QueryCanceled:
                outcomes[name] = "cancelled"

        threads = [
            threading.Thread(target=sleep, args=(n, c)) for n, c in (("bob", bob), ("alice_elsewhere", alice_elsewhere))
        ]
        for t in threads:
            t.start()
        for victim in ("bob", "alice_elsewhere"):
            parent = launch(alice, [f"select {never.sql}"])
            poll_until(lambda parent=parent: monitor(alice, parent)[0]["status"] == "running", 20)
            pid, backend_start = victims[victim]
            # Forged: the running child now names the victim's backend.
            alice.execute(
                "UPDATE pgbg.log_background SET pid = %s, backend_start = %s WHERE uuid_parent = %s",
                (pid, backend_start, parent),
            )
            assert stop(carol, parent) == 1  # pgbg_admin holds pg_signal_backend
            assert wait(alice, parent, "20s") == "stopped"  # recorded, and found dead by the next poll
        for t in threads:
            t.join()
        assert outcomes == {"bob": "finished", "alice_elsewhere": "finished"}


def test_nobody_can_put_counts_on_another_roles_batch(make_role: Callable[..., str]) -> None:
    alice_dsn, bob_dsn, carol_dsn = make_role(), make_role(), make_role("pgbg_admin")
    with (
        psycopg.connect(alice_dsn, autocommit=True) as alice,
        psycopg.connect(bob_dsn, autocommit=True) as bob,
        psycopg.connect(carol_dsn, autocommit=True) as carol,
    ):
        parent = launch(alice, ["select 1"])
        assert wait(alice, parent) == "done"
        for role in (bob.info.user, alice.info.user):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                bob.execute(
                    "INSERT INTO pgbg.batch_progress (uuid_parent, shard, role_name, failed) VALUES (%s, -1, %s, 1000)",
                    (parent, role),
                )
        assert carol.execute(
            "SELECT status::text, failed FROM pgbg.batches WHERE uuid_parent = %s", (parent,)
        ).fetchone() == ("done", 0)


def test_nobody_can_make_another_roles_batch_look_waited_for(make_role: Callable[..., str]) -> None:
    """A watch that kept a batch looking waited for would keep a newer try from taking it over."""
    alice_dsn, bob_dsn = make_role(), make_role()
    with psycopg.connect(alice_dsn, autocommit=True) as alice, psycopg.connect(bob_dsn, autocommit=True) as bob:
        parent = launch(alice, ["select pg_sleep(30)"])
        waiter = str(uuid.uuid4())
        bob.execute("SELECT pgbg.pg_background_heartbeat(%s, '1 h')", (waiter,))
        bob.execute(
            "SELECT pgbg.pg_background_heartbeat(%s, '1 h', %s::uuid[], %s::text[])", (waiter, [parent], ["try 1"])
        )
        for role in (bob.info.user, alice.info.user):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                bob.execute(
                    "INSERT INTO pgbg.waiter_watch (waiter_id, uuid_parent, claimed_by, role_name) "
                    "VALUES (%s, %s, 'try 1', %s)",
                    (waiter, parent, role),
                )
        assert not alice.execute("SELECT pgbg.pg_background_watched(%s, NULL)", (parent,)).fetchone()[0]
        alice.execute("SELECT pgbg.pg_background_stop(%s)", (parent,))


def _concurrency(rows: list[dict]) -> int:
    """Most children that ran at the same moment."""
    edges = sorted([(r["start_time_exec"], 1) for r in rows] + [(r["end_time_exec"], -1) for r in rows])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_nobody_else_can_hold_a_batchs_slots_or_pose_as_its_runners(
    dsn: str, user: psycopg.Connection, make_role: Callable[..., str]
) -> None:
    """Slots are session advisory locks, which any session may take, and runners are named after their
    batch, which any session may copy: neither a session without the engine's grants nor another role
    of pgbg_user changes how many of a batch's children run, however it takes the keys and names."""
    outsider_dsn, other_dsn = make_role("pg_read_all_settings"), make_role()
    with (
        psycopg.connect(outsider_dsn, autocommit=True) as outsider,
        psycopg.connect(other_dsn, autocommit=True) as other,
        gate(dsn) as g,
    ):
        # Launched in a transaction: its runners wait for it, while the others take their slots first.
        user.execute("BEGIN")
        parent = launch(user, [f"select {g.sql}"] * 4, max_parallel=2)
        cap = user.execute("SELECT pgbg._global_cap()").fetchone()[0]
        global_key = user.execute("SELECT hashtext('pgbg/global') & 2147483647").fetchone()[0]
        batch_key = user.execute("SELECT hashtext('pgbg/' || %s) & 2147483647", (parent,)).fetchone()[0]
        for squatter in (outsider, other):
            squatter.execute("SELECT set_config('application_name', %s, false)", (f"pgbg:{parent}",))
        outsider.execute("SELECT pg_advisory_lock(%s, s) FROM generate_series(1, %s) s", (global_key, cap))
        outsider.execute("SELECT pg_advisory_lock(%s, s) FROM generate_series(1, 2) s", (batch_key,))
        other.execute("SELECT pg_advisory_lock(%s, s) FROM generate_series(3, 4) s", (batch_key,))
        user.execute("COMMIT")
        # Two children run together, held at the gate, and the other two wait: no squatter took a slot
        # from the batch or gave it one more (a third runner would wait at the gate too).
        g.wait_for(2)
        assert statuses(monitor(user, parent)) == ["running", "running", "queued", "queued"]
        assert g.waiting() == 2
        g.open()
        assert user.execute("CALL pgbg.pg_background_await(%s, '30 s', NULL)", (parent,)).fetchone()[0] == "done"
        assert _concurrency(monitor(user, parent)) == 2  # its own cap, not less, not more
        # Housekeeping counts only the batch's own runners: none once they have left it (each renames
        # itself a moment after it announced the batch's end), while both squatters keep its name.
        runners = "SELECT pgbg._runners_of(%s)"
        poll_until(lambda: user.execute(runners, (parent,)).fetchone()[0] == 0, 10, what="no runner of the batch")


def test_nobody_else_can_hold_a_roles_locks(user: psycopg.Connection, make_role: Callable[..., str]) -> None:
    """What orders a role's launches and housekeeping against its runners leaving, and its submits of one
    origin against each other, are rows only that role can lock. Sessions of other roles, with or
    without the engine's grants, holding engine 1.0.0's advisory keys for them or going for the rows,
    hold none of it back."""
    outsider_dsn, other_dsn = make_role("pg_read_all_settings"), make_role()
    role, origin = user.info.user, "dag_a/run_1/task_a/-1"
    first = launch(user, ["select 1"])  # the role's lock rows exist from here on
    assert wait(user, first) == "done"
    with psycopg.connect(outsider_dsn, autocommit=True) as outsider, psycopg.connect(other_dsn) as other:
        outsider.execute("SELECT pg_advisory_lock(hashtext('pgbg/role/' || %s) & 2147483647)", (role,))
        outsider.execute("SELECT pg_advisory_lock(hashtext('pgbg/origin/' || %s))", (origin,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            outsider.execute("SELECT * FROM pgbg.role_lock FOR UPDATE")
        # Another role of pgbg_user sees none of them, and cannot make them.
        assert other.execute("SELECT count(*) FROM pgbg.role_lock WHERE role_name = %s", (role,)).fetchone()[0] == 0
        other.execute("SELECT * FROM pgbg.role_lock FOR UPDATE")  # held until the end of this test
        with pytest.raises(psycopg.errors.InsufficientPrivilege), other.transaction():
            other.execute("INSERT INTO pgbg.role_lock (role_name, lock_key) VALUES (%s, 0)", (role,))
        # Blocked, any of these would give up here rather than hang.
        user.execute("SET lock_timeout = '10 s'")
        parent = user.execute(
            "SELECT uuid_parent FROM pgbg.pg_background_submit(%s::text[], %s, 'try 1')", (["select 1"] * 4, origin)
        ).fetchone()[0]
        assert wait(user, parent) == "done"
        # Its runners leave once they have lingered: nothing holds back their decision to.
        poll_until(
            lambda: user.execute(
                "SELECT count(*) = 0 FROM pg_stat_activity WHERE usename = %s AND application_name LIKE 'pgbg:%%'",
                (role,),
            ).fetchone()[0],
            60,
        )
        # The origin's lock again, for a try of other statements: a batch of its own.
        assert (
            user.execute(
                "SELECT action FROM pgbg.pg_background_submit(%s::text[], %s, 'try 2')", (["select 2"], origin)
            ).fetchone()[0]
            == "launched"
        )


def test_a_role_whose_name_needs_quotes_has_its_runners_counted(dsn: str, make_role: Callable[..., str]) -> None:
    """Runners and slot holders are told by their role's name as it is, never parsed as an identifier
    (which folds it to lower case): otherwise a role's own runners would not count, and its batches
    would run past their cap."""
    with psycopg.connect(make_role(prefix="Pgbg_T Mixed"), autocommit=True) as user, gate(dsn) as g:
        parent = launch(user, [f"select {g.sql}"] * 4, max_parallel=2)
        g.wait_for(2)
        assert statuses(monitor(user, parent)) == ["running", "running", "queued", "queued"]
        holders = user.execute(
            "SELECT pgbg._slot_holders(pgbg._batch_lock_key(%s), current_user)", (parent,)
        ).fetchone()[0]
        assert holders == 2
        assert user.execute("SELECT pgbg._role_slots_free()").fetchone()[0] is False
        g.open()
        assert user.execute("CALL pgbg.pg_background_await(%s, '30 s', NULL)", (parent,)).fetchone()[0] == "done"
        assert _concurrency(monitor(user, parent)) == 2
