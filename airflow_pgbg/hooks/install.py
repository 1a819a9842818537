"""Install and upgrade the engine's SQL in a PostgreSQL database.

The engine ships as versioned files in ``airflow_pgbg/sql``: ``pgbg--X.sql`` installs version X from
nothing, ``pgbg--X--Y.sql`` upgrades X to Y (the layout PostgreSQL extensions use). This module needs
only a DB-API connection (psycopg 3 or psycopg2), so it works without Airflow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from airflow_pgbg.status import DEFAULT_SCHEMA

_BASE = re.compile(r"^pgbg--(\d+(?:\.\d+)*)\.sql$")
_UPGRADE = re.compile(r"^pgbg--(\d+(?:\.\d+)*)--(\d+(?:\.\d+)*)\.sql$")
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# Serializes concurrent installs into one database (two Airflow workers starting at once).
_INSTALL_LOCK = 0x70676267


class EngineInstallError(RuntimeError):
    """The engine cannot be installed; the message says what to do."""


class PgBackgroundMissing(EngineInstallError):
    """The server lacks pg_background with the v2 API (and, for the launcher auto, pg_cron too)."""


class PgCronUnusable(EngineInstallError):
    """pg_cron is missing, or set up in a way the engine cannot run on; the message says what to set."""


LAUNCHERS = ("auto", "pg_background", "pg_cron")
"""What starts the engine's runners: pg_background workers, pg_cron jobs, or whichever the server has."""


class InvalidSchemaName(EngineInstallError, ValueError):
    """An engine schema name that is not a plain lower-case SQL identifier."""


def version_key(version: str) -> tuple[int, ...]:
    """A version string as a tuple that compares like the version."""
    return tuple(int(p) for p in version.split("."))


def validate_schema(name: str) -> str:
    """``name`` if it is a plain lower-case identifier (the engine schema is pasted into SQL as one)."""
    if not isinstance(name, str) or not _IDENT.match(name):
        raise InvalidSchemaName(f"engine schema name {name!r} must be a lower-case SQL identifier ([a-z_][a-z0-9_]*)")
    return name


@dataclass(frozen=True)
class SqlScripts:
    """The engine's SQL files as shipped in the package."""

    bases: dict[str, str]
    upgrades: dict[str, tuple[str, str]]

    @classmethod
    def load(cls) -> SqlScripts:
        bases: dict[str, str] = {}
        upgrades: dict[str, tuple[str, str]] = {}
        for entry in resources.files("airflow_pgbg").joinpath("sql").iterdir():
            if m := _BASE.match(entry.name):
                bases[m.group(1)] = entry.read_text(encoding="utf-8")
            elif m := _UPGRADE.match(entry.name):
                upgrades[m.group(1)] = (m.group(2), entry.read_text(encoding="utf-8"))
        return cls(bases, upgrades)

    @property
    def latest(self) -> str:
        return max(set(self.bases) | {to for to, _ in self.upgrades.values()}, key=version_key)

    def plan(self, installed: str | None, target: str | None = None) -> list[tuple[str, str]]:
        """The scripts to run, as (version reached, sql), to bring ``installed`` to ``target``.

        ``target`` defaults to the latest version; an older one serves upgrade tests.
        """
        target = target or self.latest
        steps: list[tuple[str, str]] = []
        if installed is None:
            # The newest full install script at or below the target, then its upgrades.
            first = max((v for v in self.bases if version_key(v) <= version_key(target)), key=version_key)
            steps.append((first, self.bases[first]))
            current = first
        else:
            current = installed
        if version_key(current) > version_key(target):
            raise EngineInstallError(
                f"the engine installed in the database ({current}) is newer than {target}; "
                "upgrade airflow-provider-pgbg instead"
            )
        while current != target:
            if current not in self.upgrades:
                raise EngineInstallError(
                    f"no upgrade path from engine version {current} to {target}; "
                    "this package may be older than the engine installed in the database"
                )
            current, sql = self.upgrades[current]
            steps.append((current, sql))
        return steps


def roles_sql() -> str:
    return resources.files("airflow_pgbg").joinpath("sql").joinpath("roles.sql").read_text(encoding="utf-8")


def render(sql: str, schema: str, ext_schema: str) -> str:
    return sql.replace("@schema@", validate_schema(schema)).replace("@pgbg_ext@", validate_schema(ext_schema))


def _one(cur: Any, sql: str, params: tuple = ()) -> Any:
    cur.execute(sql, params)
    row = cur.fetchone()
    return None if row is None else row[0]


def _server_major(cur: Any) -> int:
    return int(_one(cur, "SELECT current_setting('server_version_num')::int / 10000"))


# The parts of pg_background's v2 API the engine calls (error_info and outcome came with 2.0).
_REQUIRED_FUNCTIONS = (
    "pg_background_launch_v2(text,integer)",
    "pg_background_submit_v2(text,integer)",
    "pg_background_detach_v2(integer,bigint)",
    "pg_background_wait_v2(integer,bigint,integer)",
    "pg_background_cancel_v2(integer,bigint,integer)",
    "pg_background_outcome_v2(integer,bigint)",
    "pg_background_error_info_v2(integer,bigint)",
)


def _ensure_pg_background(cur: Any) -> str:
    """Creates pg_background if needed and returns its schema; refuses without the v2 API."""
    major = _server_major(cur)
    package = f"postgresql-{major}-pg-background (apt.postgresql.org) or pg_background_{major} (yum.postgresql.org)"
    available = _one(cur, "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_background'")
    if available is None:
        raise PgBackgroundMissing(
            f"the pg_background extension is not available on this PostgreSQL {major} server; "
            f"install the package {package} on the database host, then run the installer again"
        )
    if version_key(available) < (1, 6):
        raise PgBackgroundMissing(
            f"pg_background {available} is too old: airflow_pgbg needs 1.6 or later (the v2 API); "
            f"upgrade the package {package}"
        )
    installed = _one(cur, "SELECT extversion FROM pg_extension WHERE extname = 'pg_background'")
    if installed is None:
        cur.execute("CREATE EXTENSION pg_background")
    elif version_key(installed) < (1, 6):
        cur.execute("ALTER EXTENSION pg_background UPDATE")
    ext_schema = _one(
        cur,
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
        "WHERE e.extname = 'pg_background'",
    )
    missing = [
        sig
        for sig in _REQUIRED_FUNCTIONS
        if _one(cur, "SELECT to_regprocedure(quote_ident(%s) || '.' || %s)", (ext_schema, sig)) is None
    ]
    if missing:
        raise PgBackgroundMissing(
            f"pg_background {installed or available} in this database lacks {', '.join(missing)}, which "
            f"airflow_pgbg uses; install {package} 2.0 or later and run ALTER EXTENSION pg_background UPDATE"
        )
    return ext_schema


def _setting(cur: Any, name: str) -> str | None:
    return _one(cur, "SELECT current_setting(%s, true)", (name,))


def _pg_background_available(cur: Any) -> bool:
    available = _one(cur, "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_background'")
    return available is not None and version_key(available) >= (1, 6)


def _pg_cron_preloaded(cur: Any) -> bool:
    libraries = [lib.strip() for lib in (_setting(cur, "shared_preload_libraries") or "").split(",")]
    return "pg_cron" in libraries or _setting(cur, "cron.database_name") is not None


def _ensure_pg_cron(cur: Any) -> None:
    """Creates pg_cron if needed; refuses, saying what to set, where the engine could not run on it."""
    database = _one(cur, "SELECT current_database()")
    if _one(cur, "SELECT 1 FROM pg_available_extensions WHERE name = 'pg_cron'") is None:
        raise PgCronUnusable(
            "the pg_cron extension is not available on this server; install it (postgresql-NN-cron, or enable "
            "it on your managed service), add pg_cron to shared_preload_libraries and restart"
        )
    if not _pg_cron_preloaded(cur):
        raise PgCronUnusable(
            "pg_cron is not loaded: add pg_cron to shared_preload_libraries (RDS/Aurora: the DB parameter group; "
            "Cloud SQL: the flag cloudsql.enable_pg_cron; Azure: the server parameter) and restart the server"
        )
    cron_database = _setting(cur, "cron.database_name") or "postgres"
    if cron_database != database:
        raise PgCronUnusable(
            f"pg_cron runs its jobs from the database {cron_database!r} (cron.database_name), and the engine "
            f"must live there to schedule its runners; install it in {cron_database!r}, or set "
            f"cron.database_name = {database!r} and restart"
        )
    if (_setting(cur, "cron.use_background_workers") or "off") != "on":
        raise PgCronUnusable(
            "cron.use_background_workers is off: pg_cron would connect over libpq (cron.host) as each "
            "submitting role, which needs a password it does not have; set cron.use_background_workers = on "
            "(and max_worker_processes high enough for cron.max_running_jobs) and restart"
        )
    cur.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
    # Runner jobs are scheduled by, and run as, the roles that submit batches.
    cur.execute("GRANT USAGE ON SCHEMA cron TO pgbg_user")


def choose_launcher(cur: Any, requested: str, installed: str | None) -> str:
    """The launcher to install: as requested; for auto, the one already installed if the server still
    offers it, else pg_background where available, else pg_cron; one clear error if neither."""
    if requested not in LAUNCHERS:
        raise EngineInstallError(f"launcher must be one of {', '.join(LAUNCHERS)}, not {requested!r}")
    if requested != "auto":
        return requested
    if installed == "pg_cron" or (installed is None and not _pg_background_available(cur)):
        if _one(cur, "SELECT 1 FROM pg_available_extensions WHERE name = 'pg_cron'") is None:
            major = _server_major(cur)
            raise PgBackgroundMissing(
                f"neither pg_background nor pg_cron is available on this PostgreSQL {major} server: install "
                f"postgresql-{major}-pg-background (apt.postgresql.org) or pg_background_{major} (yum.postgresql.org), "
                "or, on a managed service, enable pg_cron (shared_preload_libraries, cron.database_name set to this "
                "database, cron.use_background_workers = on)"
            )
        return "pg_cron"
    return "pg_background"


def installed_version(cur: Any, schema: str = DEFAULT_SCHEMA) -> str | None:
    """Engine version installed in ``schema``, or None."""
    if _one(cur, "SELECT to_regclass(quote_ident(%s) || '.meta')", (schema,)) is None:
        return None
    return _one(cur, f"SELECT version FROM {validate_schema(schema)}.meta")


def installed_launcher(cur: Any, schema: str = DEFAULT_SCHEMA) -> str | None:
    """The launcher recorded by an installed engine (pg_background before 0.3.0), or None."""
    if installed_version(cur, schema) is None:
        return None
    has_column = _one(
        cur,
        "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(quote_ident(%s) || '.settings') "
        "AND attname = 'launcher' AND NOT attisdropped",
        (schema,),
    )
    if not has_column:
        return "pg_background"
    return _one(cur, f"SELECT launcher FROM {validate_schema(schema)}.settings")


def install_engine(
    conn: Any, schema: str = DEFAULT_SCHEMA, *, target: str | None = None, launcher: str = "auto"
) -> str:
    """Installs or upgrades the engine in ``schema`` over a DB-API connection; returns the version.

    Idempotent, and atomic: everything happens in one transaction that is committed at the end.
    Needs a role allowed to create extensions and roles (normally a superuser). ``launcher`` (see
    :data:`LAUNCHERS`) is recorded in the engine; ``target`` stops at an older version than the latest
    (for upgrade tests).
    """
    scripts = SqlScripts.load()
    target = target or scripts.latest
    schema_sql = validate_schema(schema)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_INSTALL_LOCK,))
        major = _server_major(cur)
        if major < 15:
            # The engine uses security_invoker views and SQL-standard function bodies.
            raise EngineInstallError(f"airflow_pgbg needs PostgreSQL 15 or later; this server is {major}")
        chosen = choose_launcher(cur, launcher, installed_launcher(cur, schema))
        if chosen == "pg_cron" and version_key(target) < (0, 3, 0):
            raise EngineInstallError(f"the pg_cron launcher needs engine 0.3.0 or later, not {target}")
        if chosen == "pg_background" or _pg_background_available(cur):
            ext_schema = _ensure_pg_background(cur)
        else:
            # No pg_background here: its names in the engine are never reached under pg_cron, and
            # routines that name them are not compiled until they run.
            ext_schema = schema
            cur.execute("SET LOCAL check_function_bodies = off")
        cur.execute(roles_sql())
        if chosen == "pg_cron":
            _ensure_pg_cron(cur)
        current = installed_version(cur, schema)
        steps = scripts.plan(current, target)
        if steps and current is None:
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {schema_sql}")
        for version, sql in steps:
            cur.execute(render(sql, schema, ext_schema))
            cur.execute(
                f"INSERT INTO {schema_sql}.meta (version) VALUES (%s) "
                "ON CONFLICT (singleton) DO UPDATE SET version = excluded.version, installed_at = clock_timestamp()",
                (version,),
            )
        if version_key(target) >= (0, 3, 0):
            jobs = _setting(cur, "cron.max_running_jobs") if chosen == "pg_cron" else None
            cur.execute(
                f"UPDATE {schema_sql}.settings SET launcher = %s, cron_max_running_jobs = %s",
                (chosen, int(jobs) if jobs else None),
            )
    conn.commit()
    return target


def install_engine_dsn(
    dsn: str, schema: str = DEFAULT_SCHEMA, *, target: str | None = None, launcher: str = "auto"
) -> str:
    """:func:`install_engine` over a new psycopg connection to ``dsn``."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        return install_engine(conn, schema, target=target, launcher=launcher)
