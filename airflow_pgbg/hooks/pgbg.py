"""PgBackgroundHook: the engine's SQL API over an ordinary Airflow Postgres connection."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, closing
from copy import deepcopy
from datetime import timedelta
from typing import Any

from airflow.exceptions import AirflowNotFoundException
from airflow.providers.postgres.hooks.postgres import PostgresHook

from airflow_pgbg.hooks.install import install_engine
from airflow_pgbg.status import DEFAULT_SCHEMA, MONITOR_COLUMNS, BatchState

try:  # psycopg 3 also gives the trigger a non-blocking connection
    import psycopg
except ImportError:  # pragma: no cover - psycopg 3 is a dependency of this package
    psycopg = None  # type: ignore[assignment]


def _seconds(value: timedelta | float | None) -> float | None:
    if value is None:
        return None
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def trigger_application_name(uuid_parent: str, claim: str | None) -> str:
    """How a trigger's connection names itself, so a newer try can see it is still alive."""
    return f"pgbg-trigger:{uuid_parent}:{claim or ''}"


class PgBackgroundHook(PostgresHook):
    """Launch, watch and stop batches of SQL statements run by pg_background workers.

    Works on any Postgres connection whose role is a member of ``pgbg_user``; every call is one
    autocommit round trip, so the engine (not this process) holds all state.

    :param engine_schema: schema the engine is installed in.
    """

    hook_name = "PostgreSQL pg_background batches"

    def __init__(self, *args: Any, engine_schema: str = DEFAULT_SCHEMA, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.engine_schema = engine_schema

    # -- plumbing ---------------------------------------------------------------------------------

    def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with closing(self.get_conn()) as conn:
            conn.autocommit = True
            with closing(conn.cursor()) as cur:
                cur.execute(sql.replace("@schema@", self.engine_schema), tuple(params))
                if cur.description is None:
                    return []
                names = [d[0] for d in cur.description]
                return [dict(zip(names, row)) for row in cur.fetchall()]

    def _value(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self._fetch(sql, params)
        return next(iter(rows[0].values())) if rows else None

    def _conn_kwargs(self, connection: Any) -> dict[str, Any]:
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
        for name, value in conn.extra_dejson.items():
            if name not in self.ignored_extra_options:
                kwargs[name] = value
        return {k: v for k, v in kwargs.items() if v not in (None, "")}

    # -- engine API (blocking) --------------------------------------------------------------------

    def install(self) -> str:
        """Installs or upgrades the engine; needs a role allowed to create extensions and roles."""
        with closing(self.get_conn()) as conn:
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
    ) -> str:
        """Queues ``statements`` as one batch and returns its parent UUID at once."""
        return str(
            self._value(
                "SELECT @schema@.pg_background_launch_num(%s::text[], p_monitor => false, p_max_parallel => %s, "
                "p_label => %s, p_fail_fast => %s, p_statement_timeout => make_interval(secs => %s), "
                "p_origin => %s)",
                (list(statements), max_parallel, label, fail_fast, _seconds(statement_timeout), origin),
            )
        )

    def launch_text(self, sql: str, delimiter: str, **options: Any) -> str:
        """Like :meth:`launch` for delimited text, split by the engine (outside quotes and comments)."""
        return self.launch(self.split(sql, delimiter), **options)

    def split(self, sql: str, delimiter: str) -> list[str]:
        """The engine's own split of delimited text; raises on unterminated quotes or comments."""
        return list(self._value("SELECT @schema@.split_statements(%s, %s)", (sql, delimiter)))

    def poll(self, uuid_parent: str, wait: float | None = None) -> BatchState | None:
        """Status and counts of a batch, after the engine's housekeeping; None if unknown.

        With ``wait`` (seconds), the database first waits up to that long for the batch to end.
        """
        rows = self._fetch(
            "SELECT * FROM @schema@.pg_background_poll(%s::uuid, make_interval(secs => %s))", (uuid_parent, wait)
        )
        return BatchState.from_row(rows[0]) if rows else None

    def monitor(self, uuid_parent: str | None = None, *, verbose: bool = True) -> list[dict[str, Any]]:
        """One dict per child (see ``MONITOR_COLUMNS``)."""
        return self._fetch("SELECT * FROM @schema@.pg_background_monitor(%s::uuid, %s)", (uuid_parent, verbose))

    def children(
        self, uuid_parent: str, *, statuses: Sequence[str] | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Rows of ``log_background`` for a batch in submission order, optionally filtered."""
        return self._fetch(
            "SELECT * FROM @schema@.log_background WHERE uuid_parent = %s::uuid "
            "AND (%s::text[] IS NULL OR status::text = ANY(%s::text[])) ORDER BY seq LIMIT %s",
            (uuid_parent, statuses and list(statuses), statuses and list(statuses), limit),
        )

    def stop(self, uuid_parent_or_child: str, *, if_claimed_by: str | None = None) -> int:
        """Stops a batch or one child; returns how many children it stopped.

        With ``if_claimed_by``, only while the batch is still claimed by it (see :meth:`claim`).
        """
        if if_claimed_by is None:
            return int(self._value("SELECT @schema@.pg_background_stop(%s::uuid)", (uuid_parent_or_child,)))
        return int(
            self._value("SELECT @schema@.pg_background_stop(%s::uuid, %s)", (uuid_parent_or_child, if_claimed_by))
        )

    def claim(self, uuid_parent: str, claimed_by: str) -> None:
        """Records ``claimed_by`` (e.g. the Airflow try) as the batch's current owner."""
        self._fetch("SELECT @schema@.pg_background_claim(%s::uuid, %s)", (uuid_parent, claimed_by))

    def retry(self, uuid_parent: str) -> int:
        """Queues the failed, lost and stopped children again; returns how many."""
        return int(self._value("SELECT @schema@.pg_background_retry(%s::uuid)", (uuid_parent,)))

    def wait(self, uuid_parent: str, timeout: timedelta | float | None = None) -> str | None:
        """Blocks in the database until the batch ends; its status, or None on timeout."""
        return self._value(
            "SELECT @schema@.pg_background_wait(%s::uuid, make_interval(secs => %s))",
            (uuid_parent, _seconds(timeout)),
        )

    def watchers(self, uuid_parent: str) -> list[str]:
        """Claims of the triggers currently polling the batch (see :func:`trigger_application_name`)."""
        rows = self._fetch(
            "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE %s",
            (trigger_application_name(uuid_parent, "%"),),
        )
        return [r["application_name"].rsplit(":", 1)[1] for r in rows]

    def find_batch(self, origin: str, statements: Sequence[str]) -> BatchState | None:
        """The latest batch recorded for ``origin`` if it holds exactly ``statements``, else None."""
        rows = self._fetch(
            "SELECT v.* FROM @schema@.batches v WHERE v.origin = %s "
            "AND (SELECT array_agg(query ORDER BY seq) FROM @schema@.log_background c "
            "     WHERE c.uuid_parent = v.uuid_parent) = @schema@._validate_batch(%s::text[], NULL, NULL) "
            "ORDER BY v.created_at DESC LIMIT 1",
            (origin, list(statements)),
        )
        return BatchState.from_row(rows[0]) if rows else None

    # -- engine API (asyncio, for the triggerer) ----------------------------------------------------

    @asynccontextmanager
    async def async_connection(self, application_name: str | None = None) -> AsyncIterator[Any]:
        """A psycopg 3 AsyncConnection in autocommit, so polls never block the event loop."""
        if psycopg is None:  # pragma: no cover
            raise RuntimeError("the trigger needs psycopg 3 (pip install 'psycopg[binary]')")
        # The async lookup: a blocking one would stall every trigger sharing the event loop.
        conn_id = getattr(self, self.conn_name_attr)
        try:
            connection = await self.aget_connection(conn_id)
        except (AttributeError, AirflowNotFoundException):
            # Airflow before aget_connection, or dag.test()'s in-process triggerer, which resolves
            # only some secrets backends asynchronously: look up in a thread instead.
            from asgiref.sync import sync_to_async

            connection = await sync_to_async(self.get_connection)(conn_id)
        kwargs = self._conn_kwargs(connection)
        if application_name:
            kwargs["application_name"] = application_name
        conn = await psycopg.AsyncConnection.connect(autocommit=True, **kwargs)
        try:
            yield conn
        finally:
            await conn.close()

    async def apoll(self, conn: Any, uuid_parent: str, wait: float | None = None) -> BatchState | None:
        """:meth:`poll` on an async connection from :meth:`async_connection`."""
        cur = await conn.execute(
            f"SELECT * FROM {self.engine_schema}.pg_background_poll(%s::uuid, make_interval(secs => %s))",
            (uuid_parent, wait),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        return BatchState.from_row(dict(zip([d.name for d in cur.description], row)))

    async def astop(self, uuid_parent_or_child: str, *, if_claimed_by: str | None = None) -> int:
        """:meth:`stop` on a connection of its own."""
        async with self.async_connection() as conn:
            cur = await conn.execute(
                f"SELECT {self.engine_schema}.pg_background_stop(%s::uuid, %s)"
                if if_claimed_by is not None
                else f"SELECT {self.engine_schema}.pg_background_stop(%s::uuid)",
                (uuid_parent_or_child, if_claimed_by) if if_claimed_by is not None else (uuid_parent_or_child,),
            )
            return int((await cur.fetchone())[0])


__all__ = ["MONITOR_COLUMNS", "PgBackgroundHook"]
