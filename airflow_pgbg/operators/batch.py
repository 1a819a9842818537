"""PgBackgroundBatchOperator: run a batch of SQL statements in PostgreSQL as pg_background workers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.configuration import conf
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowTaskTimeout

from airflow_pgbg.hooks.pgbg import PgBackgroundHook
from airflow_pgbg.links.batch import XCOM_BATCH_KEY, PgBackgroundBatchLink
from airflow_pgbg.splitting import split_statements
from airflow_pgbg.status import DEFAULT_DELIMITER, DEFAULT_SCHEMA, FINAL_STATUSES, BatchState, ChildStatus
from airflow_pgbg.triggers.batch import PgBackgroundBatchTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

_TEXT_LIMIT = 500  # characters of a query or error kept in the summary, per child
EARLIER_TRIGGER_GRACE = 60.0  # seconds a new try waits for an earlier try's trigger to be cancelled


class PgBackgroundBatchOperator(BaseOperator):
    """Runs SQL statements in parallel inside PostgreSQL, at most ``max_parallel`` at a time.

    The statements become one batch of the airflow_pgbg engine under a parent UUID; the database
    queues and starts them, so the task only watches: from the triggerer when deferrable, else
    from the worker. The task fails if any statement fails, is lost or is stopped.

    :param sql: a statement, several separated by ``delimiter``, a list of them, or ``.sql`` files
        (templated).
    :param postgres_conn_id: Postgres connection of a role that is a member of ``pgbg_user``.
    :param database: database overriding the connection's.
    :param delimiter: separator of statements; ``;`` splits by PostgreSQL's grammar (sqlparse),
        any other by the engine's scanner (outside quotes, dollar quotes and comments).
    :param max_parallel: statements running at once (default: the engine's global cap).
    :param deferrable: wait in the triggerer (default ``[operators] default_deferrable``).
    :param poll_interval: seconds between status polls.
    :param fail_fast: the first failure stops the rest of the batch.
    :param statement_timeout: time limit of each statement (timedelta or seconds).
    :param batch_label: free text recorded with the batch (its label in the engine).
    :param engine_schema: schema the engine is installed in.
    :param max_result_rows: child rows included in the returned summary (XCom stays small).
    """

    template_fields: Sequence[str] = ("sql", "batch_label")
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers = {"sql": "sql"}
    ui_color = "#d6e4f0"
    operator_extra_links = (PgBackgroundBatchLink(),)

    def __init__(
        self,
        *,
        sql: str | list[str],
        postgres_conn_id: str = PgBackgroundHook.default_conn_name,
        database: str | None = None,
        delimiter: str = DEFAULT_DELIMITER,
        max_parallel: int | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 5.0,
        fail_fast: bool = False,
        statement_timeout: timedelta | float | None = None,
        batch_label: str | None = None,
        engine_schema: str = DEFAULT_SCHEMA,
        max_result_rows: int = 20,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(sql, str):
            if not sql.strip():
                raise ValueError(f"{self.task_id}: sql is empty")
        elif isinstance(sql, (list, tuple)):
            if not sql or not all(isinstance(s, str) for s in sql):
                raise ValueError(f"{self.task_id}: sql must be a non-empty list of strings")
        else:
            raise TypeError(f"{self.task_id}: sql must be a string or a list of strings, not {type(sql).__name__}")
        if not isinstance(delimiter, str) or not delimiter:
            raise ValueError(f"{self.task_id}: delimiter must be a non-empty string")
        if max_parallel is not None and (not isinstance(max_parallel, int) or max_parallel <= 0):
            raise ValueError(f"{self.task_id}: max_parallel must be a positive integer, got {max_parallel!r}")
        if not isinstance(poll_interval, (int, float)) or poll_interval <= 0:
            raise ValueError(f"{self.task_id}: poll_interval must be a positive number of seconds")
        timeout_s = statement_timeout.total_seconds() if isinstance(statement_timeout, timedelta) else statement_timeout
        if timeout_s is not None and (not isinstance(timeout_s, (int, float)) or timeout_s <= 0):
            raise ValueError(f"{self.task_id}: statement_timeout must be positive, got {statement_timeout!r}")
        if not isinstance(max_result_rows, int) or max_result_rows < 0:
            raise ValueError(f"{self.task_id}: max_result_rows must be >= 0")
        self.sql = sql
        self.postgres_conn_id = postgres_conn_id
        self.database = database
        self.delimiter = delimiter
        self.max_parallel = max_parallel
        self.deferrable = deferrable
        self.poll_interval = float(poll_interval)
        self.fail_fast = fail_fast
        self.statement_timeout = statement_timeout
        self.batch_label = batch_label
        self.engine_schema = engine_schema
        self.max_result_rows = max_result_rows
        self.uuid_parent: str | None = None
        self.claim: str | None = None

    @cached_property
    def hook(self) -> PgBackgroundHook:
        return PgBackgroundHook(
            postgres_conn_id=self.postgres_conn_id, database=self.database, engine_schema=self.engine_schema
        )

    def statements(self) -> list[str]:
        """The rendered ``sql`` split into statements."""
        parts = [self.sql] if isinstance(self.sql, str) else list(self.sql)
        out: list[str] = []
        for part in parts:
            if self.delimiter == ";":
                out.extend(split_statements(part))
            else:
                out.extend(self.hook.split(part, self.delimiter))
        if not out:
            raise AirflowException(f"{self.task_id}: no SQL statement to run (only blanks or comments)")
        return out

    # -- submit -----------------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        statements = self.statements()
        ti = context["ti"]
        # A new try of this task instance finds the batch of an earlier try in the database itself:
        # recorded in the same transaction as the batch, so no crash window can lose it.
        origin = f"{ti.dag_id}/{ti.run_id}/{ti.task_id}/{ti.map_index}"
        previous = self.hook.find_batch(origin, statements)
        # Kills of an earlier try arrive late (its trigger is cancelled after this try started):
        # they stop the batch only while it is still claimed by that try.
        self.claim = f"try {ti.try_number}"
        if previous is not None and previous.status is not ChildStatus.DONE:
            self.uuid_parent = previous.uuid_parent
            self._let_earlier_trigger_go(self.uuid_parent)
            self.hook.claim(self.uuid_parent, self.claim)
            state = self.hook.poll(self.uuid_parent)  # after the claim: an earlier stop shows here
            if state is not None and state.is_final and state.status is not ChildStatus.DONE:
                requeued = self.hook.retry(self.uuid_parent)
                self.log.info(
                    "Resuming batch %s of an earlier try: %d children queued again, done ones kept",
                    self.uuid_parent,
                    requeued,
                )
            else:
                self.log.info("Reconnecting to batch %s of an earlier try", self.uuid_parent)
        else:
            self.uuid_parent = self.hook.launch(
                statements,
                max_parallel=self.max_parallel,
                label=self.batch_label,
                fail_fast=self.fail_fast,
                statement_timeout=self.statement_timeout,
                origin=origin,
            )
            self.hook.claim(self.uuid_parent, self.claim)
            self.log.info(
                "Launched batch %s: %d statements, max_parallel=%s",
                self.uuid_parent,
                len(statements),
                self.max_parallel or "engine default",
            )
        ti.xcom_push(
            key=XCOM_BATCH_KEY,
            value={
                "uuid_parent": self.uuid_parent,
                "postgres_conn_id": self.postgres_conn_id,
                "database": self.database,
                "engine_schema": self.engine_schema,
            },
        )

        deadline = time.time() + self.execution_timeout.total_seconds() if self.execution_timeout else None
        if self.deferrable:
            self.defer(
                trigger=PgBackgroundBatchTrigger(
                    self.uuid_parent,
                    self.postgres_conn_id,
                    database=self.database,
                    engine_schema=self.engine_schema,
                    poll_interval=self.poll_interval,
                    deadline=deadline,
                    claim=self.claim,
                ),
                method_name="execute_complete",
            )
        return self._poll_until_done()

    def _let_earlier_trigger_go(self, uuid_parent: str) -> None:
        """Waits while a trigger of an earlier try still polls the batch.

        When a deferred task is cleared, Airflow starts the new try before the triggerer cancels the
        old trigger, whose on_kill() then stops the batch. Waiting for it to go makes a clear stop the
        running children and resume only the unfinished ones; a try that died (no trigger left, as
        after a worker crash) reconnects at once.
        """
        deadline = time.monotonic() + EARLIER_TRIGGER_GRACE
        while others := [c for c in self.hook.watchers(uuid_parent) if c != self.claim]:
            if time.monotonic() > deadline:
                self.log.warning("Trigger of %s still polls batch %s; taking it over", others, uuid_parent)
                return
            self.log.info("Waiting for the trigger of %s to end before resuming batch %s", others, uuid_parent)
            time.sleep(1)

    def _poll_until_done(self) -> dict[str, Any]:
        assert self.uuid_parent is not None
        try:
            while True:
                state = self.hook.poll(self.uuid_parent, wait=self.poll_interval)
                if state is None:
                    raise AirflowException(f"batch {self.uuid_parent} not found")
                if state.is_final:
                    return self._finish(state)
        except BaseException:
            # execution_timeout, SIGTERM from a kill, a crash of this loop: take the batch down too.
            # (After a batch has ended this stops nothing.)
            self._stop_batch()
            raise

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        self.uuid_parent = event["uuid_parent"]
        if event["status"] == "timeout":
            raise AirflowTaskTimeout(
                f"execution_timeout reached: batch {self.uuid_parent} stopped ({event['stopped']} children)"
            )
        if event["status"] == "error":
            raise AirflowException(event["message"])
        state = self.hook.poll(self.uuid_parent)
        if state is None:
            raise AirflowException(f"batch {self.uuid_parent} not found")
        return self._finish(state)

    # -- outcome ----------------------------------------------------------------------------------

    def _finish(self, state: BatchState) -> dict[str, Any]:
        summary = self._summary(state)
        self.log.info("Batch %s ended %s: %s", state.uuid_parent, state.status.value, summary["counts"])
        if state.status is not ChildStatus.DONE:
            bad = self.hook.children(
                state.uuid_parent, statuses=[s.value for s in FINAL_STATUSES - {ChildStatus.DONE}], limit=5
            )
            described = "; ".join(
                f"#{r['seq']} {r['status']} [{r['sqlstate'] or '-'}] {(r['error'] or '')[:200]} :: {r['query'][:120]}"
                for r in bad
            )
            not_done = state.children - state.counts[ChildStatus.DONE]
            raise AirflowException(
                f"batch {state.uuid_parent}: {not_done} of {state.children} statements did not succeed; "
                f"first: {described}"
            )
        return summary

    def _summary(self, state: BatchState) -> dict[str, Any]:
        wall = (state.ended_at - state.started_at).total_seconds() if state.started_at and state.ended_at else None
        rows = self.hook.children(state.uuid_parent, limit=self.max_result_rows) if self.max_result_rows else []
        return {
            "uuid_parent": state.uuid_parent,
            "status": state.status.value,
            "children": state.children,
            "counts": state.counts_json(),
            "wall_seconds": wall,
            "rows_included": len(rows),
            "rows": [
                {
                    "seq": r["seq"],
                    "uuid_child": str(r["uuid_child"]),
                    "status": r["status"],
                    "query": r["query"][:_TEXT_LIMIT],
                    "command": (r["result"] or {}).get("command"),
                    "sqlstate": r["sqlstate"],
                    "error": r["error"] and r["error"][:_TEXT_LIMIT],
                    "seconds": (r["end_time_exec"] - r["start_time_exec"]).total_seconds()
                    if r["start_time_exec"] and r["end_time_exec"]
                    else None,
                }
                for r in rows
            ],
        }

    # -- kill -------------------------------------------------------------------------------------

    def _stop_batch(self) -> None:
        if self.uuid_parent:
            try:
                stopped = self.hook.stop(self.uuid_parent, if_claimed_by=self.claim)
                self.log.info("Stopped batch %s (%d children)", self.uuid_parent, stopped)
            except Exception:
                self.log.exception("Could not stop batch %s", self.uuid_parent)

    def on_kill(self) -> None:
        self._stop_batch()
