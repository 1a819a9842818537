"""PgBackgroundBatchOperator: run a batch of SQL statements in PostgreSQL as pg_background workers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import StartTriggerArgs

from airflow_pgbg.compat import (
    CAN_START_FROM_TRIGGER,
    AirflowException,
    AirflowTaskTimeout,
    BaseOperator,
    conf,
    lineage_reported_for,
)
from airflow_pgbg.hooks.install import validate_schema
from airflow_pgbg.hooks.outage import DEFAULT_RECONNECT_TIMEOUT, EngineUnreachable
from airflow_pgbg.hooks.pgbg import PgBackgroundHook, seconds
from airflow_pgbg.identity import (
    BATCH_LOCATION_FIELDS,
    EARLIER_TRIGGER_GRACE,
    XCOM_BATCH_KEY,
    batch_ref,
    origin_of,
    try_claim,
)
from airflow_pgbg.links.batch import PgBackgroundBatchLink
from airflow_pgbg.options import BatchOptions, SettingValue
from airflow_pgbg.outcome import failure_message, succeeded, summary_line
from airflow_pgbg.splitting import split_sql
from airflow_pgbg.status import DEFAULT_DELIMITER, DEFAULT_SCHEMA, ChildStatus
from airflow_pgbg.triggers.batch import PgBackgroundBatchTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

TRIGGER_CLASS = f"{PgBackgroundBatchTrigger.__module__}.{PgBackgroundBatchTrigger.__qualname__}"


def _positive_seconds(task_id: str, name: str, value: Any, *, allow_zero: bool = False) -> float | None:
    """A duration argument (timedelta or seconds) validated when the DAG is parsed."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, timedelta)):
        raise TypeError(f"{task_id}: {name} must be a timedelta or a number of seconds, not {type(value).__name__}")
    secs = seconds(value)
    assert secs is not None
    if secs < 0 or (secs == 0 and not allow_zero):
        raise ValueError(f"{task_id}: {name} must be {'0 or more' if allow_zero else 'positive'}, got {value!r}")
    return secs


class PgBackgroundBatchOperator(BaseOperator):
    """Runs SQL statements in parallel inside PostgreSQL, at most ``max_parallel`` at a time.

    The statements become one batch of the airflow_pgbg engine under a parent UUID; the database
    queues and starts them, so the task only watches: from the triggerer when deferrable, else from
    the worker. The task fails if any statement fails, is lost or is stopped.

    With ``deferrable=True`` on Airflow 3.3 the task needs no worker at all: it starts in the
    triggerer, which renders ``sql``, launches the batch and ends the task (``start_from_trigger``).

    :param sql: a statement, several separated by ``delimiter``, a list of them, or ``.sql`` files
        (templated).
    :param postgres_conn_id: Postgres connection of a role that is a member of ``pgbg_user``.
    :param database: database overriding the connection's.
    :param delimiter: separator of statements; ``;`` splits by PostgreSQL's grammar (sqlparse),
        any other by the engine's scanner (outside quotes, dollar quotes and comments).
    :param max_parallel: statements running at once (default: the engine's global cap).
    :param deferrable: wait in the triggerer (default ``[operators] default_deferrable``).
    :param start_from_trigger: with ``deferrable``, start in the triggerer without a worker (default:
        where Airflow supports it, 3.3+, unless ``defer_after`` is set; mapped tasks start on a worker).
    :param defer_after: with ``deferrable``, where the batch is launched from a worker, wait there up to
        this long (timedelta or seconds) before deferring: a batch that ends sooner ends the task on the
        worker, without the hand-off to the triggerer and back (one to three seconds of Airflow's loops).
        Default 0: defer at once.
    :param poll_interval: seconds between status polls (an end is noticed at once when deferred).
    :param fail_fast: the first (final) failure stops the rest of the batch.
    :param statement_timeout: time limit of each statement (timedelta or seconds).
    :param statement_retries: automatic retries of a statement that failed transiently (deadlock,
        serialization failure, lock timeout, connection loss, shutdown, too many connections).
    :param statement_retry_delay: wait before the first retry (timedelta or seconds).
    :param statement_retry_backoff: each further retry waits this many times longer.
    :param retry_lost: also retry statements lost with their worker (server restart, terminated
        worker); only for statements that are safe to run again.
    :param reconnect_timeout: how long an outage of the database (restart, failover, dropped
        connection, too many connections) is waited out before the task fails (default 15 minutes).
    :param session_settings: PostgreSQL settings every statement runs with, on top of the role's
        defaults (templated), e.g. ``{"maintenance_work_mem": "2GB", "lock_timeout": "5s"}``; ``SET``
        statements at the start of ``sql`` become settings too. ``statement_timeout`` among them is the
        batch's ``statement_timeout``. The database refuses, at launch, settings the role may not set.
    :param batch_label: free text recorded with the batch (its label in the engine).
    :param engine_schema: schema the engine is installed in.
    :param max_result_rows: child rows included in the returned summary (XCom stays small).
    """

    template_fields: Sequence[str] = ("sql", "batch_label", "session_settings")
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers = {"sql": "sql"}  # noqa: RUF012 - Airflow's own convention
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
        start_from_trigger: bool | None = None,
        defer_after: timedelta | float = 0.0,
        poll_interval: float = 5.0,
        fail_fast: bool = False,
        statement_timeout: timedelta | float | None = None,
        statement_retries: int = 0,
        statement_retry_delay: timedelta | float = 1.0,
        statement_retry_backoff: float = 2.0,
        retry_lost: bool = False,
        reconnect_timeout: timedelta | float = DEFAULT_RECONNECT_TIMEOUT,
        session_settings: dict[str, SettingValue] | None = None,
        batch_label: str | None = None,
        engine_schema: str = DEFAULT_SCHEMA,
        max_result_rows: int = 20,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        tid = self.task_id
        if isinstance(sql, str):
            if not sql.strip():
                raise ValueError(f"{tid}: sql is empty")
        elif isinstance(sql, (list, tuple)):
            if not sql or not all(isinstance(s, str) for s in sql):
                raise ValueError(f"{tid}: sql must be a non-empty list of strings")
        else:
            raise TypeError(f"{tid}: sql must be a string or a list of strings, not {type(sql).__name__}")
        if not isinstance(delimiter, str) or not delimiter:
            raise ValueError(f"{tid}: delimiter must be a non-empty string")
        poll = _positive_seconds(tid, "poll_interval", poll_interval)
        if isinstance(poll_interval, timedelta) or poll is None:
            raise ValueError(f"{tid}: poll_interval must be a positive number of seconds")
        if not isinstance(max_result_rows, int) or max_result_rows < 0:
            raise ValueError(f"{tid}: max_result_rows must be >= 0")
        try:
            validate_schema(engine_schema)
        except ValueError as exc:
            raise ValueError(f"{tid}: {exc}") from None
        self.sql = sql
        self.postgres_conn_id = postgres_conn_id
        self.database = database
        self.delimiter = delimiter
        self.max_parallel = max_parallel
        self.deferrable = deferrable
        self.poll_interval = poll
        self.defer_after = _positive_seconds(tid, "defer_after", defer_after, allow_zero=True) or 0.0
        self.fail_fast = fail_fast
        self.statement_timeout = _positive_seconds(tid, "statement_timeout", statement_timeout)
        self.statement_retries = statement_retries
        self.statement_retry_delay = _positive_seconds(
            tid, "statement_retry_delay", statement_retry_delay, allow_zero=True
        )
        self.statement_retry_backoff = statement_retry_backoff
        self.retry_lost = retry_lost
        self.reconnect_timeout = _positive_seconds(tid, "reconnect_timeout", reconnect_timeout)
        self.session_settings = session_settings
        self.batch_label = batch_label
        try:
            self.options  # noqa: B018 - validated now, when the DAG is parsed (templates render later)
        except ValueError as exc:
            raise ValueError(f"{tid}: {exc}") from None
        self.engine_schema = engine_schema
        self.max_result_rows = max_result_rows
        self.uuid_parent: str | None = None
        self.claim: str | None = None
        # The OpenLineage listener reports only from a worker's task process: a task it reports starts
        # and ends on a worker unless told otherwise.
        self._reported_lineage = lineage_reported_for(self)
        if (
            deferrable
            and CAN_START_FROM_TRIGGER
            and (
                start_from_trigger
                or (start_from_trigger is None and not self._reported_lineage and not self.defer_after)
            )
        ):
            if self.defer_after:
                raise ValueError(f"{tid}: defer_after waits on a worker: it needs start_from_trigger=False")
            self.start_from_trigger = True
            self.start_trigger_args = StartTriggerArgs(
                trigger_cls=TRIGGER_CLASS,
                trigger_kwargs=self._launch_trigger_kwargs(),
                next_method="execute_complete",
                next_kwargs=None,
                timeout=None,
            )
        elif start_from_trigger:
            raise ValueError(f"{tid}: start_from_trigger needs deferrable=True and Airflow 3.3 or later")

    @classmethod
    def get_serialized_fields(cls) -> frozenset[str]:
        # Where the batch runs goes into the serialized DAG (as Airflow's sensors add their mode), so
        # that the API server's console and listener take it from the task's definition, never from
        # an XCom that any task's code could have written.
        return super().get_serialized_fields() | set(BATCH_LOCATION_FIELDS)

    def _launch_trigger_kwargs(self) -> dict[str, Any]:
        """What the trigger needs to launch the batch itself; ``sql`` and ``batch_label`` are rendered
        by the triggerer (they are template fields of both)."""
        return {
            "uuid_parent": None,
            "postgres_conn_id": self.postgres_conn_id,
            "database": self.database,
            "engine_schema": self.engine_schema,
            "poll_interval": self.poll_interval,
            "reconnect_timeout": self.reconnect_timeout,
            "sql": self.sql,
            "delimiter": self.delimiter,
            "batch_label": self.batch_label,
            "session_settings": self.session_settings,
            "options": self.options.to_json(),
            "execution_timeout": self.execution_timeout.total_seconds() if self.execution_timeout else None,
            "max_result_rows": self.max_result_rows,
            "resume_on_success": self._resume_on_success(),
            "resume_on_failure": self._reported_lineage,
        }

    def _resume_on_success(self) -> bool:
        """A success callback runs only on a worker: Airflow's DAG processor drops it for a task that its
        trigger ended (3.3.2: "Task callback requested but is not a failure callback"); so does the
        OpenLineage listener."""
        return bool(self.on_success_callback) or self._reported_lineage

    def resolve_template_files(self) -> None:
        # The DAG processor reads .sql files into ``sql`` here; the triggerer renders what the trigger
        # was given, so it must be given the file's text, not its name.
        super().resolve_template_files()
        args = getattr(self, "start_trigger_args", None)
        if args is not None and args.trigger_kwargs is not None:
            args.trigger_kwargs["sql"] = self.sql

    @cached_property
    def hook(self) -> PgBackgroundHook:
        return PgBackgroundHook(
            postgres_conn_id=self.postgres_conn_id, database=self.database, engine_schema=self.engine_schema
        )

    @property
    def options(self) -> BatchOptions:
        """The batch's options from this task's arguments (rendered, once the task runs)."""
        return BatchOptions(
            max_parallel=self.max_parallel,
            label=self.batch_label,
            fail_fast=self.fail_fast,
            statement_timeout=self.statement_timeout,
            retries=self.statement_retries,
            retry_delay=self.statement_retry_delay if self.statement_retry_delay is not None else 1.0,
            retry_backoff=self.statement_retry_backoff,
            retry_lost=self.retry_lost,
            settings=self.session_settings,
        )

    def statements(self, hook: PgBackgroundHook | None = None) -> list[str]:
        """The rendered ``sql`` split into statements (by ``hook`` if given, when the delimiter is not ``;``)."""
        try:
            return split_sql(self.sql, self.delimiter, (hook or self.hook).split)
        except ValueError as exc:
            raise AirflowException(f"{self.task_id}: {exc}") from None

    def _through_outages(self, call: Any) -> Any:
        return self.hook.through_outages(
            call,
            self.reconnect_timeout or DEFAULT_RECONNECT_TIMEOUT,
            on_outage=lambda exc: self.log.warning("Database unreachable, retrying: %s", exc),
        )

    # -- submit -----------------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        statements = self._through_outages(self.statements)
        ti = context["ti"]
        origin = origin_of(ti)
        # Kills of an earlier try arrive late (its trigger is cancelled after this try started):
        # they stop the batch only while it is still claimed by that try.
        self.claim = try_claim(ti.try_number, deferred=self.deferrable)
        grace_ends = time.monotonic() + EARLIER_TRIGGER_GRACE
        while True:
            takeover = time.monotonic() >= grace_ends
            submission = self._through_outages(
                lambda takeover=takeover: self.hook.submit(
                    statements,
                    origin=origin,
                    claimed_by=self.claim,
                    options=self.options,
                    requeue_on_takeover=self.deferrable,
                    takeover=takeover,
                )
            )
            if submission.action != "waiting":
                break
            # A cleared deferred task starts its new try before the triggerer cancels the old trigger,
            # whose kill then stops the batch: wait for it to go, then resume only what is unfinished.
            self.log.info(
                "Waiting for the trigger of %s to end before resuming batch %s",
                submission.previous_holder,
                submission.uuid_parent,
            )
            time.sleep(1)
        self.uuid_parent = submission.uuid_parent
        self.log.info(
            "Batch %s %s: %d statements, max_parallel=%s, %s",
            self.uuid_parent,
            submission.action,
            len(statements),
            self.max_parallel or "engine default",
            self.claim,
        )
        ti.xcom_push(
            key=XCOM_BATCH_KEY,
            value=batch_ref(self.uuid_parent, self.postgres_conn_id, self.database, self.engine_schema, self.claim),
        )
        if submission.action == "finished":
            # An earlier try's batch succeeded but that try died before it could say so: its outcome is
            # this try's, and nothing runs again.
            try:
                return self._finish()
            finally:
                self.hook.close()

        deadline = time.time() + self.execution_timeout.total_seconds() if self.execution_timeout else None
        if self.deferrable:
            if self.defer_after:
                # A short batch ends before the triggerer would even have picked its trigger up.
                outcome = self._poll_until_done(within=self.defer_after)
                if outcome is not None:
                    return outcome
                self.log.info("Batch %s still running after %s s: deferring", self.uuid_parent, self.defer_after)
            # Asked again now that the DAG is complete: selective_enable marks tasks after they are built.
            self._reported_lineage = lineage_reported_for(self)
            self.defer(
                trigger=PgBackgroundBatchTrigger(
                    self.uuid_parent,
                    self.postgres_conn_id,
                    database=self.database,
                    engine_schema=self.engine_schema,
                    poll_interval=self.poll_interval,
                    deadline=deadline,
                    claim=self.claim,
                    reconnect_timeout=self.reconnect_timeout or DEFAULT_RECONNECT_TIMEOUT,
                    max_result_rows=self.max_result_rows,
                    resume_on_success=self._resume_on_success(),
                    resume_on_failure=self._reported_lineage,
                ),
                method_name="execute_complete",
                kwargs={"uuid_parent": self.uuid_parent, "claim": self.claim},
            )
        outcome = self._poll_until_done()
        assert outcome is not None  # no time limit
        return outcome

    def _poll_until_done(self, within: float | None = None) -> dict[str, Any] | None:
        """Waits on the worker for the batch's end and returns its outcome; with ``within`` (seconds),
        None if it has not ended by then."""
        assert self.uuid_parent is not None
        assert self.claim is not None
        uuid_parent, claim = self.uuid_parent, self.claim
        ends = None if within is None else time.monotonic() + within

        def poll() -> Any:
            # The watch lock (or, behind a pooler, the heartbeat) tells a newer try that this one is alive.
            self.hook.watch(uuid_parent, claim, every=self.poll_interval)
            wait = self.poll_interval if ends is None else min(self.poll_interval, ends - time.monotonic())
            return self.hook.poll(uuid_parent, wait=max(wait, 0.0))

        try:
            while True:
                state = self._through_outages(poll)
                if state is None:
                    raise AirflowException(f"batch {uuid_parent} not found")
                if state.is_final:
                    return self._finish()
                if ends is not None and time.monotonic() >= ends:
                    return None
        except BaseException:
            # execution_timeout, SIGTERM from a kill, a crash of this loop: take the batch down too.
            # (After a batch has ended this stops nothing.)
            self._stop_batch()
            raise
        finally:
            self.hook.close()

    def execute_complete(
        self, context: Context, event: Any, uuid_parent: str | None = None, claim: str | None = None
    ) -> dict[str, Any]:
        """Resumes after the trigger where it did not end the task itself: a task with a success
        callback, a failure on Airflow < 3.3, ``dag.test()``, or an event of airflow-provider-pgbg 0.1.0
        that was waiting when the package was upgraded."""
        # The claim of the try that waited: from the deferral, the event, or (a try that started in the
        # triggerer) the try itself; the outcome is taken under it.
        ti = context["ti"]
        self.claim = (
            claim
            or (event.get("claim") if isinstance(event, dict) else None)
            or self.claim
            or try_claim(ti.try_number, deferred=True)
        )
        if isinstance(event, dict):
            self.uuid_parent = event.get("uuid_parent") or uuid_parent or self.uuid_parent
            if event["status"] == "timeout":
                raise AirflowTaskTimeout(
                    f"execution_timeout reached: batch {self.uuid_parent} stopped ({event['stopped']} children)"
                )
            if event["status"] == "error":
                raise AirflowException(event["message"])
        else:  # "success" / "failed": the state a TaskSuccessEvent / TaskFailedEvent carried
            claimed = self._through_outages(lambda: self.hook.claimed_batch(origin_of(ti), self.claim))
            self.uuid_parent = uuid_parent or self.uuid_parent or claimed
            if self.uuid_parent is None:
                raise AirflowException(f"the trigger ended the task {event!r} before launching a batch")
        try:
            return self._finish(trigger_failed=event == "failed")
        finally:
            self.hook.close()

    # -- outcome ----------------------------------------------------------------------------------

    def _finish(self, *, trigger_failed: bool = False) -> dict[str, Any]:
        assert self.uuid_parent is not None
        uuid_parent, claim = self.uuid_parent, self.claim
        # Taking the outcome is what ends this try's wait in the engine: a retry after this point (the
        # task completed) runs a succeeded batch anew, one before it takes the outcome instead.
        summary = self._through_outages(
            lambda: (
                self.hook.take_outcome(uuid_parent, claim, rows=self.max_result_rows)
                if claim
                else self.hook.summary(uuid_parent, rows=self.max_result_rows)
            )
        )
        if summary is None:
            raise AirflowException(f"batch {uuid_parent} not found")
        self.log.info(summary_line(summary))
        if not succeeded(summary):
            if summary["status"] == ChildStatus.STOPPED.value and trigger_failed and self.execution_timeout:
                raise AirflowTaskTimeout(failure_message(summary))
            raise AirflowException(failure_message(summary))
        if trigger_failed:
            raise AirflowException(f"the trigger failed the task although batch {uuid_parent} succeeded; see its log")
        return summary

    # -- lineage (the openlineage extra) ----------------------------------------------------------

    def _lineage(self, *, ended: bool) -> Any:
        try:
            from airflow_pgbg.lineage import batch_lineage
        except ImportError:  # no OpenLineage provider: no lineage, and nothing of it imported
            return None
        # A hook of its own: the OpenLineage listener calls these methods in a forked process, where the task's
        # hook connection, if open, is the parent's socket.
        hook = PgBackgroundHook(
            postgres_conn_id=self.postgres_conn_id, database=self.database, engine_schema=self.engine_schema
        )
        try:
            connection = hook.get_connection(self.postgres_conn_id)
            outcome = hook.outcome(self.uuid_parent) if ended and self.uuid_parent else None
            return batch_lineage(
                self.statements(hook),
                host=connection.host,
                port=connection.port,
                database=self.database or connection.schema,
                query=lambda sql, params: hook.get_records(sql, parameters=params),
                outcome=outcome,
            )
        except Exception:  # lineage never fails the task
            self.log.warning("OpenLineage: could not build the batch's lineage", exc_info=True)
            return None
        finally:
            hook.close()

    def get_openlineage_facets_on_start(self) -> Any:
        """Tables the batch's statements read and write, as the official SQL operators report them."""
        return self._lineage(ended=False)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """The same, with the batch's UUID and counts."""
        return self._lineage(ended=True)

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        """The same, with the SQLSTATEs of the children that failed."""
        return self._lineage(ended=True)

    # -- kill -------------------------------------------------------------------------------------

    def _stop_batch(self) -> None:
        if not self.uuid_parent:
            return
        uuid_parent, claim = self.uuid_parent, self.claim
        # A connection of its own: on_kill() runs in a signal handler, maybe while the poll holds the
        # hook's connection in this very thread.
        hook = PgBackgroundHook(
            postgres_conn_id=self.postgres_conn_id, database=self.database, engine_schema=self.engine_schema
        )
        try:
            stopped = hook.through_outages(
                lambda: hook.stop(uuid_parent, if_claimed_by=claim),
                min(self.reconnect_timeout or DEFAULT_RECONNECT_TIMEOUT, 60.0),
            )
            self.log.info("Stopped batch %s (%d children)", uuid_parent, stopped)
        except EngineUnreachable as exc:
            self.log.error("Could not stop batch %s: %s", uuid_parent, exc)
        except Exception:
            self.log.exception("Could not stop batch %s", uuid_parent)
        finally:
            hook.close()

    def on_kill(self) -> None:
        self._stop_batch()
