"""Caps, the automatic queue, and independence from the launching session."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import psycopg.sql
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.helpers import Gate, gate, launch, monitor, poll_until, statuses, stop, wait


class Sampler:
    """Samples pg_stat_activity and log_background from its own connection while a batch runs."""

    def __init__(self, dsn: str, parents: list[str]) -> None:
        self.dsn = dsn
        self.parents = parents
        self.max_workers = 0
        self.max_running = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        names = [f"pgbg:{p}" for p in self.parents]
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                # Worker processes holding a slot of these batches and busy in a child: in its pg_sleep,
                # or waiting at the test's gate.
                workers = conn.execute(
                    "SELECT count(DISTINCT a.pid) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
                    "WHERE a.backend_type IN ('pg_background', 'pg_cron') AND a.application_name = ANY(%s) "
                    "AND a.wait_event IN ('PgSleep', 'advisory') AND l.locktype = 'advisory' AND l.objsubid = 2 "
                    "AND l.classid = ANY(SELECT (hashtext('pgbg/' || p) & 2147483647)::oid FROM unnest(%s::text[]) p)",
                    (names, self.parents),
                ).fetchone()[0]
                running = conn.execute(
                    "SELECT count(*) FROM pgbg.log_background WHERE uuid_parent = ANY(%s::uuid[]) "
                    "AND status = 'running'",
                    (self.parents,),
                ).fetchone()[0]
                self.max_workers = max(self.max_workers, workers)
                self.max_running = max(self.max_running, running)
                self.samples += 1
                time.sleep(0.005)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _held(sampler: Sampler, g: Gate, n: int) -> None:
    """Holds the first children at the gate until ``n`` wait there and the sampler has looked 50 times
    more: a cap that let one more through would show it then, however slowly runners start."""
    g.wait_for(n)
    seen = sampler.samples
    poll_until(lambda: sampler.samples >= seen + 50, 60, what="50 samples while children wait at the gate")
    assert g.waiting() == n
    g.open()


def test_per_batch_cap_is_never_exceeded(dsn: str, user_dsn: str, user: psycopg.Connection) -> None:
    with gate(dsn) as g:
        parent = launch(user, [f"select pg_sleep(0.25) from (select {g.sql}) g"] * 12, max_parallel=3)
        with Sampler(dsn, [parent]) as sampler:
            _held(sampler, g, 3)
            assert wait(user, parent) == "done"
    assert sampler.max_workers == 3
    assert sampler.max_running == 3


def test_queued_children_start_as_slots_free_without_polling(user: psycopg.Connection) -> None:
    parent = launch(user, ["select pg_sleep(0.4)"] * 6, max_parallel=2)
    # No monitor or wait call while the batch runs (reading the table does no housekeeping): the
    # runners refill their own slots, or the batch never ends here.
    poll_until(
        lambda: user.execute(
            "SELECT count(*) = 6 FROM pgbg.log_background WHERE uuid_parent = %s AND status = 'done'", (parent,)
        ).fetchone()[0],
        60,
        what="the batch to end without anyone polling it",
    )
    rows = user.execute(
        "SELECT pid, backend_start, start_time_exec, end_time_exec FROM pgbg.log_background "
        "WHERE uuid_parent = %s ORDER BY start_time_exec",
        (parent,),
    ).fetchall()
    # The launch started two runners and no process after them ran a child: each later child was claimed
    # by a runner that had run one before (a pid and its backend_start name a process exactly). A pg_cron
    # tick or a poll would have started a process of its own.
    runners: dict[tuple, list[tuple]] = {}
    for pid, backend_start, start, end in rows:
        runners.setdefault((pid, backend_start), []).append((start, end))
    assert len(runners) <= 2, f"{len(runners)} processes ran the 6 children of 2 slots"
    # And it claimed it in the transaction that recorded the one before: both times are the runner's own
    # clock, milliseconds apart unless the machine stalls it; a second is the shortest pg_cron interval.
    for runs in runners.values():
        for (_, end), (start, _) in itertools.pairwise(runs):
            gap = (start - end).total_seconds()
            assert gap < 0.5, f"a runner started its next child {gap:.3f} s after the last one ended"


def test_a_look_at_the_roles_free_slots_counts_holders_only_for_batches_with_queued_children(
    dsn: str, admin: psycopg.Connection, user: psycopg.Connection
) -> None:
    """A lingering runner looks at its role's free slots at each wake, and as it decides to leave (under
    the role's lock, which launches wait for). Each count of a batch's slot holders reads pg_locks; counted
    for every batch the role had ever run, a look took 20 ms for a role with 26 batches, ever longer as
    its history grew, and a new batch waited for it to start."""
    for _ in range(5):
        assert wait(user, launch(user, ["select 1"], max_parallel=1)) == "done"
    with gate(dsn) as g:
        parent = launch(user, [f"select {g.sql}"] * 3, max_parallel=1)
        g.wait_for(1)
        with admin.transaction():
            admin.execute("SET LOCAL track_functions = 'all'")
            # Whatever plan is chosen: here the one that reads the batch table first, as on a database whose
            # statistics favour it (the bench's did; the tests' shared one did not).
            admin.execute("SET LOCAL enable_indexscan = off")
            admin.execute("SET LOCAL enable_indexonlyscan = off")
            admin.execute("SET LOCAL enable_bitmapscan = off")
            admin.execute(psycopg.sql.SQL("SET LOCAL ROLE {}").format(psycopg.sql.Identifier(user.info.user)))
            free = admin.execute("SELECT pgbg._role_slots_free()").fetchone()[0]
            counts = admin.execute(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions"
                " WHERE schemaname = 'pgbg' AND funcname = '_slot_holders'"
            ).fetchone()[0]
        g.open()
        assert wait(user, parent) == "done"
    assert free is False  # its one slot is held, by the runner at the gate
    assert counts == 1, f"slot holders counted {counts} times for one batch with queued children"


@pytest.mark.pg_background_only
def test_a_lingering_runner_counts_slot_holders_only_for_work_that_was_queued_before_it_waited(
    dsn: str, admin: psycopg.Connection, make_role: Callable[..., str]
) -> None:
    """A lingering runner woke for its role's next batch only once it had counted the holders of that
    batch's slots (pg_locks, and each holder's process): a look that W1's eight runners made as they
    woke together, on two cores, and the last began 3 ms later for it. A batch queued since the runner
    began to wait has free slots, or its launch counted that runner out; only work the role had queued
    already (whose slots it found taken) is worth the count."""
    role_dsn = make_role()
    role = conninfo_to_dict(role_dsn)["user"]
    # The role's sessions count their calls of the engine's functions, its runners too; they report them
    # as they end.
    admin.execute(psycopg.sql.SQL("ALTER ROLE {} SET track_functions = 'all'").format(psycopg.sql.Identifier(role)))

    def slot_looks() -> int:
        admin.execute("SELECT pg_stat_clear_snapshot()")
        return admin.execute(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions"
            " WHERE schemaname = 'pgbg' AND funcname = '_role_slots_free'"
        ).fetchone()[0]

    def runners_gone() -> bool:
        return (
            admin.execute(
                "SELECT count(*) = 0 FROM pg_stat_activity WHERE usename = %s AND backend_type = 'pg_background'",
                (role,),
            ).fetchone()[0]
            is True
        )

    with psycopg.connect(role_dsn, autocommit=True) as user:
        before = slot_looks()
        first = launch(user, ["select 1"], max_parallel=1)
        assert wait(user, first) == "done"
        # Its runner lingers, with nothing of the role queued, and takes the next batch.
        second = launch(user, ["select 1"], max_parallel=1)
        assert wait(user, second) == "done"
        ran = user.execute(
            "SELECT count(DISTINCT (pid, backend_start)) FROM pgbg.log_background WHERE uuid_parent = ANY(%s::uuid[])",
            ([first, second],),
        ).fetchone()[0]
        poll_until(runners_gone, 60, what="the role's runners to leave")
        woken = slot_looks() - before

        # A runner that begins to wait while a batch of its role waits for a slot counts its holders.
        with gate(dsn) as g:
            blocked = launch(user, [f"select {g.sql}"] * 3, max_parallel=1)
            g.wait_for(1)
            before = slot_looks()
            assert wait(user, launch(user, ["select 1"], max_parallel=1)) == "done"
            g.open()
            assert wait(user, blocked) == "done"
        poll_until(runners_gone, 60, what="the role's runners to leave")
        full = slot_looks() - before
    assert ran == 1, f"{ran} runners ran the two batches: the second was not the lingering runner's"
    assert woken == 0, f"the lingering runner counted slot holders {woken} times for a batch queued as it waited"
    assert full > 0, "a runner that began to wait while its role's work waited for a slot never counted holders"


def test_a_look_for_the_roles_queued_work_reads_only_its_own_queue(
    dsn: str, admin: psycopg.Connection, make_role: Callable[..., str]
) -> None:
    """Lingering runners look for their role's next batch every 2 ms. Through every role's queue, a look
    read each queued child of the others: 400 ms for another role's 50,000, and eight runners kept both
    cores busy for as long as they lingered, slowing that other batch too."""
    looker_dsn = make_role()
    # A role that row-level security does not narrow (as a superuser's runners, the bench's among them):
    # the planner is free to read every queued child first, and did where the role had run many batches.
    admin.execute(
        psycopg.sql.SQL("ALTER ROLE {} SUPERUSER").format(psycopg.sql.Identifier(conninfo_to_dict(looker_dsn)["user"]))
    )
    with (
        psycopg.connect(make_role(), autocommit=True) as other,
        psycopg.connect(looker_dsn, autocommit=True) as looker,
        gate(dsn) as g,
    ):
        parent = launch(other, [f"select {g.sql}"] * 2000, max_parallel=1)
        g.wait_for(1)
        with looker.transaction():
            # Whatever plan is chosen: a seq scan of the batches is what a large batch table rules out.
            looker.execute("SET LOCAL enable_seqscan = off")
            queued = looker.execute("SELECT pgbg._role_has_queued()").fetchone()[0]
            # Each statement plans the look afresh, and the first plans read the catalogs: the last of three.
            explain = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT pgbg._role_has_queued()"
            plan = [looker.execute(explain).fetchone()[0] for _ in range(3)][-1]
        stop(other, parent)
    top = plan[0]["Plan"]
    pages = top["Shared Hit Blocks"] + top["Shared Read Blocks"]
    assert queued is False
    # Through every queue, the look read a page or two per queued child of the other role (4,088 pages);
    # its own queue (empty) is an index page or two, and planning reads a few catalog pages.
    assert pages < 200, f"a look at an empty queue read {pages} pages"


def test_a_claim_reads_a_few_pages_whatever_the_queue_and_its_statistics(
    admin: psycopg.Connection, user: psycopg.Connection
) -> None:
    """A runner plans its claim once, with the statistics of the moment: often those of a queue analyzed
    empty, which make each partial index of queued children look like a page or two. Up to engine 1.1.5
    (and in 1.1.6 as first committed) the claimed row was named by id alone, and the planner read an index
    of queued children whole to find it: every queued child, at each claim of each child."""
    claim = (
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT * FROM pgbg._claim(%s, 99, now(), NULL, true, %s, %s, %s,"
        " ROW('{}'::jsonb, NULL, NULL, NULL, NULL, NULL)::pgbg.child_outcome, now())"
    )
    with admin.transaction():
        # The statistics of a table with a history and nothing queued or running when it was analyzed (as
        # autovacuum leaves it after a batch), in this transaction only.
        admin.execute(
            "SELECT pg_restore_relation_stats('schemaname', 'pgbg', 'relname', c.relname::text, 'relpages', 2000,"
            " 'reltuples', CASE WHEN i.indpred IS NULL THEN 100000 ELSE 0 END::real)"
            " FROM pg_class c LEFT JOIN pg_index i ON i.indexrelid = c.oid"
            " WHERE c.relnamespace = 'pgbg'::regnamespace AND (c.relname = 'log_background' OR i.indrelid ="
            " 'pgbg.log_background'::regclass)"
        )
        admin.execute(
            "SELECT pg_restore_attribute_stats('schemaname', 'pgbg', 'relname', 'log_background', 'attname',"
            " 'status', 'inherited', false, 'null_frac', 0::real, 'avg_width', 4, 'n_distinct', 1::real,"
            " 'most_common_vals', '{done}'::text, 'most_common_freqs', '{1}'::real[])"
        )
        admin.execute(psycopg.sql.SQL("SET LOCAL ROLE {}").format(psycopg.sql.Identifier(user.info.user)))
        # Queued in this transaction, which is rolled back: no statistics know of them, no runner sees them.
        parent = launch(admin, ["select 1"] * 10000, max_parallel=1)
        child = admin.execute(
            "SELECT id, seq, attempt FROM pgbg._claim(%s, 99, now(), NULL, true, 0, NULL, NULL, NULL, NULL)", (parent,)
        ).fetchone()
        pages = []
        for _ in range(3):  # the first plans read the catalogs: the last of three
            plan = admin.execute(claim, (parent, child[1], child[0], child[2])).fetchone()[0]
            top = plan[0]["Plan"]
            pages.append(top["Shared Hit Blocks"] + top["Shared Read Blocks"])
            child = admin.execute(
                "SELECT id, seq, attempt FROM pgbg.log_background WHERE uuid_parent = %s AND status = 'running'"
                " ORDER BY seq DESC LIMIT 1",
                (parent,),
            ).fetchone()
        raise psycopg.Rollback()
    # Through a whole index of queued children, a claim read 460 pages with 9,999 queued; by batch
    # and seq, and the done child by batch and id, 70: index pages, the rows, their counters and the
    # checks of row-level security.
    assert pages[-1] < 150, f"a claim (and the record of the child before) read {pages} pages with 9,999 queued"


def test_batch_survives_the_launching_session(dsn: str, user_dsn: str, scratch: str) -> None:
    with psycopg.connect(user_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {scratch}.marks (n int)")
        parent = launch(conn, [f"insert into {scratch}.marks select 1 from pg_sleep(0.3)"] * 4, max_parallel=2)
    # The launcher is gone; another session watches the batch end.
    with psycopg.connect(user_dsn, autocommit=True) as other:
        assert wait(other, parent) == "done"
        assert other.execute(f"SELECT count(*) FROM {scratch}.marks").fetchone()[0] == 4


def test_rolled_back_launch_runs_nothing(user: psycopg.Connection, scratch: str) -> None:
    user.execute(f"CREATE TABLE {scratch}.never (n int)")
    with contextlib.suppress(RuntimeError), user.transaction():
        launch(user, [f"insert into {scratch}.never values (1)"])
        raise RuntimeError("roll back")  # the enqueuing transaction rolls back
    time.sleep(0.5)
    assert user.execute(f"SELECT count(*) FROM {scratch}.never").fetchone()[0] == 0
    assert user.execute("SELECT count(*) FROM pgbg.batch").fetchone()[0] == 0


@pytest.fixture
def global_cap(admin: psycopg.Connection) -> Iterator[None]:
    admin.execute("UPDATE pgbg.settings SET max_workers = 2")
    yield
    admin.execute("UPDATE pgbg.settings SET max_workers = NULL")


def test_global_cap_holds_across_batches(dsn: str, user: psycopg.Connection, global_cap: None) -> None:
    with gate(dsn) as g:
        first = launch(user, [f"select pg_sleep(0.2) from (select {g.sql}) g"] * 6, max_parallel=2)
        second = launch(user, [f"select pg_sleep(0.2) from (select {g.sql}) g"] * 6, max_parallel=2)
        with Sampler(dsn, [first, second]) as sampler:
            _held(sampler, g, 2)
            assert wait(user, first) == "done"
            assert wait(user, second) == "done"
    assert sampler.max_running == 2
    assert sampler.max_workers == 2


@pytest.mark.pg_background_only
def test_no_free_worker_keeps_work_queued_until_one_frees(
    dsn: str, admin: psycopg.Connection, user: psycopg.Connection
) -> None:
    # Fill every background worker slot of the server with real pg_background workers. They wait at a gate
    # that never opens, so only their cancel frees the slots (60-s sleeps had to outlast the test).
    free = admin.execute("SELECT current_setting('max_worker_processes')::int").fetchone()[0]
    admin.execute("SET pg_background.max_workers = %s" % (free + 1))
    hogs = []
    with gate(dsn) as never:
        hog = f"select {never.sql}"
        while True:
            try:
                hogs.append(admin.execute("SELECT * FROM pg_background_launch_v2(%s)", (hog,)).fetchone())
            except psycopg.Error as exc:
                failure = str(exc)
                break
            assert len(hogs) <= free
        assert "could not register background process" in failure
        try:
            parent = launch(user, ["select 42 as answer"] * 3, max_parallel=3)
            time.sleep(0.3)
            assert statuses(monitor(user, parent)) == ["queued"] * 3
        finally:
            for pid, cookie in hogs:
                admin.execute("SELECT pg_background_cancel_v2(%s, %s)", (pid, cookie))
                admin.execute("SELECT pg_background_detach_v2(%s, %s)", (pid, cookie))
        poll_until(
            lambda: admin.execute("SELECT count(*) = 0 FROM pg_stat_activity WHERE query = %s", (hog,)).fetchone()[0]
        )
    # The next poll starts it.
    assert wait(user, parent) == "done"
    assert [r["result"]["preview"] for r in monitor(user, parent)] == [[{"answer": 42}]] * 3


def test_housekeeping_settles_only_the_claim_it_judged_dead(
    admin: psycopg.Connection, user: psycopg.Connection, user_dsn: str
) -> None:
    # Children of a dead runner; housekeeping takes its snapshot, a live runner claims one of them again,
    # and only then does housekeeping lock that row: READ COMMITTED hands it the newest version, the live
    # claim, which it must leave alone.
    parent = launch(user, ["select 1"] * 300)
    assert wait(user, parent) == "done"
    admin.execute(
        "UPDATE pgbg.log_background SET status = 'running', pid = 999999, attempt = 1 WHERE uuid_parent = %s",
        (parent,),
    )
    with psycopg.connect(user_dsn, autocommit=True) as keeper, psycopg.connect(admin.info.dsn) as blocker:
        keeper_pid = keeper.info.backend_pid
        # Housekeeping counts each orphan it settles in a row of its own shard: this uncommitted one holds
        # it at the first, with the rows it has not fetched yet unlocked.
        blocker.execute(
            "INSERT INTO pgbg.batch_progress (uuid_parent, shard, role_name, queued, running, done, failed, "
            "stopped, lost) VALUES (%s, %s, %s, 0, 0, 0, 0, 0, 0)",
            (parent, -keeper_pid, user.info.user),
        )
        housekeeping = threading.Thread(
            target=lambda: keeper.execute("SELECT count(*) FROM pgbg.pg_background_monitor(%s)", (parent,))
        )
        housekeeping.start()
        poll_until(
            lambda: admin.execute(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (keeper_pid,)
            ).fetchone()[0]
        )
        # A live claim, as housekeeping sees one: this session's pid and backend_start.
        claimed = admin.execute(
            "UPDATE pgbg.log_background SET attempt = 2, pid = pg_backend_pid(), "
            "backend_start = (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()) "
            "WHERE id = (SELECT id FROM pgbg.log_background WHERE uuid_parent = %s AND pid = 999999 "
            "ORDER BY seq DESC LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id",
            (parent,),
        ).fetchone()[0]
        blocker.rollback()
        housekeeping.join(30)
        row = admin.execute("SELECT status, attempt FROM pgbg.log_background WHERE id = %s", (claimed,)).fetchone()
        admin.execute("UPDATE pgbg.log_background SET status = 'done' WHERE id = %s", (claimed,))
    assert row == ("running", 2)
    # The orphans it did settle run again; done before the role's sessions are ended and its rows go.
    poll_until(
        lambda: admin.execute(
            "SELECT count(*) = 0 FROM pgbg.log_background WHERE uuid_parent = %s AND status <> 'done'", (parent,)
        ).fetchone()[0],
        60,
    )
