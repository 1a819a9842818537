"""PgBackgroundBatchTrigger: waits in the triggerer until a batch has ended, then ends the task there.

The engine refills its own slots, so a trigger only observes; all triggers of a triggerer process
that wait on one database share a :class:`~airflow_pgbg.hooks.watcher.BatchWatcher` (two connections
in all, one poll per interval for every batch, an end notification from the engine). A triggerer
restart, shutdown or redistribution leaves the batch running; a user's kill, clear or mark stops it.

Started from the triggerer (``start_from_trigger``, Airflow 3.3), the trigger also launches the
batch: ``sql`` is rendered there from the serialized DAG, split, validated and submitted, keyed by
the try so that no restart launches it twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from functools import partial
from typing import Any, TypeVar

from airflow.triggers.base import BaseTrigger, TaskFailedEvent, TaskSuccessEvent, TriggerEvent

from airflow_pgbg.compat import TASK_FAILED_EVENT_RETRIES, TRIGGER_HAS_ON_KILL
from airflow_pgbg.hooks.outage import DEFAULT_RECONNECT_TIMEOUT, describe
from airflow_pgbg.hooks.pgbg import PgBackgroundHook
from airflow_pgbg.hooks.watcher import BatchEnd, BatchWatcher, wait_at_most
from airflow_pgbg.identity import EARLIER_TRIGGER_GRACE, XCOM_BATCH_KEY, batch_ref, origin_of, try_claim
from airflow_pgbg.options import BatchOptions, SettingValue
from airflow_pgbg.outcome import failure_message, succeeded, summary_line
from airflow_pgbg.splitting import asplit_sql
from airflow_pgbg.status import DEFAULT_DELIMITER, DEFAULT_SCHEMA

T = TypeVar("T")

# Work that outlives the coroutine that started it: stops still retried through an outage after
# on_kill() returned (Airflow gives it 30 s), XCom pushes.
_BACKGROUND: set[asyncio.Task[Any]] = set()

MOVED_GRACE = 10.0
"""Seconds a cancelled trigger whose task is still deferred waits for the sign that it moved to another
triggerer (or that a newer try took the batch over) before it stops the batch after all."""


_LEGACY_OPTIONS = frozenset(
    {"max_parallel", "fail_fast", "statement_timeout", "retries", "retry_delay", "retry_backoff", "retry_lost"}
)
"""The options a trigger of airflow-provider-pgbg 0.2 was serialized with, one argument each (named as the
fields of BatchOptions)."""


def _options_json(options: dict[str, Any] | None, legacy: dict[str, Any]) -> dict[str, Any]:
    unknown = set(legacy) - _LEGACY_OPTIONS
    if unknown:
        raise TypeError(f"PgBackgroundBatchTrigger got unexpected arguments: {', '.join(sorted(unknown))}")
    merged = {**(options or {}), **legacy}
    # Rendered by the triggerer from arguments of their own.
    merged.pop("label", None)
    merged.pop("settings", None)
    return merged


class _TaskFails(Exception):
    """Ends the task as failed; the message goes to the task's log."""

    def __init__(self, message: str, *, timeout_stopped: int | None = None) -> None:
        super().__init__(message)
        self.timeout_stopped = timeout_stopped


class PgBackgroundBatchTrigger(BaseTrigger):
    """Waits for a batch to end and ends its task: success, or failure naming the failed children.

    :param uuid_parent: the batch; None when the trigger launches it (started from the triggerer).
    :param postgres_conn_id: Airflow connection of the role that submitted it.
    :param poll_interval: seconds between polls (an end is noticed at once through a notification).
    :param deadline: epoch seconds after which the batch is stopped (the task's execution_timeout).
    :param claim: the try's claim on the batch; a kill stops the batch only while it still holds.
    :param reconnect_timeout: seconds an outage of the database is waited out before the task fails.
    :param sql: the statements to launch (with the options below) when ``uuid_parent`` is None.
    :param delimiter: how ``sql`` is split (as the operator's).
    :param batch_label: the batch's label, rendered here as ``sql`` is.
    :param session_settings: the batch's settings, rendered here as ``sql`` is.
    :param options: the other launch options (``BatchOptions.to_json()``); a trigger serialized by
        airflow-provider-pgbg 0.2 gives them as arguments of their own instead.
    :param execution_timeout: seconds from the launch to stop the batch at, when launching.
    :param max_result_rows: children included in the summary the task returns.
    :param resume_on_success: end a successful task on a worker (``execute_complete``) instead of in
        the triggerer, for what runs only there: Airflow's DAG processor runs no success callback for a
        task that a trigger ended.
    :param resume_on_failure: end a failed task on a worker too (Airflow < 3.3 always does), for the
        OpenLineage listener, which reports a task's end only from its worker.
    """

    def __init__(
        self,
        uuid_parent: str | None,
        postgres_conn_id: str,
        *,
        database: str | None = None,
        engine_schema: str = DEFAULT_SCHEMA,
        poll_interval: float = 5.0,
        deadline: float | None = None,
        claim: str | None = None,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        sql: str | list[str] | None = None,
        delimiter: str = DEFAULT_DELIMITER,
        batch_label: str | None = None,
        session_settings: dict[str, SettingValue] | None = None,
        options: dict[str, Any] | None = None,
        execution_timeout: float | None = None,
        max_result_rows: int = 20,
        resume_on_success: bool = False,
        resume_on_failure: bool = False,
        **legacy_options: Any,
    ) -> None:
        super().__init__()
        if uuid_parent is None and sql is None:
            raise ValueError("PgBackgroundBatchTrigger needs a batch (uuid_parent) or statements to launch (sql)")
        self.uuid_parent = uuid_parent
        self.postgres_conn_id = postgres_conn_id
        self.database = database
        self.engine_schema = engine_schema
        self.poll_interval = poll_interval
        self.deadline = deadline
        self.claim = claim
        self.reconnect_timeout = reconnect_timeout
        self.sql = sql
        self.delimiter = delimiter
        # Rendered by the triggerer (template fields of the operator), so not among the options.
        self.batch_label = batch_label
        self.session_settings = session_settings
        # A trigger serialized by airflow-provider-pgbg 0.2 names its options one by one.
        self.options = _options_json(options, legacy_options)
        self.execution_timeout = execution_timeout
        self.max_result_rows = max_result_rows
        self.resume_on_success = resume_on_success
        self.resume_on_failure = resume_on_failure

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "uuid_parent": self.uuid_parent,
                "postgres_conn_id": self.postgres_conn_id,
                "database": self.database,
                "engine_schema": self.engine_schema,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
                "claim": self.claim,
                "reconnect_timeout": self.reconnect_timeout,
                "sql": self.sql,
                "delimiter": self.delimiter,
                "batch_label": self.batch_label,
                "session_settings": self.session_settings,
                "options": self.options,
                "execution_timeout": self.execution_timeout,
                "max_result_rows": self.max_result_rows,
                "resume_on_success": self.resume_on_success,
                "resume_on_failure": self.resume_on_failure,
            },
        )

    def _hook(self) -> PgBackgroundHook:
        return PgBackgroundHook(
            postgres_conn_id=self.postgres_conn_id, database=self.database, engine_schema=self.engine_schema
        )

    def _watcher(self) -> BatchWatcher:
        return BatchWatcher.for_hook(self._hook())

    async def _call(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """``fn(connection)`` through the watcher, shielded so that a cancellation reaches run() as
        sent: the triggerer tells a user's kill from a shutdown by the CancelledError's message."""
        task = asyncio.ensure_future(self._watcher().call(fn, self.reconnect_timeout))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()
            raise

    # -- run --------------------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            if self.uuid_parent is None:
                await self._launch()
            assert self.uuid_parent is not None
            end = await self._wait_for_end()
            summary = end.summary
            if summary is None:
                raise _TaskFails(f"batch {self.uuid_parent} is no longer in the database")
            if self._ends_task(succeeded(summary)) and self.claim is not None:
                # Taking the outcome is what ends this try's wait in the engine; a worker that resumes
                # the task takes it there instead. A restart of the triggerer before the event is
                # handled runs this trigger again, with the same claim.
                summary = await self._take_outcome(self.uuid_parent, self.claim) or summary
            self.log.info(summary_line(summary))
            if not succeeded(summary):
                raise _TaskFails(failure_message(summary))
            if self.resume_on_success:
                event: TriggerEvent = TriggerEvent(
                    {"uuid_parent": self.uuid_parent, "status": "success", "claim": self.claim}
                )
            else:
                event = TaskSuccessEvent(xcoms={"return_value": summary, **self._batch_xcom()})
        except asyncio.CancelledError:
            raise
        except _TaskFails as exc:
            event = self._failure(str(exc), timeout_stopped=exc.timeout_stopped)
        except Exception as exc:  # the database's answer, or the outage that outlasted reconnect_timeout
            event = self._failure(f"batch {self.uuid_parent or '(not launched)'}: {describe(exc)}")
        yield event

    def _ends_task(self, success: bool) -> bool:
        """Whether this trigger ends its task itself (else a worker resumes it)."""
        if success:
            return not self.resume_on_success
        return TASK_FAILED_EVENT_RETRIES and not self.resume_on_failure

    async def _take_outcome(self, uuid_parent: str, claim: str) -> dict[str, Any] | None:
        hook = self._hook()
        return await self._call(
            partial(hook.atake_outcome, uuid_parent=uuid_parent, claimed_by=claim, rows=self.max_result_rows)
        )

    def _failure(self, message: str, *, timeout_stopped: int | None = None) -> TriggerEvent:
        self.log.error("%s", message)
        if self._ends_task(False):
            return TaskFailedEvent(xcoms=self._batch_xcom())
        # Airflow < 3.3 would fail a TaskFailedEvent for good: resume on a worker, which raises, so
        # the task's retries and failure callbacks apply (and the OpenLineage listener sees the end).
        if timeout_stopped is not None:
            return TriggerEvent({"uuid_parent": self.uuid_parent, "status": "timeout", "stopped": timeout_stopped})
        return TriggerEvent({"uuid_parent": self.uuid_parent, "status": "error", "message": message})

    def _batch_xcom(self) -> dict[str, Any]:
        if self.uuid_parent is None:
            return {}
        return {
            XCOM_BATCH_KEY: batch_ref(
                self.uuid_parent, self.postgres_conn_id, self.database, self.engine_schema, self.claim
            )
        }

    async def _wait_for_end(self) -> BatchEnd:
        assert self.uuid_parent is not None
        wait: Coroutine[Any, Any, BatchEnd] = self._watcher().wait(
            self.uuid_parent,
            claim=self.claim,
            poll_interval=self.poll_interval,
            reconnect_timeout=self.reconnect_timeout,
            summary_rows=self.max_result_rows,
        )
        if self.deadline is None:
            return await wait
        ended, end = await wait_at_most(wait, max(0.0, self.deadline - time.time()))
        if ended:
            assert end is not None
            return end
        stopped = await self._stop_batch("execution_timeout")
        raise _TaskFails(
            f"execution_timeout reached: batch {self.uuid_parent} stopped ({stopped} children)",
            timeout_stopped=stopped,
        )

    # -- launch (started from the triggerer) -------------------------------------------------------

    async def _launch(self) -> None:
        """Splits, validates and submits the rendered statements; a new try resumes an earlier one's batch."""
        ti = self.task_instance
        if ti is None:
            raise _TaskFails("the trigger can launch a batch only for a task instance")
        hook = self._hook()
        origin = origin_of(ti)
        self.claim = try_claim(ti.try_number, deferred=True)
        statements = await self._statements(hook)
        try:
            options = BatchOptions.from_json(
                {**self.options, "label": self.batch_label, "settings": self.session_settings}
            )
        except ValueError as exc:
            raise _TaskFails(f"nothing launched: {exc}") from None
        loop = asyncio.get_running_loop()
        grace_ends = loop.time() + EARLIER_TRIGGER_GRACE
        claim = self.claim
        while True:
            # A person may have marked or cleared the task before its trigger ran (Airflow may still
            # start such a trigger): then nothing is launched for this try.
            state = await self._ti_state()
            if state not in (None, "deferred"):
                raise _TaskFails(f"the task instance is {state}, no longer deferred: nothing launched")
            takeover = loop.time() >= grace_ends
            submission = await self._call(
                partial(
                    hook.asubmit,
                    statements=statements,
                    origin=origin,
                    claimed_by=claim,
                    options=options,
                    requeue_on_takeover=True,
                    takeover=takeover,
                )
            )
            if submission.action != "waiting":
                break
            self.log.info(
                "Waiting for the trigger of %s to end before resuming batch %s",
                submission.previous_holder,
                submission.uuid_parent,
            )
            await asyncio.sleep(1.0)
        self.uuid_parent = submission.uuid_parent
        self.log.info(
            "Batch %s %s (%d statements, %s)", submission.uuid_parent, submission.action, len(statements), claim
        )
        if self.execution_timeout is not None and submission.claimed_at is not None:
            self.deadline = submission.claimed_at.timestamp() + self.execution_timeout
        # Not awaited: the supervisor may take seconds to store it, and the wait starts now.
        push = asyncio.ensure_future(self._push_batch_xcom(ti))
        _BACKGROUND.add(push)
        push.add_done_callback(_BACKGROUND.discard)

    async def _statements(self, hook: PgBackgroundHook) -> list[str]:
        async def split_in_engine(text: str, delimiter: str) -> list[str]:
            return await self._call(partial(hook.asplit, text=text, delimiter=delimiter))

        try:
            return await asplit_sql(self.sql, self.delimiter, split_in_engine)
        except ValueError as exc:
            raise _TaskFails(str(exc)) from None

    async def _push_batch_xcom(self, ti: Any) -> None:
        """Publishes the batch at once, so the batch page and the extra link work while it runs.

        Sent on the event loop to the triggerer's supervisor (a blocking SDK call would stall every
        trigger of the process); the task's end pushes it again anyway.
        """
        try:
            from airflow.sdk.bases.xcom import BaseXCom
            from airflow.sdk.execution_time import task_runner
            from airflow.sdk.execution_time.comms import SetXCom

            value = BaseXCom.serialize_value(self._batch_xcom()[XCOM_BATCH_KEY])
            started = time.monotonic()
            await task_runner.SUPERVISOR_COMMS.asend(
                SetXCom(
                    key=XCOM_BATCH_KEY,
                    value=value,
                    dag_id=ti.dag_id,
                    run_id=ti.run_id,
                    task_id=ti.task_id,
                    map_index=ti.map_index,
                )
            )
            self.log.debug("Batch published to XCom in %.3f s", time.monotonic() - started)
        except Exception as exc:
            self.log.warning("Could not publish the batch to XCom before its end: %s", exc)

    # -- kill -------------------------------------------------------------------------------------

    async def _stop_batch(self, why: str) -> int:
        """Stops the batch while this try still holds it, retrying through an outage.

        The stop goes on in the background if the caller is cancelled (Airflow allows on_kill 30 s).
        """
        hook = self._hook()
        claim = self.claim
        if self.uuid_parent is not None:
            uuid_parent = self.uuid_parent

            async def stop(conn: Any) -> int:
                return await hook.astop(conn, uuid_parent, if_claimed_by=claim)
        elif self.sql is not None and self.task_instance is not None:
            # Cancelled while launching: stop whatever this try's submit may have committed.
            origin = origin_of(self.task_instance)
            claim = try_claim(self.task_instance.try_number, deferred=True)

            async def stop(conn: Any) -> int:
                return await hook.astop_claimed(conn, origin, claim)
        else:
            return 0
        task = asyncio.ensure_future(self._watcher().call(stop, self.reconnect_timeout))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)
        stopped = await asyncio.shield(task)
        self.log.info("Stopped batch %s (%d children): %s", self.uuid_parent or "(being launched)", stopped, why)
        return stopped

    async def on_kill(self) -> None:
        """A user marked the deferred task failed or success, or cleared it: stop the batch.

        Airflow 3.3.2 also calls it on a triggerer whose trigger was given to another triggerer (one
        that missed its heartbeats for ``triggerer_health_check_threshold`` loses its triggers, and
        cancels them "by user action" when it comes back): then the same try waits for the batch from
        the other triggerer, and the batch must run on.
        """
        if await self._moved():
            self.log.info(
                "Batch %s is waited for by another triggerer now, or taken over by a newer try: not stopped here",
                self.uuid_parent or "(being launched)",
            )
            return
        await self._stop_batch("the task was marked or cleared")

    async def _moved(self) -> bool:
        """Whether this trigger was cancelled because it moved, not by a person.

        A mark leaves the task instance failed or success, a clear (until its new try defers) without a
        state: the batch is stopped at once. While the task is still deferred, this is either a move (the
        same try's trigger on the other triggerer soon watches the batch too) or a clear whose new try has
        already deferred (it takes the batch over within seconds, stopping and queueing again what ran):
        wait up to ``MOVED_GRACE`` for either sign; with neither, stop after all.
        """
        if self.claim is None or self.task_instance is None:
            return False
        hook = self._hook()
        watcher = self._watcher()
        claim, uuid_parent, origin = self.claim, self.uuid_parent, origin_of(self.task_instance)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MOVED_GRACE
        while True:
            if await self._ti_state() != "deferred":
                return False
            holder, watched_elsewhere = await self._call(
                partial(
                    hook.aholders,
                    claim=claim,
                    uuid_parent=uuid_parent,
                    origin=None if uuid_parent else origin,
                    except_waiter=watcher.waiter_id,
                )
            )
            if watched_elsewhere or (holder is not None and holder != claim):
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.5)

    async def cleanup(self) -> None:
        if TRIGGER_HAS_ON_KILL:
            return  # on_kill() handles user actions; a restart must not stop anything
        if await self._task_left_deferral():
            await self._stop_batch("the task was marked or cleared")

    async def _task_left_deferral(self) -> bool:
        """Airflow < 3.3: the task instance is no longer deferred, so a user acted on it."""
        state = await self._ti_state()
        return state is not None and state != "deferred"

    async def _ti_state(self) -> str | None:
        """The state of this trigger's task instance, asked of the triggerer's supervisor without
        blocking the event loop; None when unknown (no task instance, or not in a triggerer)."""
        ti = self.task_instance
        if ti is None:
            return None
        try:
            from airflow.sdk.execution_time import task_runner
            from airflow.sdk.execution_time.comms import GetTaskStates

            result = await task_runner.SUPERVISOR_COMMS.asend(
                GetTaskStates(
                    dag_id=ti.dag_id,
                    task_ids=[ti.task_id],
                    run_ids=[ti.run_id],
                    map_index=None if ti.map_index < 0 else ti.map_index,
                )
            )
        except Exception as exc:
            self.log.debug("Could not read the state of %s: %s", ti, exc)
            return None
        states = getattr(result, "task_states", None) or {}
        found = [state for run in states.values() for state in run.values()]
        return found[0] if len(found) == 1 else None
