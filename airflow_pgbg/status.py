"""The vocabulary shared by the engine and the Airflow layer.

The engine defines the child statuses as the enum ``child_status`` and the monitor row as the type
``monitor_row`` (``sql/pgbg--*.sql``); this module mirrors both for Python, and a test compares them
with what an installed engine reports.
"""

from __future__ import annotations

from enum import Enum

DEFAULT_SCHEMA = "pgbg"
"""Schema the engine is installed in unless told otherwise."""

DEFAULT_DELIMITER = ";"


class ChildStatus(str, Enum):
    """Status of one child statement, and of a batch as a whole (see ``batch_status()``)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"
    LOST = "lost"

    def __str__(self) -> str:
        return self.value

    @property
    def is_final(self) -> bool:
        return self not in ACTIVE_STATUSES


ACTIVE_STATUSES = frozenset({ChildStatus.QUEUED, ChildStatus.RUNNING})
FINAL_STATUSES = frozenset(set(ChildStatus) - ACTIVE_STATUSES)

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
)
"""Columns of ``pg_background_monitor()``, in order."""
