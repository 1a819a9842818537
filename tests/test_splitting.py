"""The operator's statement splitting (sqlparse) on the cases that break naive splitters."""

from __future__ import annotations

from airflow_pgbg.splitting import split_statements


def test_bodies_strings_comments_and_identifiers_survive() -> None:
    sql = r"""
    create function f(a int) returns int language sql begin atomic select a + 1; select a + 2; end;
    create function g() returns int language plpgsql as $body$ begin return 1; end; $body$;
    select E'a\';b', 'x;y', "q;id" from t; -- trailing comment; with a semicolon
    /* block ; comment */ select 1;
    do $$ begin perform 1; end $$;
    -- only a comment;
    ;;
    select 2
    """
    assert split_statements(sql) == [
        "create function f(a int) returns int language sql begin atomic select a + 1; select a + 2; end",
        "create function g() returns int language plpgsql as $body$ begin return 1; end; $body$",
        "select E'a\\';b', 'x;y', \"q;id\" from t -- trailing comment; with a semicolon",
        "/* block ; comment */ select 1",
        "do $$ begin perform 1; end $$",
        "select 2",
    ]


def test_only_comments_and_blanks_give_nothing() -> None:
    assert split_statements("  -- nothing\n/* at all */ ;; \n") == []
