"""How a launch classifies its statements: the fast reading of the first keyword, which every statement
of a launch goes through, must say what the full reading of the statement's head says."""

from __future__ import annotations

import itertools

import psycopg

STATEMENTS = [
    "select 1",
    "SELECT x INTO t FROM y",
    "select 'into' from t",
    'select "into" from t',
    "select * from t where a = 1 into strict",
    "selectinto",
    "insert into t select 1",
    "update t set x = 1",
    "delete from t",
    "merge into t using s on true when matched then do nothing",
    "with x as (select 1) select * into t from x",
    "values (1)",
    "table t",
    "analyze t",
    "truncate t",
    "copy t from stdin",
    "vacuum t",
    "VACUUM (ANALYZE) t",
    "call p()",
    "do $$begin end$$",
    "cluster t",
    "reindex table t",
    "load 'x'",
    "create index concurrently i on t (x)",
    "CREATE INDEX i ON t (x)",
    "drop index concurrently i",
    "alter table t detach partition p concurrently",
    "alter system set work_mem = '1MB'",
    "create database d",
    "drop tablespace s",
    "set search_path = a",
    "set local work_mem = '1MB'",
    "reset all",
    "discard all",
    "select set_config('a.b', 'c', false)",
    "select 'set_config(' from t",
    "grant select on t to r",
    "notify x",
    "ÉCRIRE 1",
    "",
]
PREFIXES = [
    "",
    "  ",
    "\n\t",
    "(",
    "( (",
    "-- a comment\n",
    "/* c */ ",
    "/* a /* nested */ c */",
    " -- x\n /* y */(",
    "\v\f\r",
]

# What the engine's classifiers said before they read the first keyword (engine 1.1.1): the statement's
# head, after every leading comment.
FULL_READING = """
SELECT q,
       pgbg._needs_own_worker(q) AS own_worker,
       pgbg._statement_head(q) ~ ('^(VACUUM|CALL|DO|CLUSTER|REINDEX|SET|RESET|DISCARD|LOAD'
                                  '|ALTER SYSTEM|CREATE DATABASE|DROP DATABASE|ALTER DATABASE'
                                  '|CREATE TABLESPACE|DROP TABLESPACE)( |$)')
       OR (pgbg._statement_head(q) ~ '^(CREATE|DROP|ALTER) ' AND q ~* '\\m(INDEX|PARTITION)\\M.*\\mCONCURRENTLY\\M')
       OR (pgbg._statement_head(q) ~ '^SELECT( |$)' AND q ~* '\\mINTO\\M') AS own_worker_fully,
       pgbg._changes_session(q) AS changes,
       pgbg._statement_head(q) ~ '^(SET|RESET|DISCARD)( |$)'
       OR (q ~* 'set_config' AND pgbg._code_only(q) ~* '\\mset_config\\s*\\(') AS changes_fully,
       pgbg._statement_head(q) AS head,
       upper(regexp_replace(substring(pgbg._strip_leading_comments(q), '^([[:alpha:]]+(\\s+[[:alpha:]]+){0,3})'),
                            '\\s+', ' ', 'g')) AS head_fully
  FROM unnest(%s::text[]) AS q
"""


def test_the_first_keyword_decides_as_the_whole_head_does(admin: psycopg.Connection) -> None:
    corpus = [p + s for p, s in itertools.product(PREFIXES, STATEMENTS)]
    corpus += [q.upper() for q in corpus]
    rows = admin.execute(FULL_READING, (corpus,)).fetchall()
    differ = [row for row in rows if (row[1], row[3], row[5]) != (row[2], row[4], row[6])]
    assert not differ, differ
    # The corpus reaches both answers of both, past comments and parentheses too.
    own = {row[0] for row in rows if row[1]}
    changes = {row[0] for row in rows if row[3]}
    assert {"-- a comment\nvacuum t", "/* C */ SELECT X INTO T FROM Y", "(call p()"} <= own
    assert not {"(select 1", "-- a comment\nupdate t set x = 1", "analyze t"} & own
    assert {"/* c */ set search_path = a", "select set_config('a.b', 'c', false)"} <= changes
    assert not {"select 'set_config(' from t", "select 1"} & changes
