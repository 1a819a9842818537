"""What waiters use (engine 1.0.0): submit, watch locks, polls of many batches, end notifications."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.helpers import gate, launch, monitor, poll_until, statuses, wait


def submit(conn: psycopg.Connection, statements: list[str], origin: str, claim: str, **options: Any) -> dict:
    names = "".join(f", p_{k} => %({k})s" for k in options)
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(
            f"SELECT * FROM pgbg.pg_background_submit(%(q)s::text[], %(origin)s, %(claim)s{names})",
            {"q": statements, "origin": origin, "claim": claim, **options},
        ).fetchone()


def test_submit_launches_once_per_claim_and_resumes_for_a_new_one(user: psycopg.Connection, scratch: str) -> None:
    user.execute(f"CREATE TABLE {scratch}.effects (n int)")
    statements = [
        f"insert into {scratch}.effects values (1)",
        "select 1/0",
        f"insert into {scratch}.effects values (3)",
    ]
    first = submit(user, statements, "dag/run/task/-1", "try 1")
    assert first["action"] == "launched"
    again = submit(user, statements, "dag/run/task/-1", "try 1")  # the same try, restarted
    assert (again["action"], again["uuid_parent"]) == ("attached", first["uuid_parent"])
    parent = str(first["uuid_parent"])
    assert wait(user, parent) == "failed"
    second = submit(user, statements, "dag/run/task/-1", "try 2")
    assert (second["action"], str(second["uuid_parent"]), second["previous_holder"]) == ("resumed", parent, "try 1")
    assert wait(user, parent) == "failed"  # 1/0 again, the inserts did not run twice
    assert sorted(r[0] for r in user.execute(f"SELECT n FROM {scratch}.effects").fetchall()) == [1, 3]
    assert [r["attempt"] for r in monitor(user, parent)] == [1, 2, 1]
    # Other statements, or an earlier batch whose success a try took (its task completed), give a new batch.
    assert submit(user, ["select 2"], "dag/run/task/-1", "try 3")["action"] == "launched"
    done = submit(user, ["select 2"], "dag/run/task/-1", "try 3")
    assert wait(user, str(done["uuid_parent"])) == "done"
    take_outcome(user, str(done["uuid_parent"]), "try 3")
    assert submit(user, ["select 2"], "dag/run/task/-1", "try 4")["action"] == "launched"


def take_outcome(conn: psycopg.Connection, parent: str, claim: str) -> dict[str, Any]:
    return conn.execute("SELECT pgbg.pg_background_take_outcome(%s, %s)", (parent, claim)).fetchone()[0]


def test_a_success_nobody_took_is_taken_by_the_next_try_not_run_again(user: psycopg.Connection, scratch: str) -> None:
    """A try whose worker died after its batch succeeded: the retry takes that outcome; only a try after
    one that took it (a clear of a task that completed) runs the statements again."""
    user.execute(f"CREATE TABLE {scratch}.effects (n int)")
    statements = [f"insert into {scratch}.effects values ({i})" for i in range(3)]
    origin = "dag/run/taken/-1"
    parent = str(submit(user, statements, origin, "try 1")["uuid_parent"])
    assert wait(user, parent) == "done"
    # try 1 died before it took the outcome: try 2 gets the same batch, finished, and nothing runs.
    second = submit(user, statements, origin, "try 2")
    assert (second["action"], str(second["uuid_parent"]), second["previous_holder"]) == ("finished", parent, "try 1")
    # A late call of try 1 records nothing; try 2's records that it took the success.
    assert take_outcome(user, parent, "try 1")["status"] == "done"
    assert (
        user.execute("SELECT outcome_taken_by FROM pgbg.batch WHERE uuid_parent = %s", (parent,)).fetchone()[0] is None
    )
    summary = take_outcome(user, parent, "try 2")
    assert (summary["status"], summary["counts"]["done"]) == ("done", 3)
    row = user.execute(
        "SELECT outcome_taken_by, outcome_taken_at IS NOT NULL FROM pgbg.batches WHERE uuid_parent = %s", (parent,)
    ).fetchone()
    assert row == ("try 2", True)
    assert sorted(r[0] for r in user.execute(f"SELECT n FROM {scratch}.effects").fetchall()) == [0, 1, 2]
    # The task completed with try 2: try 3 is a clear, and runs the statements again in a new batch.
    third = submit(user, statements, origin, "try 3")
    assert third["action"] == "launched"
    assert wait(user, str(third["uuid_parent"])) == "done"
    assert len(user.execute(f"SELECT n FROM {scratch}.effects").fetchall()) == 6


def test_a_taken_failure_is_resumed_and_its_new_outcome_taken_again(user: psycopg.Connection) -> None:
    origin = "dag/run/retaken/-1"
    parent = str(submit(user, ["select 1", "select 1/0"], origin, "try 1")["uuid_parent"])
    assert wait(user, parent) == "failed"
    assert take_outcome(user, parent, "try 1")["status"] == "failed"
    # A failure is resumed whoever took it; what runs again has an outcome of its own to take.
    assert submit(user, ["select 1", "select 1/0"], origin, "try 2")["action"] == "resumed"
    assert (
        user.execute("SELECT outcome_taken_by FROM pgbg.batch WHERE uuid_parent = %s", (parent,)).fetchone()[0] is None
    )
    assert wait(user, parent) == "failed"
    take_outcome(user, parent, "try 2")
    assert user.execute("SELECT outcome_taken_by FROM pgbg.batch WHERE uuid_parent = %s", (parent,)).fetchone()[0] == (
        "try 2"
    )


def test_a_watched_batch_waits_for_its_watcher_then_is_taken_over(
    dsn: str, user_dsn: str, user: psycopg.Connection
) -> None:
    # The gate never opens: the first child still runs at the takeover (which cuts it short), and the
    # second one still runs when the test looks, however slow the machine.
    with gate(dsn) as never:
        _watched_then_taken_over(user_dsn, user, [f"select {never.sql}"] * 2)


def _watched_then_taken_over(user_dsn: str, user: psycopg.Connection, statements: list[str]) -> None:
    origin = "dag/run/watched/-1"
    first = submit(user, statements, origin, "try 1 deferred", requeue_on_takeover=True, max_parallel=1)
    parent = str(first["uuid_parent"])
    poll_until(lambda: "running" in statuses(monitor(user, parent)), 20)
    with psycopg.connect(user_dsn, autocommit=True) as watcher:
        assert (
            watcher.execute(
                "SELECT pgbg.pg_background_watch(%s::uuid[], %s::text[])", ([parent], ["try 1 deferred"])
            ).fetchone()[0]
            == 1
        )
        assert user.execute("SELECT pgbg.pg_background_watched(%s, 'try 2 deferred')", (parent,)).fetchone()[0]
        assert not user.execute("SELECT pgbg.pg_background_watched(%s, 'try 1 deferred')", (parent,)).fetchone()[0]
        assert submit(user, statements, origin, "try 2 deferred")["action"] == "waiting"
    # The watcher's connection is gone (its backend a moment later): the new try takes over. Its holder
    # waited from the triggerer, so the running child is stopped and queued again, as that holder's kill
    # would have done.
    poll_until(
        lambda: not user.execute("SELECT pgbg.pg_background_watched(%s, 'try 2 deferred')", (parent,)).fetchone()[0],
        10,
        what="the watcher's session to end",
    )
    second = submit(user, statements, origin, "try 2 deferred", requeue_on_takeover=True)
    assert second["action"] == "reconnected"
    # The cut-short child waits behind the rest; the runner goes on with the next one.
    poll_until(lambda: statuses(monitor(user, parent)) == ["queued", "running"], 20)
    assert monitor(user, parent)[0]["error"] == "cut short and queued again: takeover by try 2 deferred"
    assert user.execute("SELECT claimed_by FROM pgbg.batch WHERE uuid_parent = %s", (parent,)).fetchone()[0] == (
        "try 2 deferred"
    )
    # A late kill of the first try does nothing now.
    assert user.execute("SELECT pgbg.pg_background_stop(%s, 'try 1 deferred')", (parent,)).fetchone()[0] == 0
    user.execute("SELECT pgbg.pg_background_stop(%s)", (parent,))


def heartbeat(conn: psycopg.Connection, waiter: str, ttl: str, watch=(), unwatch=()) -> bool:
    return conn.execute(
        "SELECT pgbg.pg_background_heartbeat(%s, %s::interval, %s::uuid[], %s::text[], %s::uuid[], %s::text[])",
        (waiter, ttl, [b for b, _ in watch], [c for _, c in watch], [b for b, _ in unwatch], [c for _, c in unwatch]),
    ).fetchone()[0]


def test_a_heartbeat_waiter_is_alive_until_its_ttl_runs_out(dsn: str, user: psycopg.Connection, make_role) -> None:
    """What a waiter behind a pooler in transaction mode uses: no session, a row it keeps alive."""
    with gate(dsn) as never:  # never opens: the child still runs when try 2 reconnects to it
        _heartbeat_waiter(user, make_role, f"select {never.sql}")


def _heartbeat_waiter(user: psycopg.Connection, make_role, statement: str) -> None:
    origin = "dag/run/heartbeat/-1"
    first = submit(user, [statement], origin, "try 1 deferred", requeue_on_takeover=True)
    parent = str(first["uuid_parent"])
    waiter = str(uuid.uuid4())

    def watched(claim: str) -> bool:
        return user.execute("SELECT pgbg.pg_background_watched(%s, %s)", (parent, claim)).fetchone()[0]

    def alive_until() -> Any:
        return user.execute("SELECT alive_until FROM pgbg.waiter WHERE waiter_id = %s", (waiter,)).fetchone()[0]

    # Beats of a minute: a stall of the test between two of them cannot expire the waiter (beats of 2 s,
    # 0.8 s apart, did after a stall of 1.2 s); each beat must move its life on instead.
    assert heartbeat(user, waiter, "1 min", watch=[(parent, "try 1 deferred")]) is False  # a new waiter
    assert watched("try 2 deferred")
    assert not watched("try 1 deferred")
    assert submit(user, [statement], origin, "try 2 deferred")["action"] == "waiting"
    # Kept alive by its beats, with nothing more to say.
    for _ in range(3):
        before = alive_until()
        time.sleep(0.1)
        assert heartbeat(user, waiter, "1 min") is True
        assert alive_until() > before
        assert watched("try 2 deferred")
    # Another role sees none of it, and cannot beat for it.
    other = psycopg.connect(make_role(), autocommit=True)
    assert other.execute("SELECT count(*) FROM pgbg.waiter_watch").fetchone()[0] == 0
    with pytest.raises(psycopg.errors.UniqueViolation):
        other.execute("SELECT pgbg.pg_background_heartbeat(%s, '1 h')", (waiter,))
    assert user.execute("SELECT alive_until < now() + interval '30 minutes' FROM pgbg.waiter").fetchone()[0]
    other.close()
    # Its process died after a last beat of a short ttl: no beat comes, and once the ttl has run out the
    # batch is free for the next try.
    assert heartbeat(user, waiter, "100 ms") is True
    poll_until(lambda: not watched("try 2 deferred"), what="the waiter's ttl to run out")
    assert submit(user, [statement], origin, "try 2 deferred")["action"] == "reconnected"
    # Back after its ttl ran out: it has to name what it watches again.
    assert heartbeat(user, waiter, "1 min") is False
    assert not watched("try 3 deferred")
    assert heartbeat(user, waiter, "1 min", watch=[(parent, "try 2 deferred")]) is True
    assert watched("try 3 deferred")
    assert heartbeat(user, waiter, "1 min", unwatch=[(parent, "try 2 deferred")]) is True
    assert not watched("try 3 deferred")
    heartbeat(user, waiter, "1 min", watch=[(parent, "try 2 deferred")])
    assert user.execute("SELECT pgbg.pg_background_heartbeat_end(%s)", (waiter,)).fetchone()[0]
    assert not watched("try 3 deferred")
    assert user.execute("SELECT count(*) FROM pgbg.waiter_watch").fetchone()[0] == 0
    user.execute("SELECT pgbg.pg_background_stop(%s)", (parent,))


def test_watched_by_finds_another_waiter_of_the_same_claim(user_dsn: str, user: psycopg.Connection) -> None:
    """How a cancelled trigger tells that its try waits for the batch from elsewhere (it moved)."""
    parent = launch(user, ["select pg_sleep(30)"])

    def watched_by(conn: psycopg.Connection, claim: str, except_waiter: str | None = None) -> bool:
        return conn.execute(
            "SELECT pgbg.pg_background_watched_by(%s, %s, %s)", (parent, claim, except_waiter)
        ).fetchone()[0]

    user.execute("SELECT pgbg.pg_background_watch(%s::uuid[], %s::text[])", ([parent], ["try 1 deferred"]))
    assert not watched_by(user, "try 1 deferred")  # its own lock is not another waiter
    with psycopg.connect(user_dsn, autocommit=True) as other:
        assert watched_by(other, "try 1 deferred")
        assert not watched_by(other, "try 2 deferred")
    user.execute("SELECT pgbg.pg_background_unwatch(%s::uuid[], %s::text[])", ([parent], ["try 1 deferred"]))
    waiter = str(uuid.uuid4())
    heartbeat(user, waiter, "30 s", watch=[(parent, "try 1 deferred")])
    assert watched_by(user, "try 1 deferred")
    assert not watched_by(user, "try 1 deferred", waiter)  # its own heartbeat
    user.execute("SELECT pgbg.pg_background_heartbeat_end(%s)", (waiter,))
    assert not watched_by(user, "try 1 deferred")
    user.execute("SELECT pgbg.pg_background_stop(%s)", (parent,))


def test_a_worker_claim_is_reconnected_not_requeued(dsn: str, user: psycopg.Connection) -> None:
    with gate(dsn) as g:
        first = submit(user, [f"select {g.sql}"], "dag/run/worker/-1", "try 1")
        parent = str(first["uuid_parent"])
        g.wait_for(1)  # the child still runs when try 2 comes
        # The worker of try 1 died (it holds no watch lock); try 2 waits for the running child, not reruns it.
        assert submit(user, [f"select {g.sql}"], "dag/run/worker/-1", "try 2")["action"] == "reconnected"
        g.open()
        assert wait(user, parent) == "done"
    assert monitor(user, parent)[0]["attempt"] == 1


def test_poll_many_and_the_end_notification(user_dsn: str, user: psycopg.Connection) -> None:
    with psycopg.connect(user_dsn, autocommit=True) as listener:
        channel = listener.execute("SELECT pgbg.batch_end_channel()").fetchone()[0]
        listener.execute(f'LISTEN "{channel}"')
        quick = launch(user, ["select 1"])
        slow = launch(user, ["select pg_sleep(0.5)"])
        gone = "00000000-0000-4000-8000-00000000dead"
        rows = user.execute(
            "SELECT uuid_parent, status::text, children FROM pgbg.pg_background_poll_many(%s::uuid[])",
            ([quick, slow, gone],),
        ).fetchall()
        assert {str(r[0]) for r in rows} == {quick, slow}  # unknown batches have no row
        ended = set()
        deadline = time.monotonic() + 10
        for notify in listener.notifies(timeout=10):
            ended.add(notify.payload)
            if ended >= {quick, slow} or time.monotonic() > deadline:
                break
        assert ended >= {quick, slow}
        states = dict(
            user.execute(
                "SELECT uuid_parent::text, status::text FROM pgbg.pg_background_poll_many(%s::uuid[])", ([quick, slow],)
            ).fetchall()
        )
        assert states == {quick: "done", slow: "done"}


def test_a_summary_is_bounded(user: psycopg.Connection) -> None:
    parent = launch(user, ["select 1/0"] * 30 + [f"select repeat('x', 2000) as t, {i} as n" for i in range(30)])
    assert wait(user, parent) == "failed"
    summary = user.execute("SELECT pgbg.pg_background_summary(%s, 5, 3)", (parent,)).fetchone()[0]
    assert summary["children"] == 60
    assert summary["counts"]["failed"] == 30
    assert len(summary["rows"]) == 5
    assert len(summary["problems"]) == 3
    assert [p["sqlstate"] for p in summary["problems"]] == ["22012"] * 3
    many = user.execute(
        "SELECT uuid_parent::text, summary FROM pgbg.pg_background_summaries(%s::uuid[], 1, 1)", ([parent],)
    ).fetchall()
    assert many[0][0] == parent
    assert len(many[0][1]["rows"]) == 1


@pytest.mark.parametrize("claim", [None, ""])
def test_submit_needs_an_origin_and_a_claim(user: psycopg.Connection, claim: str | None) -> None:
    if claim is None:
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            submit(user, ["select 1"], "o", None)  # type: ignore[arg-type]
    else:
        assert submit(user, ["select 1"], "o", claim)["action"] == "launched"


@pytest.fixture
def concurrent_build(user: psycopg.Connection, scratch: str) -> Callable[[], str]:
    """Launches a batch that builds an index CONCURRENTLY (and reindexes it so), which waits for every
    snapshot older than its own: a waiter that held one would hold it back until the waiter's end."""
    user.execute(f"CREATE TABLE {scratch}.big AS SELECT g AS a FROM generate_series(1, 20000) g")
    names = iter(range(100))

    def launch_build() -> str:
        k = next(names)
        return launch(
            user,
            [
                f"create index concurrently big_{k} on {scratch}.big (a)",
                f"reindex index concurrently {scratch}.big_{k}",
            ],
            max_parallel=1,
        )

    return launch_build


def test_a_wait_in_one_statement_refuses_a_batch_it_would_hold_back(
    user: psycopg.Connection, concurrent_build: Callable[[], str]
) -> None:
    parent = concurrent_build()
    started = time.monotonic()
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="would hold back") as refused:
        wait(user, parent, "10 min")
    # At once, not after its timeout: a refusal that came after the wait would take 10 min, against which
    # 60 s is no tight bound.
    assert time.monotonic() - started < 60
    assert "pg_background_await" in refused.value.diag.message_hint
    # The form that works: a procedure that commits between its checks. No bound on its time: one that held
    # the build back would wait for it until its own timeout, and return NULL then.
    assert user.execute("CALL pgbg.pg_background_await(%s, '60 s', NULL)", (parent,)).fetchone()[0] == "done"
    assert statuses(monitor(user, parent)) == ["done", "done"]
    # Nothing left to hold back: the function waits for it too.
    assert wait(user, parent, "5 s") == "done"


def test_a_poll_that_would_hold_a_batch_back_does_not_wait(
    user: psycopg.Connection, concurrent_build: Callable[[], str]
) -> None:
    parent = concurrent_build()
    started = time.monotonic()
    polls = 0
    while True:
        polls += 1
        status = user.execute("SELECT status FROM pgbg.pg_background_poll(%s, '10 min')", (parent,)).fetchone()[0]
        if status not in ("queued", "running"):
            break
        time.sleep(0.2)  # the poller waits between calls, holding no snapshot
    assert status == "done", [(r["status"], r["sqlstate"], r["error"], r["errors"]) for r in monitor(user, parent)]
    # No poll held it for its 10 min: a build of 20,000 rows is done well within 2 min otherwise.
    assert time.monotonic() - started < 120
    assert polls > 1


def test_a_synchronous_launch_refuses_a_batch_it_would_hold_back(user: psycopg.Connection, scratch: str) -> None:
    user.execute(f"CREATE TABLE {scratch}.t (a int)")
    before = user.execute("SELECT count(*) FROM pgbg.batch").fetchone()[0]
    with pytest.raises(psycopg.errors.FeatureNotSupported):
        launch(user, [f"create index concurrently on {scratch}.t (a)"], monitor=True)
    assert user.execute("SELECT count(*) FROM pgbg.batch").fetchone()[0] == before


def test_a_wait_without_a_timeout_checks_ever_less_often(admin: psycopg.Connection) -> None:
    # Its naps grow to 0.2 s. Without a deadline they stayed at 1 ms (greatest() skips a NULL): a thousand
    # checks a second for as long as a batch ran.
    parent = launch(admin, ["select pg_sleep(1.5)"])
    with admin.transaction():
        admin.execute("SET LOCAL track_functions = 'pl'")
        began = admin.execute("SELECT clock_timestamp()").fetchone()[0]
        assert admin.execute("SELECT pgbg.pg_background_wait(%s)", (parent,)).fetchone()[0] == "done"
        took = (admin.execute("SELECT clock_timestamp()").fetchone()[0] - began).total_seconds()
        checks = admin.execute(
            "SELECT calls FROM pg_stat_xact_user_functions WHERE schemaname = 'pgbg' AND funcname = '_housekeep_apart'"
        ).fetchone()[0]
    # A bound on the rate, not the count: the wait lasts as long as the launch and the batch take (a pg_cron
    # tick, a loaded machine). Naps of 5 ms doubling to 0.2 s make 7 checks in their first 0.3 s, then one
    # per 0.2 s at most; naps of 1 ms would make about 1,000 a second.
    assert checks <= 10 + took / 0.2, (checks, took)
