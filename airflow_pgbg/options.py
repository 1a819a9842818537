"""How a batch runs: one definition of its launch options for the operator, the trigger and the hook.

Each option is a field of :class:`BatchOptions`; its metadata names the engine's argument it becomes
(``pg_background_launch_num`` / ``pg_background_submit``) and the operator's argument it comes from,
so adding an option touches this class, the operator's signature and the engine.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

SettingValue = str | int | float | bool
"""What a setting may be given as; the engine receives its text, as ``SET`` would."""

_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)*")


def _option(engine: str, argument: str, *, seconds: bool = False) -> dict[str, Any]:
    return {"engine": engine, "argument": argument, "seconds": seconds}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class BatchOptions:
    """A batch's launch options, validated when made: bad ones raise ``ValueError`` before anything is
    launched. Durations are seconds."""

    max_parallel: int | None = field(default=None, metadata=_option("p_max_parallel", "max_parallel"))
    label: str | None = field(default=None, metadata=_option("p_label", "batch_label"))
    fail_fast: bool = field(default=False, metadata=_option("p_fail_fast", "fail_fast"))
    statement_timeout: float | None = field(
        default=None, metadata=_option("p_statement_timeout", "statement_timeout", seconds=True)
    )
    retries: int = field(default=0, metadata=_option("p_retries", "statement_retries"))
    retry_delay: float = field(default=1.0, metadata=_option("p_retry_delay", "statement_retry_delay", seconds=True))
    retry_backoff: float = field(default=2.0, metadata=_option("p_retry_backoff", "statement_retry_backoff"))
    retry_lost: bool = field(default=False, metadata=_option("p_retry_lost", "retry_lost"))
    settings: Mapping[str, SettingValue] | None = field(
        default=None, metadata=_option("p_settings", "session_settings")
    )
    """Set for every child on top of its role's defaults (``work_mem``, ``lock_timeout``, ``search_path``,
    ...); the engine checks each against the server and refuses what the role may not set."""

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """What is wrong with these options, named by the operator's arguments; None when nothing is."""
        if self.max_parallel is not None and (not _is_count(self.max_parallel) or self.max_parallel <= 0):
            return f"max_parallel must be a positive integer, got {self.max_parallel!r}"
        if self.label is not None and not isinstance(self.label, str):
            return f"batch_label must be text, got {type(self.label).__name__}"
        if self.statement_timeout is not None and (
            not _is_number(self.statement_timeout) or self.statement_timeout <= 0
        ):
            return f"statement_timeout must be positive, got {self.statement_timeout!r}"
        if not _is_count(self.retries) or self.retries < 0:
            return f"statement_retries must be an integer >= 0, got {self.retries!r}"
        if not _is_number(self.retry_delay) or self.retry_delay < 0:
            return f"statement_retry_delay must be 0 or more, got {self.retry_delay!r}"
        if not _is_number(self.retry_backoff) or self.retry_backoff < 1:
            return f"statement_retry_backoff must be a number >= 1, got {self.retry_backoff!r}"
        return _settings_problem(self.settings)

    @classmethod
    def sql_arguments(cls) -> sql.Composed:
        """The engine's named arguments, each bound to the placeholder of its field (``%(name)s``)."""
        parts = []
        for f in fields(cls):
            value: sql.Composable = sql.Placeholder(f.name)
            if f.metadata["seconds"]:
                value = sql.SQL("make_interval(secs => {})").format(value)
            parts.append(sql.SQL("{} => {}").format(sql.Identifier(f.metadata["engine"]), value))
        return sql.SQL(", ").join(parts)

    def sql_params(self) -> dict[str, Any]:
        """The values for :meth:`sql_arguments`."""
        params = {f.name: getattr(self, f.name) for f in fields(self)}
        params["settings"] = Jsonb(self.settings_text()) if self.settings else None
        return params

    def settings_text(self) -> dict[str, str]:
        """The settings as the engine takes them: text, as ``SET`` would write them."""
        return {name: _setting_text(value) for name, value in (self.settings or {}).items()}

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable form, which :meth:`from_json` reads back (the trigger's arguments)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["settings"] = dict(self.settings) if self.settings is not None else None
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BatchOptions:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown batch options: {', '.join(sorted(unknown))}")
        return cls(**data)


def _setting_text(value: SettingValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _settings_problem(settings: Any) -> str | None:
    if settings is None:
        return None
    if not isinstance(settings, Mapping):
        return f"session_settings must be a dict of setting names and values, not {type(settings).__name__}"
    for name, value in settings.items():
        if not isinstance(name, str) or not _SETTING_NAME.fullmatch(name):
            return f"session_settings: {name!r} is not the name of a PostgreSQL setting"
        if not isinstance(value, (str, int, float)):  # bool is an int
            return (
                f"session_settings: the value of {name} must be text, a number or a boolean, not {type(value).__name__}"
            )
    return None


__all__ = ["BatchOptions", "SettingValue"]
