"""PgBackgroundBatchTrigger: waits in the triggerer until every child of a batch has ended."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_pgbg.hooks.pgbg import PgBackgroundHook, trigger_application_name
from airflow_pgbg.status import DEFAULT_SCHEMA

# Airflow 3.3 calls BaseTrigger.on_kill() only when a user marks the task failed/success or clears
# it; earlier versions have no such hook and only call cleanup(), on user action and restart alike.
HAS_TRIGGER_ON_KILL = "on_kill" in BaseTrigger.__dict__


class PgBackgroundBatchTrigger(BaseTrigger):
    """Polls the engine until the batch has ended: one round trip per ``poll_interval``, in which the
    database itself waits for the end, so the event fires within milliseconds of it.

    The engine refills its own slots, so polling only observes. A triggerer restart, shutdown or
    redistribution leaves the batch running; a user's kill, clear or mark stops it.

    :param uuid_parent: the batch.
    :param postgres_conn_id: Airflow connection of the role that submitted it.
    :param poll_interval: seconds between polls.
    :param deadline: epoch seconds after which the batch is stopped (the task's execution_timeout).
    :param claim: the try's claim on the batch; a kill stops the batch only while it still holds.
    """

    def __init__(
        self,
        uuid_parent: str,
        postgres_conn_id: str,
        *,
        database: str | None = None,
        engine_schema: str = DEFAULT_SCHEMA,
        poll_interval: float = 5.0,
        deadline: float | None = None,
        claim: str | None = None,
    ) -> None:
        super().__init__()
        self.uuid_parent = uuid_parent
        self.postgres_conn_id = postgres_conn_id
        self.database = database
        self.engine_schema = engine_schema
        self.poll_interval = poll_interval
        self.deadline = deadline
        self.claim = claim

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
            },
        )

    def _hook(self) -> PgBackgroundHook:
        return PgBackgroundHook(
            postgres_conn_id=self.postgres_conn_id, database=self.database, engine_schema=self.engine_schema
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = self._hook()
        event = {"uuid_parent": self.uuid_parent}
        try:
            async with hook.async_connection(trigger_application_name(self.uuid_parent, self.claim)) as conn:
                while True:
                    # The database waits up to poll_interval and answers as soon as the batch ends.
                    poll = asyncio.ensure_future(hook.apoll(conn, self.uuid_parent, wait=self.poll_interval))
                    try:
                        # Shielded, so a cancellation reaches run() as sent: the triggerer tells a
                        # user's kill from a shutdown by its message, which psycopg would not keep.
                        state = await asyncio.shield(poll)
                    except asyncio.CancelledError:
                        poll.cancel()
                        raise
                    if state is None:
                        yield TriggerEvent(
                            {**event, "status": "error", "message": f"batch {self.uuid_parent} not found"}
                        )
                        return
                    if state.is_final:
                        yield TriggerEvent(
                            {
                                **event,
                                "status": "ended",
                                "batch_status": state.status.value,
                                "counts": state.counts_json(),
                            }
                        )
                        return
                    if self.deadline is not None and time.time() >= self.deadline:
                        stopped = await hook.astop(self.uuid_parent, if_claimed_by=self.claim)
                        yield TriggerEvent({**event, "status": "timeout", "stopped": stopped})
                        return
                    self.log.debug("batch %s: %s %s", self.uuid_parent, state.status.value, state.counts_json())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a database error becomes a task failure with its message
            yield TriggerEvent({**event, "status": "error", "message": f"{type(exc).__name__}: {exc}"})

    async def on_kill(self) -> None:
        """A user marked the deferred task failed or success, or cleared it: stop the batch."""
        stopped = await self._hook().astop(self.uuid_parent, if_claimed_by=self.claim)
        self.log.info("Stopped batch %s (%d children) on user request", self.uuid_parent, stopped)

    async def cleanup(self) -> None:
        if HAS_TRIGGER_ON_KILL:
            return  # on_kill() handles user actions; a restart must not stop anything
        if await self._task_left_deferral():
            await self.on_kill()

    async def _task_left_deferral(self) -> bool:
        """Airflow < 3.3: the task instance is no longer deferred, so a user acted on it."""
        ti = self.task_instance
        if ti is None:
            return False
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance
        from asgiref.sync import sync_to_async

        states = await sync_to_async(RuntimeTaskInstance.get_task_states)(
            dag_id=ti.dag_id,
            task_ids=[ti.task_id],
            run_ids=[ti.run_id],
            map_index=None if ti.map_index < 0 else ti.map_index,
        )
        found = [state for run in states.values() for state in run.values()]
        return bool(found) and all(state != "deferred" for state in found)
