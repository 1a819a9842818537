"""Splitting SQL text into statements by PostgreSQL's grammar (sqlparse), for the operator and the
trigger: one way from a task's ``sql`` to the statements of its batch, wherever it launches."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import sqlparse
from sqlparse import tokens as T
from sqlparse.lexer import Lexer

from airflow_pgbg.status import DEFAULT_DELIMITER

_LONG_SCRIPT = 10_000
"""Characters past which a script is split in a thread: sqlparse takes seconds on long ones."""


def _is_noise(ttype: T._TokenType, value: str) -> bool:
    return (
        ttype in T.Whitespace or ttype in T.Comment or ttype in T.Newline or (ttype in T.Punctuation and value == ";")
    )


def split_statements(sql: str) -> list[str]:
    """The statements of ``sql`` without their terminating semicolons.

    Dollar-quoted bodies, ``BEGIN ATOMIC ... END`` bodies, comments, ``E''`` strings and quoted
    identifiers stay whole. Pieces made only of comments, blanks or semicolons are dropped; comments
    inside or after a statement are kept with it.
    """
    if ";" not in sql and "--" not in sql and "/*" not in sql:
        # Nothing to split and nothing to drop (the common case of a list of statements): sqlparse
        # costs most of a millisecond per statement.
        return [sql.strip()] if sql.strip() else []
    statements: list[str] = []
    lexer = Lexer.get_default_instance()
    for piece in sqlparse.split(sql, strip_semicolon=False):
        tokens = list(lexer.get_tokens(piece))
        meaningful = [i for i, (ttype, value) in enumerate(tokens) if not _is_noise(ttype, value)]
        if not meaningful:
            continue
        last = meaningful[-1]
        # Drop the semicolons that end the statement, keep a trailing comment.
        kept = "".join(
            value
            for i, (ttype, value) in enumerate(tokens)
            if not (i > last and ttype in T.Punctuation and value == ";")
        )
        statements.append(kept.strip())
    return statements


def sql_parts(sql: Any) -> list[str]:
    """The texts of a task's ``sql`` (a string or a list of them); ValueError when there is none."""
    parts = [sql] if isinstance(sql, str) else list(sql or [])
    if not parts or not all(isinstance(p, str) for p in parts) or not any(p.strip() for p in parts):
        raise ValueError("sql is empty: no SQL statement to run")
    return parts


def _some(statements: list[str]) -> list[str]:
    if not statements:
        raise ValueError("no SQL statement to run (only blanks or comments)")
    return statements


def split_sql(sql: Any, delimiter: str, split_other: Callable[[str, str], list[str]]) -> list[str]:
    """The statements of a task's ``sql``: split by PostgreSQL's grammar for ``;``, else by
    ``split_other(text, delimiter)`` (the engine's scanner). ValueError when there is none."""
    out: list[str] = []
    for part in sql_parts(sql):
        out.extend(split_statements(part) if delimiter == DEFAULT_DELIMITER else split_other(part, delimiter))
    return _some(out)


async def asplit_sql(sql: Any, delimiter: str, split_other: Callable[[str, str], Awaitable[list[str]]]) -> list[str]:
    """:func:`split_sql` on an event loop that serves other work: long scripts are parsed in a thread."""
    out: list[str] = []
    for part in sql_parts(sql):
        if delimiter != DEFAULT_DELIMITER:
            out.extend(await split_other(part, delimiter))
        elif len(part) > _LONG_SCRIPT:
            out.extend(await asyncio.to_thread(split_statements, part))
        else:
            out.extend(split_statements(part))
    return _some(out)
