"""BatchWatcher: one connection per triggerer process and database for every batch its triggers await.

A triggerer runs up to a thousand triggers on one event loop, and PostgreSQL connections are scarce.
All triggers of a process that wait on the same database (same Airflow connection, database and
engine schema) share one watcher, which holds two connections however many batches it watches:

* a query connection: one ``pg_background_poll_many()`` round trip per interval for every watched
  batch (the engine's housekeeping runs in it), the watch locks that tell a newer try that a trigger
  of an earlier one is still alive, and the triggers' own calls (submit, summary, stop);
* a listening connection on the engine's end-of-batch channel, so a batch that ends is polled, and
  its trigger fires, within milliseconds, with no wait held open in the database per trigger.

Behind a pooler in transaction mode (see ``pooler.py``) there is no session to listen in or to hold a
lock with: the watcher then holds one connection, polls every watched batch at least every second
(``SESSIONLESS_POLL_INTERVAL``) instead of hearing the ends, and shows it is alive by a heartbeat row
(``pg_background_heartbeat``) instead of watch locks.

An outage (restart, failover, dropped connection, full connection table) closes both; the watcher
reconnects with capped exponential backoff and jitter, and each waiter fails only once the outage
has lasted longer than its own reconnect timeout. Cancelling one waiter never disturbs another.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import psycopg
from psycopg import sql

from airflow_pgbg.hooks.outage import Backoff, EngineUnreachable, is_outage
from airflow_pgbg.hooks.pooler import HEARTBEAT_EVERY, SESSIONLESS_POLL_INTERVAL, heartbeat_ttl
from airflow_pgbg.status import BatchState

if TYPE_CHECKING:
    from airflow_pgbg.hooks.pgbg import PgBackgroundHook

T = TypeVar("T")

WATCHER_APPLICATION_NAME = "pgbg-watcher"
"""application_name of a watcher's connections (the listening one adds ``:listen``)."""


async def wait_at_most(awaitable: Awaitable[T], seconds: float | None) -> tuple[bool, T | None]:
    """(True, result) if ``awaitable`` finished within ``seconds``, else (False, None) after
    cancelling it. Unlike ``asyncio.wait_for`` on Python < 3.12, never swallows a cancellation of the
    caller that coincides with the awaitable finishing, and keeps the cancellation's message."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if done:
        return True, task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False, None


class BatchNotFound(LookupError):
    """The batch does not exist, or the connection's role may not see it."""


@dataclass(frozen=True)
class BatchEnd:
    """A batch that has ended: its final state and, when asked for, its summary."""

    state: BatchState
    summary: dict[str, Any] | None = None


@dataclass(eq=False)
class _Waiter:
    uuid_parent: str
    claim: str | None
    poll_interval: float
    reconnect_timeout: float
    summary_rows: int | None
    future: asyncio.Future[BatchEnd]
    outage_since: float | None = None
    state: BatchState | None = field(default=None)


class BatchWatcher:
    """Waits for many batches over one query and one listening connection (see the module doc)."""

    LINGER = 30.0
    """Seconds the connections stay open after the last waiter has gone (triggers come and go)."""
    GATHER = 0.005
    """Seconds to gather end notifications that arrive together into one poll."""

    _registry: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], BatchWatcher]]] = (
        weakref.WeakKeyDictionary()
    )

    @classmethod
    def for_hook(cls, hook: PgBackgroundHook) -> BatchWatcher:
        """The watcher of the running event loop for the hook's connection, database and schema."""
        loop = asyncio.get_running_loop()
        key = (getattr(hook, hook.conn_name_attr), hook.database, hook.engine_schema)
        watchers = cls._registry.setdefault(loop, {})
        watcher = watchers.get(key)
        if watcher is None or watcher._stopping:
            watcher = watchers[key] = cls(hook, key)
        return watcher

    def __init__(self, hook: PgBackgroundHook, key: tuple[Any, ...]) -> None:
        self.hook = hook
        self._key = key
        self._ids = itertools.count()
        self._waiters: dict[int, _Waiter] = {}
        self._batches: Counter[str] = Counter()  # waiters per batch
        self._fresh: set[str] = set()  # batches to poll at once (new waiters, notifications)
        self._watching: set[tuple[str, str]] = set()  # watch locks held by the current query connection
        self._beating: set[tuple[str, str]] = set()  # watches recorded under the heartbeat of _waiter_id
        self._waiter_id = str(uuid.uuid4())
        self._beat_due: float | None = None  # loop time of the next heartbeat (None: none sent yet)
        self.session_less = False
        """The connection has no server session of its own (a pooler in transaction mode): no LISTEN, and
        heartbeats instead of watch locks."""
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._listen: psycopg.AsyncConnection[Any] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listen_error: BaseException | None = None
        self._query_lock = asyncio.Lock()
        self._connect_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.polls = 0
        """Round trips made so far (for tests and benchmarks)."""

    # -- public -----------------------------------------------------------------------------------

    async def wait(
        self,
        uuid_parent: str,
        *,
        claim: str | None,
        poll_interval: float,
        reconnect_timeout: float,
        summary_rows: int | None = None,
    ) -> BatchEnd:
        """The batch's final state once it has ended, and its summary (``pg_background_summary`` with
        ``summary_rows`` rows) when asked for: fetched in the same round for every batch that ended
        together, so a thousand ends cost a few round trips, not a thousand.

        Raises :class:`BatchNotFound`, :class:`EngineUnreachable` after an outage longer than
        ``reconnect_timeout``, or what the database answered that is not an outage. While waiting,
        ``claim`` holds a watch lock on the batch (see ``pg_background_watch``).
        """
        waiter = _Waiter(
            uuid_parent,
            claim,
            poll_interval,
            reconnect_timeout,
            summary_rows,
            asyncio.get_running_loop().create_future(),
        )
        wid = next(self._ids)
        self._waiters[wid] = waiter
        self._batches[uuid_parent] += 1
        self._fresh.add(uuid_parent)
        self._ensure_running()
        self._wake.set()
        try:
            return await waiter.future
        finally:
            del self._waiters[wid]
            self._batches[uuid_parent] -= 1
            if not self._batches[uuid_parent]:
                del self._batches[uuid_parent]
            self._wake.set()  # release its watch lock soon

    @property
    def waiter_id(self) -> str:
        """The id of this watcher's heartbeat (see ``pg_background_heartbeat``)."""
        return self._waiter_id

    def last_state(self, uuid_parent: str) -> BatchState | None:
        """The latest state polled for a batch that is being waited for."""
        return next((w.state for w in self._waiters.values() if w.uuid_parent == uuid_parent and w.state), None)

    async def call(self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]], reconnect_timeout: float) -> T:
        """``fn(connection)`` on the query connection, through outages of up to ``reconnect_timeout``."""
        self._ensure_running()
        backoff = Backoff()
        loop = asyncio.get_running_loop()
        since: float | None = None
        while True:
            conn = None
            try:
                conn = await self._connected()
                async with self._query_lock:
                    return await fn(conn)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                await self._close(self._detach(conn))
                since = since if since is not None else loop.time()
                waited = loop.time() - since
                if waited >= reconnect_timeout:
                    raise EngineUnreachable(waited, exc) from exc
                await asyncio.sleep(min(backoff.next_delay(), reconnect_timeout - waited))

    # -- the loop ---------------------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done() or self._stopping:
            loop = asyncio.get_running_loop()
            self._stopping = False
            self._registry.setdefault(loop, {})[self._key] = self
            self._task = loop.create_task(self._run(), name=f"pgbg watcher {self._key}")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        # When everything was last polled. The next full poll is due an interval later, the interval of
        # the waiters there are now: a waiter that joins a watcher that idled (a trigger that launched its
        # batch through it first) is polled at its own interval, not at the idle watcher's.
        last_full = -self.LINGER
        idle_since: float | None = None
        try:
            while True:
                if self._waiters:
                    idle_since = None
                else:
                    idle_since = idle_since if idle_since is not None else loop.time()
                    if loop.time() - idle_since >= self.LINGER:
                        # Decided without awaiting, so a waiter arriving from now on starts a new loop.
                        self._stopping = True
                        return
                started = loop.time()
                full = started >= last_full + self._interval()
                try:
                    await self._round(full=full)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    await self._close(self._detach(self._conn))
                    if not is_outage(exc):
                        self._fail_all(exc)  # an answer, not an outage: every waiter hears it
                        await asyncio.sleep(1.0)
                        continue
                    delay = self._outage(exc, backoff.next_delay())
                    await asyncio.sleep(delay)
                    continue
                backoff.reset()
                for waiter in self._waiters.values():
                    waiter.outage_since = None
                if full:
                    last_full = started
                timeout = max(0.0, last_full + self._interval() - loop.time()) if self._waiters else self.LINGER
                await wait_at_most(self._wake.wait(), timeout)
                self._wake.clear()
                await asyncio.sleep(self.GATHER)
        finally:
            if self._task is asyncio.current_task():
                self._stopping = True
                if self._beat_due is not None and self._conn is not None and not self._conn.closed:
                    # Else it expires by itself within its ttl.
                    with contextlib.suppress(Exception):
                        await wait_at_most(self.hook.aheartbeat_end(self._conn, self._waiter_id), 5.0)
                resources = self._detach(self._conn)
                if self._registry.get(loop, {}).get(self._key) is self:
                    del self._registry[loop][self._key]
                await self._close(resources)

    def _interval(self) -> float:
        interval = min((w.poll_interval for w in self._waiters.values()), default=self.LINGER)
        if self.session_less and self._waiters:
            return min(interval, SESSIONLESS_POLL_INTERVAL)  # ends come only by polling
        return interval

    async def _round(self, *, full: bool) -> None:
        conn = await self._connected()
        if self._listen_error is not None:
            error, self._listen_error = self._listen_error, None
            raise error
        wanted = {(w.uuid_parent, w.claim) for w in self._waiters.values() if w.claim is not None}
        batches = {w.uuid_parent for w in self._waiters.values()}
        due = batches if full else self._fresh & batches
        self._fresh.clear()
        async with self._query_lock:
            if self.session_less:
                await self._beat(conn, wanted)
            elif wanted != self._watching:
                gone, new = self._watching - wanted, wanted - self._watching
                if gone:
                    await self.hook.aunwatch(conn, [b for b, _ in gone], [c for _, c in gone])
                if new:
                    await self.hook.awatch(conn, [b for b, _ in new], [c for _, c in new])
                self._watching = wanted
            if not due:
                return
            states = await self.hook.apoll_many(conn, sorted(due))
            self.polls += 1
            # Summaries of the batches that ended, one round trip per summary size asked for.
            wanted_rows: dict[int, set[str]] = {}
            for waiter in self._waiters.values():
                state = states.get(waiter.uuid_parent)
                if (
                    waiter.uuid_parent in due
                    and state is not None
                    and state.is_final
                    and waiter.summary_rows is not None
                ):
                    wanted_rows.setdefault(waiter.summary_rows, set()).add(waiter.uuid_parent)
            summaries = {
                rows: await self.hook.asummaries(conn, sorted(uuids), rows=rows) for rows, uuids in wanted_rows.items()
            }
        for waiter in list(self._waiters.values()):
            if waiter.uuid_parent not in due or waiter.future.done():
                continue
            state = states.get(waiter.uuid_parent)
            if state is None:
                waiter.future.set_exception(
                    BatchNotFound(f"batch {waiter.uuid_parent} not found (or not visible to this connection's role)")
                )
            elif state.is_final:
                summary = None
                if waiter.summary_rows is not None:
                    summary = summaries[waiter.summary_rows].get(waiter.uuid_parent)
                waiter.future.set_result(BatchEnd(state, summary))
            else:
                waiter.state = state

    async def _beat(self, conn: psycopg.AsyncConnection[Any], wanted: set[tuple[str, str]]) -> None:
        """Keeps this watcher's heartbeat alive and its recorded watches equal to ``wanted``."""
        now = asyncio.get_running_loop().time()
        gone, new = self._beating - wanted, wanted - self._beating
        if not gone and not new and (self._beat_due is None or now < self._beat_due):
            return  # nothing changed, and nothing (or a live heartbeat) to keep alive
        ttl = heartbeat_ttl(self._interval())
        known = await self.hook.aheartbeat(conn, self._waiter_id, ttl, sorted(new), sorted(gone))
        if not known and wanted - new:
            # Its ttl ran out (an outage longer than it): what it watched was forgotten.
            await self.hook.aheartbeat(conn, self._waiter_id, ttl, sorted(wanted))
        self._beating = wanted
        self._beat_due = now + HEARTBEAT_EVERY

    def _outage(self, exc: BaseException, delay: float) -> float:
        """Fails the waiters whose reconnect timeout has run out; returns how long to back off."""
        now = asyncio.get_running_loop().time()
        for waiter in self._waiters.values():
            waiter.outage_since = waiter.outage_since if waiter.outage_since is not None else now
            waited = now - waiter.outage_since
            if waited >= waiter.reconnect_timeout and not waiter.future.done():
                waiter.future.set_exception(EngineUnreachable(waited, exc))
            else:
                delay = min(delay, waiter.outage_since + waiter.reconnect_timeout - now)
        return max(delay, 0.05)

    def _fail_all(self, exc: BaseException) -> None:
        for waiter in self._waiters.values():
            if not waiter.future.done():
                waiter.future.set_exception(exc)

    # -- connections ------------------------------------------------------------------------------

    async def _connected(self) -> psycopg.AsyncConnection[Any]:
        async with self._connect_lock:
            if self._conn is None or self._conn.closed:
                self._watching = set()  # the locks died with the old connection
                conn = await self.hook.aconnect(WATCHER_APPLICATION_NAME)
                self.session_less = self.hook.session_less
                if self.session_less:
                    # Nothing to listen with: a LISTEN would stay on a server connection nobody reads.
                    self._conn, self._listen, self._listen_error = conn, None, None
                    self._fresh.update(w.uuid_parent for w in self._waiters.values())
                    return conn
                try:
                    channel = await self.hook.achannel(conn)
                    listen = await self.hook.aconnect(f"{WATCHER_APPLICATION_NAME}:listen")
                except BaseException:
                    await conn.close()
                    raise
                try:
                    await listen.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                except BaseException:
                    await conn.close()
                    await listen.close()
                    raise
                self._conn, self._listen, self._listen_error = conn, listen, None
                self._listener = asyncio.get_running_loop().create_task(self._hear(listen))
                # Whatever ended while nobody listened is found by polling everything now.
                self._fresh.update(w.uuid_parent for w in self._waiters.values())
            return self._conn

    async def _hear(self, listen: psycopg.AsyncConnection[Any]) -> None:
        try:
            async for notify in listen.notifies():
                if notify.payload in self._batches:
                    self._fresh.add(notify.payload)
                    self._wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if listen is self._listen:
                self._listen_error = exc
                self._wake.set()

    def _detach(self, conn: psycopg.AsyncConnection[Any] | None) -> tuple[Any, ...]:
        """Forgets both connections if ``conn`` is still the current one (it may have been replaced).

        Synchronous, so nothing can start using them between the decision and the close.
        """
        if conn is None or conn is not self._conn:
            return ()
        resources = (self._listener, conn, self._listen)
        self._conn = self._listen = self._listener = None
        self._watching = set()
        return resources

    @staticmethod
    async def _close(resources: tuple[Any, ...]) -> None:
        if not resources:
            return
        listener, *conns = resources
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(BaseException):
                await listener
        for c in conns:
            if c is not None:
                with contextlib.suppress(Exception):
                    await c.close()
