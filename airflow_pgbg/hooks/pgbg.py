"""PgBackgroundHook: the engine's SQL API over an ordinary Airflow Postgres connection."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import psycopg
from airflow.exceptions import AirflowNotFoundException
from airflow.providers.postgres.hooks.postgres import PostgresHook
from psycopg import sql
from psycopg.rows import dict_row

from airflow_pgbg import ENGINE_VERSION
from airflow_pgbg.hooks.install import install_engine, validate_schema, version_key
from airflow_pgbg.hooks.outage import Backoff, EngineUnreachable, is_outage
from airflow_pgbg.hooks.pooler import HEARTBEAT_EVERY, POOL_MODE_EXTRA, declared_pool_mode, heartbeat_ttl, session_less
from airflow_pgbg.options import BatchOptions, SettingValue
from airflow_pgbg.status import DEFAULT_SCHEMA, MONITOR_COLUMNS, BatchState

T = TypeVar("T")
Params = Sequence[Any] | Mapping[str, Any]


def seconds(value: timedelta | float | None) -> float | None:
    """A duration given as a timedelta or a number of seconds, in seconds."""
    if value is None:
        return None
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class EngineTooOld(RuntimeError):
    """The engine installed in the database predates what this package needs."""


@dataclass(frozen=True)
class Submission:
    """What :meth:`PgBackgroundHook.submit` did (see ``pg_background_submit`` in the engine)."""

    uuid_parent: str
    action: str
    """launched, attached, reconnected, resumed, finished (an earlier try's success nobody took: nothing
    runs, the batch's outcome is this try's), or waiting (another claim's waiter still watches)."""
    claimed_at: datetime | None
    previous_holder: str | None


class EngineSql:
    """The engine's statements, composed once for a schema (an identifier, never pasted text)."""

    def __init__(self, schema: str) -> None:
        self.schema = validate_schema(schema)
        s = sql.Identifier(self.schema)

        def q(text: str) -> sql.Composed:
            return sql.SQL(text).format(s=s)

        # The server's pid too: a pooler answers the client with a backend pid of its own (see pooler.py).
        self.version = q("SELECT (SELECT version FROM {s}.meta), pg_backend_pid()")
        # Named placeholders: the options' own (BatchOptions.sql_arguments()) and these.
        self.launch = sql.SQL(
            "SELECT {s}.pg_background_launch_num(%(statements)s::text[], p_monitor => false, p_origin => %(origin)s, "
            "{options})"
        ).format(s=s, options=BatchOptions.sql_arguments())
        self.submit = sql.SQL(
            "SELECT * FROM {s}.pg_background_submit(%(statements)s::text[], %(origin)s, %(claimed_by)s, "
            "p_requeue_on_takeover => %(requeue_on_takeover)s, p_takeover => %(takeover)s, {options})"
        ).format(s=s, options=BatchOptions.sql_arguments())
        self.split = q("SELECT {s}.split_statements(%s, %s)")
        self.poll = q("SELECT * FROM {s}.pg_background_poll(%s::uuid, make_interval(secs => %s))")
        self.poll_many = q("SELECT * FROM {s}.pg_background_poll_many(%s::uuid[])")
        self.monitor = q("SELECT * FROM {s}.pg_background_monitor(%s::uuid, %s)")
        self.children = q(
            "SELECT * FROM {s}.log_background WHERE uuid_parent = %s::uuid "
            "AND (%s::text[] IS NULL OR status::text = ANY(%s::text[])) ORDER BY seq LIMIT %s"
        )
        self.children_page = q(
            "SELECT * FROM {s}.pg_background_children_page(%s::uuid, %s::text[], %s, %s, %s, %s, %s, %s)"
        )
        self.children_after = q(
            "SELECT seq, uuid_child, pid, status::text AS status, attempt, query, result->>'command' AS command, "
            "result->>'rows' AS rows, sqlstate, error, start_time_exec, end_time_exec FROM {s}.log_background "
            "WHERE uuid_parent = %s::uuid AND seq > %s ORDER BY seq LIMIT %s"
        )
        self.child = q("SELECT * FROM {s}.pg_background_child(%s::uuid)")
        self.figures = q("SELECT {s}.pg_background_figures(%s::uuid, %s)")
        self.notes = q("SELECT notes FROM {s}.batch WHERE uuid_parent = %s::uuid")
        self.origin = q("SELECT origin FROM {s}.batch WHERE uuid_parent = %s::uuid")
        self.progress = q("SELECT * FROM {s}.pg_background_progress(%s::uuid)")
        # Bounded for a lineage event; the partial index on these statuses keeps it cheap at 100,000 children.
        self.problem_sqlstates = q(
            "SELECT coalesce(sqlstate, status::text) AS sqlstate, count(*)::int AS n FROM {s}.log_background "
            "WHERE uuid_parent = %s::uuid AND status IN ('failed', 'lost', 'stopped') "
            "GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 20"
        )
        self.stop = q("SELECT {s}.pg_background_stop(%s::uuid)")
        self.stop_claimed = q("SELECT {s}.pg_background_stop(%s::uuid, %s, %s)")
        self.stop_origin = q(
            "SELECT coalesce(sum({s}.pg_background_stop(uuid_parent, %s, %s)), 0)::int "
            "FROM {s}.batch WHERE origin = %s AND claimed_by = %s"
        )
        self.claim = q("SELECT {s}.pg_background_claim(%s::uuid, %s)")
        self.claimed = q(
            "SELECT uuid_parent FROM {s}.batch WHERE origin = %s AND claimed_by = %s ORDER BY created_at DESC LIMIT 1"
        )
        self.retry = q("SELECT {s}.pg_background_retry(%s::uuid, %s)")
        self.wait = q("CALL {s}.pg_background_await(%s::uuid, make_interval(secs => %s), NULL)")
        self.summary = q("SELECT {s}.pg_background_summary(%s::uuid, %s, %s)")
        self.take_outcome = q("SELECT {s}.pg_background_take_outcome(%s::uuid, %s, %s, %s)")
        self.summaries = q("SELECT * FROM {s}.pg_background_summaries(%s::uuid[], %s, %s)")
        self.watch = q("SELECT {s}.pg_background_watch(%s::uuid[], %s::text[])")
        self.unwatch = q("SELECT {s}.pg_background_unwatch(%s::uuid[], %s::text[])")
        self.watched = q("SELECT {s}.pg_background_watched(%s::uuid, %s)")
        self.channel = q("SELECT {s}.batch_end_channel()")
        self.heartbeat = q(
            "SELECT {s}.pg_background_heartbeat(%s::uuid, make_interval(secs => %s), %s::uuid[], %s::text[], "
            "%s::uuid[], %s::text[])"
        )
        self.heartbeat_end = q("SELECT {s}.pg_background_heartbeat_end(%s::uuid)")
        # The latest batch of an origin (or the given one), who holds it, and whether another waiter of
        # the claim waits for it.
        self.holders = q(
            "SELECT uuid_parent, claimed_by, {s}.pg_background_watched_by(uuid_parent, %s, %s::uuid) AS watched "
            "FROM {s}.batch WHERE uuid_parent = %s::uuid OR (%s::uuid IS NULL AND origin = %s) "
            "ORDER BY created_at DESC LIMIT 1"
        )


class PgBackgroundHook(PostgresHook):
    """Launch, watch and stop batches of SQL statements run by pg_background workers.

    Works on any Postgres connection whose role is a member of ``pgbg_user``. The engine holds all
    state; this hook keeps at most one open connection (psycopg 3, autocommit), reopened after an
    outage. The triggerer uses the ``a*`` methods on an async connection of its own.

    :param engine_schema: schema the engine is installed in.
    """

    hook_name = "PostgreSQL pg_background batches"

    def __init__(self, *args: Any, engine_schema: str = DEFAULT_SCHEMA, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.engine_schema = engine_schema
        self.q = EngineSql(engine_schema)
        self._pg: psycopg.Connection[Any] | None = None
        self._watches: set[tuple[str, str]] = set()
        self.session_less = False
        """The last connection made has no server session of its own (a pooler in transaction mode, or one
        that may be): no LISTEN, no session advisory locks, no server-side prepared statements."""
        self._declared_pool_mode: str | None = None
        self._waiter_id = str(uuid.uuid4())
        self._beat_at: float | None = None  # when the heartbeat is due again (None: never sent)

    # -- connections ------------------------------------------------------------------------------

    def conn_kwargs(self, connection: Any) -> dict[str, Any]:
        """libpq parameters of an Airflow connection, as PostgresHook.get_conn() would use them."""
        conn = deepcopy(connection)
        if conn.extra_dejson.get("iam", False):
            conn.login, conn.password, conn.port = self.get_iam_token(conn)
        kwargs: dict[str, Any] = {
            "host": conn.host,
            "user": conn.login,
            "password": conn.password,
            "dbname": self.database or conn.schema,
            "port": conn.port,
        }
        if self.options:
            kwargs["options"] = self.options
        self._declared_pool_mode = declared_pool_mode(conn.extra_dejson)
        for name, value in conn.extra_dejson.items():
            if name not in self.ignored_extra_options and name != POOL_MODE_EXTRA:
                kwargs[name] = value
        return {k: v for k, v in kwargs.items() if v not in (None, "")}

    def _engine_conn(self) -> psycopg.Connection[Any]:
        if self._pg is None or self._pg.closed:
            params = self.conn_kwargs(self.get_connection(getattr(self, self.conn_name_attr)))
            conn = psycopg.connect(autocommit=True, **params)
            try:
                self._note_session(conn, conn.execute(self.q.version).fetchone())
                if self._watches and not self.session_less:  # the watch locks died with the previous connection
                    conn.execute(self.q.watch, ([b for b, _ in self._watches], [c for _, c in self._watches]))
            except BaseException:
                conn.close()
                raise
            self._pg = conn
        return self._pg

    def _note_session(self, conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], row: Any) -> None:
        """Checks the engine's version and whether ``conn`` has a server session of its own."""
        self._check_engine(row)
        self.session_less = session_less(self._declared_pool_mode, conn.info.backend_pid, row[1])
        if self.session_less:
            # A statement prepared on one server connection is unknown on the next (PgBouncer before
            # 1.21, or max_prepared_statements = 0); the engine's calls gain nothing from it.
            conn.prepare_threshold = None

    def _check_engine(self, row: Any) -> None:
        installed = row[0] if row else None
        if installed is None or version_key(installed) < version_key(ENGINE_VERSION):
            raise EngineTooOld(
                f"engine {installed or '(none)'} in schema {self.engine_schema} is older than {ENGINE_VERSION}, "
                "which this version of airflow-provider-pgbg needs: run python -m airflow_pgbg install --dsn ..."
            )

    def close(self) -> None:
        """Closes the hook's connection (it reopens on the next call) and ends its watches."""
        if self._beat_at is not None and self._pg is not None and not self._pg.closed:
            with suppress(Exception):  # else it expires by itself within its ttl
                self._pg.execute(self.q.heartbeat_end, (self._waiter_id,))
        self._beat_at = None
        self._watches.clear()
        self._drop()

    def _drop(self) -> None:
        if self._pg is not None:
            self._pg.close()
            self._pg = None

    @contextmanager
    def _cursor(self) -> Iterator[psycopg.Cursor[dict[str, Any]]]:
        conn = self._engine_conn()
        try:
            with conn.cursor(row_factory=dict_row) as cur:
                yield cur
        except BaseException as exc:
            if is_outage(exc) or conn.closed:
                self._drop()  # a broken connection is not reused
            raise

    def _rows(self, query: sql.Composed, params: Params = ()) -> list[dict[str, Any]]:
        with self._cursor() as cur:
            cur.execute(query, _bound(params))
            return cur.fetchall() if cur.description is not None else []

    def _value(self, query: sql.Composed, params: Params = ()) -> Any:
        rows = self._rows(query, params)
        return next(iter(rows[0].values())) if rows else None

    def through_outages(
        self,
        call: Callable[[], T],
        reconnect_timeout: float,
        *,
        on_outage: Callable[[BaseException], None] | None = None,
    ) -> T:
        """``call()``, repeated with backoff while the database is unreachable, for up to ``reconnect_timeout``."""
        backoff = Backoff()
        since: float | None = None
        while True:
            try:
                return call()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                now = time.monotonic()
                since = since if since is not None else now
                if now - since >= reconnect_timeout:
                    raise EngineUnreachable(now - since, exc) from exc
                if on_outage is not None:
                    on_outage(exc)
                time.sleep(min(backoff.next_delay(), max(0.0, since + reconnect_timeout - now)))

    # -- engine API (blocking) --------------------------------------------------------------------

    def install(self) -> str:
        """Installs or upgrades the engine; needs a role allowed to create extensions and roles."""
        params = self.conn_kwargs(self.get_connection(getattr(self, self.conn_name_attr)))
        with psycopg.connect(**params) as conn:
            return install_engine(conn, self.engine_schema)

    def launch(
        self,
        statements: Sequence[str],
        *,
        max_parallel: int | None = None,
        label: str | None = None,
        fail_fast: bool = False,
        statement_timeout: timedelta | float | None = None,
        origin: str | None = None,
        retries: int = 0,
        retry_delay: timedelta | float = 1.0,
        retry_backoff: float = 2.0,
        retry_lost: bool = False,
        settings: Mapping[str, SettingValue] | None = None,
    ) -> str:
        """Queues ``statements`` as one batch and returns its parent UUID at once (see
        :class:`~airflow_pgbg.options.BatchOptions` for the options)."""
        options = BatchOptions(
            max_parallel=max_parallel,
            label=label,
            fail_fast=fail_fast,
            statement_timeout=seconds(statement_timeout),
            retries=retries,
            retry_delay=seconds(retry_delay) or 0.0,
            retry_backoff=retry_backoff,
            retry_lost=retry_lost,
            settings=settings,
        )
        return str(
            self._value(self.q.launch, {"statements": list(statements), "origin": origin, **options.sql_params()})
        )

    def submit(
        self,
        statements: Sequence[str],
        *,
        origin: str,
        claimed_by: str,
        options: BatchOptions,
        requeue_on_takeover: bool = False,
        takeover: bool = False,
    ) -> Submission:
        """Launches the batch of ``origin``, or resumes or attaches to it (``pg_background_submit``)."""
        rows = self._rows(
            self.q.submit, _submit_params(statements, origin, claimed_by, options, requeue_on_takeover, takeover)
        )
        return _submission(rows[0])

    def split(self, text: str, delimiter: str) -> list[str]:
        """The engine's own split of delimited text; raises on unterminated quotes or comments."""
        return list(self._value(self.q.split, (text, delimiter)))

    def poll(self, uuid_parent: str, wait: float | None = None) -> BatchState | None:
        """Status and counts of a batch, after the engine's housekeeping; None if unknown.

        With ``wait`` (seconds), waits up to that long for the batch to end: in the database, or here for a
        batch the database does not wait for (a waiting statement would hold back its CONCURRENTLY
        statements; it returns at once then).
        """
        started = time.monotonic()
        rows = self._rows(self.q.poll, (uuid_parent, wait))
        state = BatchState.from_row(rows[0]) if rows else None
        left = (wait or 0.0) - (time.monotonic() - started)
        if state is not None and not state.is_final and left > 0:
            time.sleep(left)
        return state

    def poll_many(self, uuid_parents: Sequence[str]) -> dict[str, BatchState]:
        """States of several batches in one round trip; unknown ones are missing."""
        return {
            str(r["uuid_parent"]): BatchState.from_row(r) for r in self._rows(self.q.poll_many, (list(uuid_parents),))
        }

    def monitor(self, uuid_parent: str | None = None, *, verbose: bool = True) -> list[dict[str, Any]]:
        """One dict per child (see ``MONITOR_COLUMNS``)."""
        return self._rows(self.q.monitor, (uuid_parent, verbose))

    def children(
        self, uuid_parent: str, *, statuses: Sequence[str] | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Rows of ``log_background`` for a batch in submission order, optionally filtered."""
        wanted = list(statuses) if statuses else None
        return self._rows(self.q.children, (uuid_parent, wanted, wanted, limit))

    def children_page(
        self,
        uuid_parent: str,
        *,
        statuses: Sequence[str] | None = None,
        text: str | None = None,
        sqlstate: str | None = None,
        sort: str = "seq",
        descending: bool = False,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[int, list[dict[str, Any]]]:
        """One page of a batch's children, cut, filtered and sorted by the engine (without result previews),
        and how many children pass the filters."""
        args = [uuid_parent, list(statuses) if statuses else None, text or None, sqlstate or None, sort, descending]
        rows = self._rows(self.q.children_page, (*args, limit, offset))
        if rows:
            return int(rows[0]["matching"]), rows
        if offset == 0:
            return 0, []
        first = self._rows(self.q.children_page, (*args, 1, 0))  # past the end: still say how many match
        return (int(first[0]["matching"]) if first else 0), []

    def iter_children(self, uuid_parent: str, chunk: int = 2000) -> Iterator[dict[str, Any]]:
        """Every child of a batch in order, ``chunk`` rows per short statement (no long transaction)."""
        last = -(2**31)
        while True:
            rows = self._rows(self.q.children_after, (uuid_parent, last, chunk))
            yield from rows
            if len(rows) < chunk:
                return
            last = rows[-1]["seq"]

    def child(self, uuid_child: str) -> dict[str, Any] | None:
        """Everything about one child (result preview, every failed attempt), or None."""
        rows = self._rows(self.q.child, (uuid_child,))
        return rows[0] if rows else None

    def figures(self, uuid_parent: str, bins: int = 60) -> dict[str, Any]:
        """Timeline bins and duration figures of a batch (see the engine's pg_background_figures)."""
        return dict(self._value(self.q.figures, (uuid_parent, bins)) or {})

    def progress(self, uuid_parent: str) -> dict[str, dict[str, Any]]:
        """Phase and percent of the running children PostgreSQL reports progress for, by child UUID."""
        return {
            str(r["uuid_child"]): {"command": r["command"], "phase": r["phase"], "percent": r["percent"]}
            for r in self._rows(self.q.progress, (uuid_parent,))
        }

    def batch_notes(self, uuid_parent: str) -> str | None:
        """What the engine noted for the submitter (e.g. a cap it lowered)."""
        return self._value(self.q.notes, (uuid_parent,))

    def recorded_origin(self, uuid_parent: str) -> str | None:
        """The task instance that launched the batch (``origin``); None for a batch this role cannot see."""
        return self._value(self.q.origin, (uuid_parent,))

    def stop(
        self, uuid_parent_or_child: str, *, if_claimed_by: str | None = None, stopped_by: str | None = None
    ) -> int:
        """Stops a batch or one child; returns how many children it stopped.

        With ``if_claimed_by``, only while the batch is still claimed by it (see :meth:`claim`);
        ``stopped_by`` records who asked.
        """
        if if_claimed_by is None and stopped_by is None:
            return int(self._value(self.q.stop, (uuid_parent_or_child,)))
        return int(self._value(self.q.stop_claimed, (uuid_parent_or_child, if_claimed_by, stopped_by)))

    def stop_claimed(self, origin: str, claimed_by: str, *, stopped_by: str | None = None) -> int:
        """Stops whatever batch of ``origin`` is still claimed by ``claimed_by``."""
        return int(self._value(self.q.stop_origin, (claimed_by, stopped_by, origin, claimed_by)))

    def claimed_batch(self, origin: str, claimed_by: str) -> str | None:
        """The latest batch of ``origin`` that ``claimed_by`` holds, if any."""
        value = self._value(self.q.claimed, (origin, claimed_by))
        return None if value is None else str(value)

    def claim(self, uuid_parent: str, claimed_by: str) -> None:
        """Records ``claimed_by`` (e.g. the Airflow try) as the batch's current owner."""
        self._rows(self.q.claim, (uuid_parent, claimed_by))

    def retry(self, uuid_parent: str, *, requested_by: str | None = None) -> int:
        """Queues the failed, lost and stopped children again; returns how many."""
        return int(self._value(self.q.retry, (uuid_parent, requested_by)))

    def wait(self, uuid_parent: str, timeout: timedelta | float | None = None) -> str | None:
        """Blocks in the database until the batch ends; its status, or None on timeout. Commits between its
        checks (``pg_background_await``), so it never holds back the batch's CONCURRENTLY statements."""
        return self._value(self.q.wait, (uuid_parent, seconds(timeout)))

    def outcome(self, uuid_parent: str) -> dict[str, Any] | None:
        """Counts per status and the 20 most frequent SQLSTATEs of failed, lost and stopped children (a child
        without one under its status), for lineage; None if the batch is gone."""
        state = self.poll(uuid_parent)
        if state is None:
            return None
        problems = {r["sqlstate"]: r["n"] for r in self._rows(self.q.problem_sqlstates, (uuid_parent,))}
        return {"uuid_parent": uuid_parent, "counts": state.counts_json(), "failed_sqlstates": problems}

    def summary(self, uuid_parent: str, *, rows: int = 20, problems: int = 5) -> dict[str, Any] | None:
        """The batch's outcome as JSON (``pg_background_summary``): counts, first rows, first problems."""
        return self._value(self.q.summary, (uuid_parent, rows, problems))

    def take_outcome(self, uuid_parent: str, claimed_by: str, *, rows: int = 20) -> dict[str, Any] | None:
        """:meth:`summary` of an ended batch, recording in the engine that ``claimed_by`` took its outcome
        (what ends a task's wait): a later try then runs a succeeded batch anew instead of taking it."""
        return self._value(self.q.take_outcome, (uuid_parent, claimed_by, rows, 5))

    def watch(self, uuid_parent: str, claimed_by: str, *, every: float = HEARTBEAT_EVERY) -> None:
        """Shows, until :meth:`close`, that ``claimed_by`` waits for the batch: a watch lock held by the
        hook's connection (taken again after a reconnect), or, without a session of its own (behind a
        pooler), a heartbeat. Call it at least every ``every`` seconds: a heartbeat lasts three times that."""
        pair = (uuid_parent, claimed_by)
        with self._cursor() as cur:  # connects first: whether there is a session decides how
            if not self.session_less:
                if pair not in self._watches:
                    cur.execute(self.q.watch, ([uuid_parent], [claimed_by]))
                self._watches.add(pair)
                return
            new = pair not in self._watches
            self._watches.add(pair)
            now = time.monotonic()
            if not new and self._beat_at is not None and now < self._beat_at:
                return
            ttl = heartbeat_ttl(every)
            watched = sorted(self._watches) if new or self._beat_at is None else []
            cur.execute(self.q.heartbeat, (self._waiter_id, ttl, *_pairs(watched), [], []))
            row = cur.fetchone()
            if not (row and next(iter(row.values()))) and not watched:
                # Its ttl ran out (an outage longer than it): name everything again.
                cur.execute(self.q.heartbeat, (self._waiter_id, ttl, *_pairs(sorted(self._watches)), [], []))
            self._beat_at = now + HEARTBEAT_EVERY

    def watched_by_others(self, uuid_parent: str, claimed_by: str | None) -> bool:
        """Whether a live session waits for the batch on behalf of another claim."""
        return bool(self._value(self.q.watched, (uuid_parent, claimed_by)))

    # -- engine API (asyncio, for the triggerer) ----------------------------------------------------

    async def aconn_kwargs(self) -> dict[str, Any]:
        """:meth:`conn_kwargs` of the hook's connection, looked up without blocking the event loop."""
        conn_id = getattr(self, self.conn_name_attr)
        try:
            connection = await self.aget_connection(conn_id)
        except (AttributeError, AirflowNotFoundException):
            # Airflow before aget_connection, or dag.test()'s in-process triggerer, which resolves
            # only some secrets backends asynchronously: look up in a thread instead.
            from asgiref.sync import sync_to_async

            connection = await sync_to_async(self.get_connection)(conn_id)
        return self.conn_kwargs(connection)

    @asynccontextmanager
    async def async_connection(
        self, application_name: str | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A psycopg 3 AsyncConnection in autocommit, so calls never block the event loop."""
        conn = await self.aconnect(application_name)
        try:
            yield conn
        finally:
            await conn.close()

    async def aconnect(self, application_name: str | None = None) -> psycopg.AsyncConnection[Any]:
        """A new async connection; the caller closes it. Checks the engine's version."""
        kwargs = await self.aconn_kwargs()
        if application_name:
            kwargs["application_name"] = application_name
        conn = await psycopg.AsyncConnection.connect(autocommit=True, **kwargs)
        try:
            cur = await conn.execute(self.q.version)
            self._note_session(conn, await cur.fetchone())
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _arows(
        self, conn: psycopg.AsyncConnection[Any], query: sql.Composed, params: Params = ()
    ) -> list[dict[str, Any]]:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, _bound(params))
            return await cur.fetchall() if cur.description is not None else []

    async def _avalue(self, conn: psycopg.AsyncConnection[Any], query: sql.Composed, params: Params = ()) -> Any:
        rows = await self._arows(conn, query, params)
        return next(iter(rows[0].values())) if rows else None

    async def asubmit(
        self,
        conn: psycopg.AsyncConnection[Any],
        statements: Sequence[str],
        *,
        origin: str,
        claimed_by: str,
        options: BatchOptions,
        requeue_on_takeover: bool = False,
        takeover: bool = False,
    ) -> Submission:
        """:meth:`submit` on an async connection."""
        rows = await self._arows(
            conn, self.q.submit, _submit_params(statements, origin, claimed_by, options, requeue_on_takeover, takeover)
        )
        return _submission(rows[0])

    async def asplit(self, conn: psycopg.AsyncConnection[Any], text: str, delimiter: str) -> list[str]:
        """:meth:`split` on an async connection."""
        return list(await self._avalue(conn, self.q.split, (text, delimiter)))

    async def apoll_many(
        self, conn: psycopg.AsyncConnection[Any], uuid_parents: Sequence[str]
    ) -> dict[str, BatchState]:
        """:meth:`poll_many` on an async connection."""
        rows = await self._arows(conn, self.q.poll_many, (list(uuid_parents),))
        return {str(r["uuid_parent"]): BatchState.from_row(r) for r in rows}

    async def asummary(
        self, conn: psycopg.AsyncConnection[Any], uuid_parent: str, *, rows: int = 20, problems: int = 5
    ) -> dict[str, Any] | None:
        """:meth:`summary` on an async connection."""
        return await self._avalue(conn, self.q.summary, (uuid_parent, rows, problems))

    async def atake_outcome(
        self, conn: psycopg.AsyncConnection[Any], uuid_parent: str, claimed_by: str, *, rows: int = 20
    ) -> dict[str, Any] | None:
        """:meth:`take_outcome` on an async connection."""
        return await self._avalue(conn, self.q.take_outcome, (uuid_parent, claimed_by, rows, 5))

    async def asummaries(
        self, conn: psycopg.AsyncConnection[Any], uuid_parents: Sequence[str], *, rows: int = 20, problems: int = 5
    ) -> dict[str, dict[str, Any]]:
        """:meth:`summary` of several batches in one round trip; unknown ones are missing."""
        found = await self._arows(conn, self.q.summaries, (list(uuid_parents), rows, problems))
        return {str(r["uuid_parent"]): r["summary"] for r in found}

    async def astop(
        self,
        conn: psycopg.AsyncConnection[Any],
        uuid_parent_or_child: str,
        *,
        if_claimed_by: str | None = None,
        stopped_by: str | None = None,
    ) -> int:
        """:meth:`stop` on an async connection."""
        if if_claimed_by is None and stopped_by is None:
            return int(await self._avalue(conn, self.q.stop, (uuid_parent_or_child,)))
        return int(await self._avalue(conn, self.q.stop_claimed, (uuid_parent_or_child, if_claimed_by, stopped_by)))

    async def astop_claimed(
        self, conn: psycopg.AsyncConnection[Any], origin: str, claimed_by: str, *, stopped_by: str | None = None
    ) -> int:
        """:meth:`stop_claimed` on an async connection."""
        return int(await self._avalue(conn, self.q.stop_origin, (claimed_by, stopped_by, origin, claimed_by)))

    async def awatch(
        self, conn: psycopg.AsyncConnection[Any], uuid_parents: Sequence[str], claims: Sequence[str]
    ) -> None:
        """:meth:`watch` for several (batch, claim) pairs on an async connection."""
        await self._arows(conn, self.q.watch, (list(uuid_parents), list(claims)))

    async def aunwatch(
        self, conn: psycopg.AsyncConnection[Any], uuid_parents: Sequence[str], claims: Sequence[str]
    ) -> None:
        """Ends :meth:`awatch` for these pairs."""
        await self._arows(conn, self.q.unwatch, (list(uuid_parents), list(claims)))

    async def aheartbeat(
        self,
        conn: psycopg.AsyncConnection[Any],
        waiter_id: str,
        ttl: float,
        watch: Sequence[tuple[str, str]] = (),
        unwatch: Sequence[tuple[str, str]] = (),
    ) -> bool:
        """``waiter_id`` is alive for ``ttl`` seconds and waits for the (batch, claim) pairs of ``watch``, no
        longer for those of ``unwatch`` (``pg_background_heartbeat``); False when it was not alive before."""
        return bool(await self._avalue(conn, self.q.heartbeat, (waiter_id, ttl, *_pairs(watch), *_pairs(unwatch))))

    async def aheartbeat_end(self, conn: psycopg.AsyncConnection[Any], waiter_id: str) -> None:
        """``waiter_id`` waits for nothing any more."""
        await self._arows(conn, self.q.heartbeat_end, (waiter_id,))

    async def aholders(
        self,
        conn: psycopg.AsyncConnection[Any],
        *,
        claim: str,
        uuid_parent: str | None = None,
        origin: str | None = None,
        except_waiter: str | None = None,
    ) -> tuple[str | None, bool]:
        """Who holds the batch (given, else the latest of ``origin``) and whether a waiter other than this
        session and ``except_waiter`` waits for it on behalf of ``claim`` (None, False: no such batch)."""
        rows = await self._arows(conn, self.q.holders, (claim, except_waiter, uuid_parent, uuid_parent, origin))
        return (rows[0]["claimed_by"], bool(rows[0]["watched"])) if rows else (None, False)

    async def achannel(self, conn: psycopg.AsyncConnection[Any]) -> str:
        """The channel on which the engine announces the end of a batch."""
        return str(await self._avalue(conn, self.q.channel))


def _pairs(pairs: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    return [b for b, _ in pairs], [c for _, c in pairs]


def _bound(params: Params) -> tuple[Any, ...] | Mapping[str, Any]:
    return params if isinstance(params, Mapping) else tuple(params)


def _submit_params(
    statements: Sequence[str],
    origin: str,
    claimed_by: str,
    options: BatchOptions,
    requeue_on_takeover: bool,
    takeover: bool,
) -> dict[str, Any]:
    return {
        "statements": list(statements),
        "origin": origin,
        "claimed_by": claimed_by,
        "requeue_on_takeover": requeue_on_takeover,
        "takeover": takeover,
        **options.sql_params(),
    }


def _submission(row: dict[str, Any]) -> Submission:
    return Submission(str(row["uuid_parent"]), row["action"], row["claimed_at"], row["previous_holder"])


__all__ = ["MONITOR_COLUMNS", "BatchOptions", "EngineTooOld", "PgBackgroundHook", "Submission", "seconds"]
