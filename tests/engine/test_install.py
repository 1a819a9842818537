"""Installing and upgrading the engine, from Python and from the command line."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from airflow_pgbg import ENGINE_VERSION
from airflow_pgbg.hooks.install import EngineInstallError, PgBackgroundMissing, SqlScripts, install_engine_dsn
from tests.conftest import REPO
from tests.engine.catalog import catalog
from tests.helpers import gate, poll_until


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "airflow_pgbg", *args], capture_output=True, text=True, cwd=REPO)


@pytest.fixture
def fresh_db(dsn: str, launcher: str) -> Iterator[str]:
    """An empty database on the test server; its DSN."""
    if launcher != "pg_background":
        # pg_cron runs jobs only in its own database (cron.database_name); test_pg_cron covers it.
        pytest.skip("needs pg_background: the engine cannot run on pg_cron in another database")
    name = f"pgbg_db_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    params = conninfo_to_dict(dsn)
    params["dbname"] = name
    yield make_conninfo(**params)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_install_twice_is_idempotent_and_keeps_data(fresh_db: str) -> None:
    first = _cli("install", "--dsn", fresh_db)
    assert first.returncode == 0, first.stderr
    assert "installed" in first.stdout
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        parent = conn.execute("SELECT pgbg.pg_background_launch_num('select 1')").fetchone()[0]
    assert _cli("install", "--dsn", fresh_db).returncode == 0
    assert install_engine_dsn(fresh_db) == ENGINE_VERSION
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM pgbg.meta").fetchone()[0] == ENGINE_VERSION
        assert (
            conn.execute("SELECT status::text FROM pgbg.log_background WHERE uuid_parent = %s", (parent,)).fetchone()[0]
            == "done"
        )


def test_install_into_another_schema(fresh_db: str) -> None:
    assert install_engine_dsn(fresh_db, schema="batches") == ENGINE_VERSION
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        parent = conn.execute("SELECT batches.pg_background_launch_num('select 6 * 7 as n')").fetchone()[0]
        row = conn.execute("SELECT result FROM batches.log_background WHERE uuid_parent = %s", (parent,)).fetchone()
        assert row[0]["preview"] == [{"n": 42}]
        assert conn.execute("SELECT to_regclass('pgbg.log_background')").fetchone()[0] is None


def test_missing_extension_is_refused_with_the_package_name(fresh_db: str) -> None:
    with psycopg.connect(fresh_db) as conn:
        major = conn.execute("SELECT current_setting('server_version_num')::int / 10000").fetchone()[0]
    if major < 18:
        pytest.skip("hiding an available extension needs extension_control_path (PostgreSQL 18)")
    # A real server whose extension directory holds no pg_background.
    hidden = make_conninfo(fresh_db, options="-c extension_control_path=/nonexistent")
    result = _cli("install", "--dsn", hidden)
    assert result.returncode == 2
    assert f"postgresql-{major}-pg-background" in result.stderr
    with pytest.raises(PgBackgroundMissing):
        install_engine_dsn(hidden)
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT to_regnamespace('pgbg')").fetchone()[0] is None  # nothing half-done


def test_upgrade_plans_follow_the_shipped_scripts() -> None:
    scripts = SqlScripts.load()
    assert scripts.latest == ENGINE_VERSION
    assert [v for v, _ in scripts.plan(None)][-1] == ENGINE_VERSION
    assert scripts.plan(ENGINE_VERSION) == []
    with pytest.raises(EngineInstallError, match="no upgrade path"):
        scripts.plan("0.0.1")


def test_the_built_engine_files_are_what_their_sources_build() -> None:
    """pgbg--<version>.sql and its upgrade script are built from src/ and migrations/, and the files of a
    released engine are byte for byte those of its release."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_engine.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_sql_command_prints_a_reviewable_script() -> None:
    result = _cli("sql", "--schema", "pgbg")
    assert result.returncode == 0
    assert "CREATE FUNCTION pgbg.pg_background_launch_num" in result.stdout
    assert "@schema@" not in result.stdout
    assert "@pgbg_ext@" not in result.stdout


def test_upgrade_while_a_batch_runs(fresh_db: str) -> None:
    """0.1.0 installed and running a batch; the upgrade lands mid-batch. The running batch ends right
    (its 0.1.0 runners finish it), a batch launched right after is run by 1.0.0 runners only, and the
    new features work."""
    assert install_engine_dsn(fresh_db, target="0.1.0") == "0.1.0"
    # The 0.1.0 children wait at a gate until the upgrade has returned, so it lands mid-batch however slow
    # the machine (6 x 0.7 s at 2 in parallel could end first).
    with psycopg.connect(fresh_db, autocommit=True) as conn, gate(fresh_db) as g:
        old = str(
            conn.execute(
                "SELECT pgbg.pg_background_launch_num(%s::text[], p_monitor => false, p_max_parallel => 2)",
                ([f"select {g.sql}"] * 6,),
            ).fetchone()[0]
        )
        poll_until(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM pgbg.log_background WHERE uuid_parent = %s AND status = 'running'", (old,)
                ).fetchone()[0]
                == 2
            ),
            20,
        )
        g.wait_for(2)
        assert install_engine_dsn(fresh_db) == ENGINE_VERSION
        assert (
            conn.execute(
                "SELECT count(*) FROM pgbg.log_background WHERE uuid_parent = %s AND status = 'queued'", (old,)
            ).fetchone()[0]
            == 4
        )
        g.open()
        assert conn.execute("SELECT counted FROM pgbg.batch WHERE uuid_parent = %s", (old,)).fetchone()[0] is False
        new = str(
            conn.execute(
                "SELECT pgbg.pg_background_launch_num(%s::text[], p_monitor => false, p_max_parallel => 2)",
                (["select pg_sleep(0.2)"] * 6,),
            ).fetchone()[0]
        )
        for parent in (old, new):
            assert conn.execute("SELECT pgbg.pg_background_wait(%s, '30 s')", (parent,)).fetchone()[0] == "done"
            row = conn.execute(
                "SELECT children, done, queued, running FROM pgbg.batches WHERE uuid_parent = %s", (parent,)
            ).fetchone()
            assert row == (6, 6, 0, 0), (parent, row)
        # What 1.0.0 adds works on the upgraded engine.
        retried = str(
            conn.execute(
                "SELECT pgbg.pg_background_launch_num(ARRAY['select 1/0'], p_monitor => false, p_retries => 1, "
                "p_retry_delay => '0 s')"
            ).fetchone()[0]
        )
        assert conn.execute("SELECT pgbg.pg_background_wait(%s, '30 s')", (retried,)).fetchone()[0] == "failed"
        assert (
            conn.execute("SELECT attempt FROM pgbg.log_background WHERE uuid_parent = %s", (retried,)).fetchone()[0]
            == 1
        )  # 22012 is not transient
        polled = conn.execute(
            "SELECT count(*) FROM pgbg.pg_background_poll_many(%s::uuid[])", ([old, new, retried],)
        ).fetchone()[0]
        assert polled == 3


def test_a_fresh_install_and_an_upgraded_one_are_the_same_engine(dsn: str, fresh_db: str) -> None:
    """pgbg--<latest>.sql installs from nothing what the chain of upgrade scripts reaches from 0.1.0."""
    params = conninfo_to_dict(fresh_db)
    chain = f"{params['dbname']}_chain"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {chain}")
    try:
        upgraded = make_conninfo(fresh_db, dbname=chain)
        install_engine_dsn(upgraded, target="0.1.0")
        install_engine_dsn(upgraded)
        install_engine_dsn(fresh_db)
        fresh, chained = catalog(fresh_db), catalog(upgraded)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {chain} WITH (FORCE)")
    for kind in fresh:
        if kind == "routines":
            # Kept on upgraded engines for runners of 0.1.0 that finish during the upgrade, and for the
            # pg_cron jobs of 1.0.1's children.
            extra = {r[0] for r in chained[kind] - fresh[kind]}
            assert extra == {
                "pgbg._launch_top_level(text,uuid,interval)",
                "pgbg._top_level_result(pg_background_handle)",
                "pgbg._cron_exec(uuid,text,text)",
            }, extra
            assert fresh[kind] <= chained[kind], fresh[kind] - chained[kind]
        else:
            assert fresh[kind] == chained[kind], (kind, fresh[kind] ^ chained[kind])
