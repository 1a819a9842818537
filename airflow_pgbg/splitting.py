"""Splitting SQL text into statements by PostgreSQL's grammar (sqlparse), for the operator."""

from __future__ import annotations

import sqlparse
from sqlparse import tokens as T
from sqlparse.lexer import Lexer


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
