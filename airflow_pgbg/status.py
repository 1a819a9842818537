"""The vocabulary shared by the engine and the Airflow layer.

The engine defines the child statuses as the enum ``child_status`` and the monitor row as the type
``monitor_row`` (``sql/pgbg--*.sql``); this module mirrors both for Python, and a test compares them
with what an installed engine reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

DEFAULT_SCHEMA = "pgbg"
"""Schema the engine is installed in unless told otherwise."""

DEFAULT_DELIMITER = ";"


class ChildStatus(StrEnum):
    """Status of one child statement, and of a batch as a whole (see ``batch_status()``)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"
    LOST = "lost"

    @property
    def is_final(self) -> bool:
        return self not in ACTIVE_STATUSES


ACTIVE_STATUSES = frozenset({ChildStatus.QUEUED, ChildStatus.RUNNING})
FINAL_STATUSES = frozenset(set(ChildStatus) - ACTIVE_STATUSES)
PROBLEM_STATUSES = frozenset({ChildStatus.FAILED.value, ChildStatus.STOPPED.value, ChildStatus.LOST.value})
"""Children (and batches) that did not do their work; the console shows them first in a failed batch."""

CONSOLE_SORTS = ("seq", "status", "start", "duration", "queue_wait")
"""Orders of the engine's pg_background_children_page() (its _console_sorts())."""

MONITOR_COLUMNS = (
    "uuid_parent",
    "uuid_child",
    "seq",
    "label",
    "pid",
    "status",
    "query",
    "result",
    "error",
    "sqlstate",
    "queued_time",
    "start_time_exec",
    "end_time_exec",
    "duration",
    "attempt",
    "user_name",
    "run_mode",
    "not_before",
    "errors",
)
"""Columns of ``pg_background_monitor()``, in order."""


@dataclass(frozen=True)
class BatchState:
    """One row of the engine's ``batches`` view: a batch's status and its counts per child status."""

    uuid_parent: str
    status: ChildStatus
    children: int
    counts: dict[ChildStatus, int]
    label: str | None = None
    origin: str | None = None
    max_parallel: int | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    settings: dict[str, str] | None = None
    """What every child runs with on top of its role's defaults (engine 1.1)."""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> BatchState:
        return cls(
            uuid_parent=str(row["uuid_parent"]),
            status=ChildStatus(row["status"]),
            children=int(row["children"]),
            counts={s: int(row[s.value]) for s in ChildStatus},
            label=row.get("label"),
            origin=row.get("origin"),
            max_parallel=row.get("max_parallel"),
            started_at=row.get("started_at"),
            ended_at=row.get("ended_at"),
            settings=row.get("session_settings"),
        )

    @property
    def is_final(self) -> bool:
        return self.status.is_final

    def counts_json(self) -> dict[str, int]:
        return {s.value: n for s, n in self.counts.items()}
