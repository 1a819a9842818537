"""What a runner's commits wait for: a WAL flush only when a child's work is in them."""

from __future__ import annotations

import psycopg

from tests.helpers import launch, poll_until, wait

CHILDREN = 1200


def _runner_flushes(admin: psycopg.Connection) -> int:
    """WAL flushes (fsyncs) made so far by background workers: runners, pg_cron's jobs and launcher."""
    admin.execute("SELECT pg_stat_clear_snapshot()")
    return admin.execute(
        "SELECT coalesce(sum(fsyncs), 0)::int FROM pg_stat_io"
        " WHERE object = 'wal' AND backend_type = 'background worker'"
    ).fetchone()[0]


def _flushes_of_a_batch(admin: psycopg.Connection, user: psycopg.Connection, statements: list[str]) -> tuple[int, str]:
    role = user.info.user

    def runners_gone() -> bool:
        # A worker's statistics are written before it leaves pg_stat_activity (before_shmem_exit).
        return (
            admin.execute(
                "SELECT count(*) = 0 FROM pg_stat_activity WHERE usename = %s AND application_name LIKE 'pgbg:%%'",
                (role,),
            ).fetchone()[0]
            is True
        )

    poll_until(runners_gone, 60)
    before = _runner_flushes(admin)
    # One runner: no commit shares a flush with another runner's.
    parent = launch(user, statements, max_parallel=1)
    assert wait(user, parent) == "done"
    poll_until(runners_gone, 60)  # they linger, then leave
    return _runner_flushes(admin) - before, parent


def _largest_commit(user: psycopg.Connection, parent: str) -> int:
    """The most children of the batch settled by one transaction (their log rows share its xmin)."""
    return user.execute(
        "SELECT max(n) FROM (SELECT count(*) AS n FROM pgbg.log_background WHERE uuid_parent = %s"
        " GROUP BY xmin::text) t",
        (parent,),
    ).fetchone()[0]


def test_a_runner_waits_for_a_wal_flush_only_where_a_child_wrote(
    admin: psycopg.Connection, user: psycopg.Connection, scratch: str
) -> None:
    user.execute(f"CREATE TABLE {scratch}.marks (n int)")
    # Writes only for odd numbers: in a burst of such calls (one shape), the first child may write
    # nothing and the next ones do.
    user.execute(
        f"CREATE FUNCTION {scratch}.mark_odd(n int) RETURNS void LANGUAGE sql "
        f"BEGIN ATOMIC INSERT INTO {scratch}.marks SELECT n WHERE n % 2 = 1; END"
    )
    # Children that write nothing: their burst's commit holds only their log rows, which a crash would
    # put back in the queue to run again; it need not wait. A burst takes statements of one shape: two
    # shapes by turns, 30 each, make 40 bursts (engine 1.1.0 waited at every burst).
    reads, _ = _flushes_of_a_batch(
        admin, user, ["SELECT 1" if k // 30 % 2 else "SELECT 1 + 1" for k in range(CHILDREN)]
    )
    # Children that write: every burst's commit holds their work, and waits for its flush. A burst holds
    # at most 48 children that wrote (below), so there are 25 or more of them (12 where half write).
    writes, writers = _flushes_of_a_batch(admin, user, [f"INSERT INTO {scratch}.marks VALUES (0)"] * CHILDREN)
    mixed, _ = _flushes_of_a_batch(admin, user, [f"SELECT {scratch}.mark_odd({n})" for n in range(CHILDREN)])
    assert user.execute(f"SELECT count(*) FROM {scratch}.marks").fetchone()[0] == CHILDREN + CHILDREN // 2
    assert writes >= CHILDREN // 48, writes
    assert mixed >= CHILDREN // 2 // 48, mixed  # half of them write
    assert reads <= 10, reads
    # Each child that wrote keeps an XID of its subtransaction until its burst commits, and a transaction
    # that holds more than 64 slows every snapshot on the server: a burst stops before (the first child
    # of a burst runs alone, then at most 47 join it; a burst of reads is bounded by time only).
    assert _largest_commit(user, writers) <= 48


def test_a_child_on_its_own_is_recorded_with_the_claim_of_the_next_and_flushed_only_if_it_wrote(
    admin: psycopg.Connection, user: psycopg.Connection, scratch: str
) -> None:
    # Children over a millisecond run one per transaction: the outcome of one and the claim of the next
    # are one statement, and its commit holds the child's work.
    user.execute(f"CREATE TABLE {scratch}.marks (n int)")
    n = 40
    reads, _ = _flushes_of_a_batch(admin, user, ["SELECT pg_sleep(0.002)"] * n)
    writes, writers = _flushes_of_a_batch(
        admin, user, [f"INSERT INTO {scratch}.marks SELECT {k} FROM pg_sleep(0.002)" for k in range(n)]
    )
    assert user.execute(f"SELECT count(*) FROM {scratch}.marks").fetchone()[0] == n
    assert writes >= n, writes
    assert reads <= 10, reads
    assert _largest_commit(user, writers) == 1
    rows = user.execute(
        "SELECT status, attempt, result ->> 'command', error, end_time_exec,"
        " lead(start_time_exec) OVER (ORDER BY start_time_exec) AS next_start"
        " FROM pgbg.log_background WHERE uuid_parent = %s ORDER BY start_time_exec",
        (writers,),
    ).fetchall()
    assert {r[:4] for r in rows} == {("done", 1, "INSERT 0 1", None)}
    # One runner: each child ended before the next started.
    assert all(r[4] <= r[5] for r in rows[:-1])
    counts = user.execute(
        "SELECT sum(queued), sum(running), sum(done), sum(failed) FROM pgbg.batch_progress WHERE uuid_parent = %s",
        (writers,),
    ).fetchone()
    assert counts == (0, 0, n, 0)
