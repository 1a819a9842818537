"""Builds the engine's installable SQL files from its sources.

    python scripts/build_engine.py            # (re)writes the files of the version in development
    python scripts/build_engine.py --check    # exit 1 if they are stale or a released file changed

Sources (airflow_pgbg/sql/):
- ``src/NN_*.sql``, in file-name order, one concern each: together they install the engine;
- ``src/05_tables.sql`` among them holds the tables (the engine's state, their triggers and trigger
  functions too); everything after it (routines, views, row types, grants) holds none, so an upgrade
  drops what the installed engine has of those and creates them anew: they are never copied by hand;
- ``migrations/R--V.sql``: the hand-written step that changes the tables of engine R into those of
  V; an upgrade runs it where a fresh install runs the tables file.

Built (committed, and kept equal to the sources by a test):
- ``pgbg--V.sql``: installs V from nothing;
- ``pgbg--R--V.sql``: upgrades the latest release R to V.

``RELEASED`` lists the sha256 of every file of a released version: those never change, and this
script refuses to write them. V is ``airflow_pgbg.ENGINE_VERSION``.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

SQL = Path(__file__).resolve().parent.parent / "airflow_pgbg" / "sql"
SOURCES = SQL / "src"
TABLES = "05_tables.sql"
MIGRATIONS = SQL / "migrations"
RELEASED = SQL / "RELEASED"

# A migration may name routines of the engine it upgrades that must outlive the upgrade (runners of
# that version still call them while they finish): "-- keep: name(argtype, ...)" lines.
_KEEP = re.compile(r"^-- keep: (\S+\(.*\))$", re.MULTILINE)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def engine_version() -> str:
    text = (SQL.parent / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^ENGINE_VERSION = "([0-9.]+)"$', text, re.MULTILINE)
    if match is None:
        raise SystemExit("ENGINE_VERSION not found in airflow_pgbg/__init__.py")
    return match.group(1)


def released() -> dict[str, str]:
    """File name -> sha256 of every file of a released engine version."""
    out: dict[str, str] = {}
    for line in RELEASED.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split()
            out[name] = digest
    return out


def released_versions() -> list[str]:
    names = (re.fullmatch(r"pgbg--([0-9.]+)\.sql", n) for n in released())
    return sorted((m.group(1) for m in names if m), key=_version_key)


def _sources(*, tables: str | None = None) -> str:
    """The sources in order; ``tables`` (an upgrade's drop and migration) replaces the tables file."""
    parts = []
    for path in sorted(SOURCES.glob("[0-9][0-9]_*.sql")):
        text = path.read_text(encoding="utf-8") if tables is None or path.name != TABLES else tables
        parts.append(text.rstrip("\n"))
    return "\n\n".join(parts) + "\n"


def _header(title: str, body: str) -> str:
    lines = [f"-- airflow_pgbg engine: {title}", "--", *(f"-- {line}".rstrip() for line in body.splitlines())]
    return "\n".join(lines) + "\n\n"


_RENDERING = (
    "Built by scripts/build_engine.py from airflow_pgbg/sql/src and airflow_pgbg/sql/migrations: edit those,\n"
    "not this file. The installer (python -m airflow_pgbg install) renders @schema@ as the engine's schema\n"
    "and @pgbg_ext@ as the schema of the pg_background extension (the engine's schema where the server\n"
    "has none)."
)


def base_script(version: str) -> str:
    return _header(f"version {version}, installed from nothing.", _RENDERING) + _sources()


def _drop_block(keep: list[str]) -> str:
    # An empty list must still be an array: "x = ANY (ARRAY[NULL])" is NULL, which would keep every routine.
    kept = ", ".join(f"'{k}'" for k in keep)
    return f"""-- Every routine, view and row type of the engine being upgraded goes, to be created anew below.
-- Drops that others depend on are tried again once those have gone; an object outside the set
-- that depends on one (a view of your own on {{schema}}.batches, say) stops the upgrade, naming it.
DO $drop$
DECLARE
    v_left text[];
    v_failed text[];
    v_object text;
    v_path text := current_setting('search_path');
BEGIN
    -- Names print unqualified on this path (the keep list is written so).
    PERFORM set_config('search_path', '@schema@, @pgbg_ext@, pg_catalog', true);
    v_left := ARRAY(
        SELECT CASE p.prokind WHEN 'p' THEN 'PROCEDURE ' ELSE 'FUNCTION ' END || p.oid::regprocedure::text
          FROM pg_proc p
         WHERE p.pronamespace = '@schema@'::regnamespace
           AND NOT p.oid::regprocedure::text = ANY (ARRAY[{kept}]::text[])
           -- A trigger function belongs to its table's state (the tables file and migrations/).
           AND p.prorettype <> 'pg_catalog.trigger'::regtype
        UNION ALL
        SELECT CASE c.relkind WHEN 'v' THEN 'VIEW ' ELSE 'TYPE ' END || c.oid::regclass::text
          FROM pg_class c
         WHERE c.relnamespace = '@schema@'::regnamespace AND c.relkind IN ('v', 'c'));
    WHILE cardinality(v_left) > 0 LOOP
        v_failed := '{{}}';
        FOREACH v_object IN ARRAY v_left LOOP
            BEGIN
                EXECUTE 'DROP ' || v_object;
            EXCEPTION WHEN dependent_objects_still_exist THEN
                v_failed := v_failed || v_object;
            END;
        END LOOP;
        IF v_failed = v_left THEN
            RAISE EXCEPTION 'cannot upgrade the engine: other objects depend on %', array_to_string(v_left, ', ')
                USING ERRCODE = 'dependent_objects_still_exist',
                      HINT = 'Drop what depends on the engine''s routines and views, upgrade, then create it again.';
        END IF;
        v_left := v_failed;
    END LOOP;
    PERFORM set_config('search_path', v_path, true);
END
$drop$;
""".replace("{schema}", "@schema@")


def upgrade_script(old: str, version: str) -> str:
    migration = (MIGRATIONS / f"{old}--{version}.sql").read_text(encoding="utf-8")
    header = _header(f"upgrade {old} -> {version}.", _RENDERING)
    return header + _sources(tables=_drop_block(_KEEP.findall(migration)) + "\n" + migration)


def built_files() -> dict[str, str]:
    """What the sources build for the version in development: file name -> text. Nothing when that
    version is released (its files are frozen)."""
    version = engine_version()
    if f"pgbg--{version}.sql" in released():
        return {}
    files = {f"pgbg--{version}.sql": base_script(version)}
    older = [v for v in released_versions() if _version_key(v) < _version_key(version)]
    if older:
        files[f"pgbg--{older[-1]}--{version}.sql"] = upgrade_script(older[-1], version)
    return files


def problems() -> list[str]:
    found = []
    version = engine_version()
    frozen = SQL / f"pgbg--{version}.sql"
    if (
        f"pgbg--{version}.sql" in released()
        and frozen.exists()
        and frozen.read_text(encoding="utf-8") != base_script(version)
    ):
        found.append(
            f"the sources changed since engine {version} was released: set ENGINE_VERSION to the next "
            f"version, add migrations/{version}--<next>.sql, and run python scripts/build_engine.py"
        )
    for name, text in built_files().items():
        path = SQL / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            found.append(f"{name} is not what its sources build: run python scripts/build_engine.py")
    for name, digest in released().items():
        path = SQL / name
        if not path.exists():
            found.append(f"{name} of a released engine is missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            found.append(f"{name} of a released engine changed: release a new version instead")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if anything is stale")
    args = parser.parse_args()
    if args.check:
        found = problems()
        for problem in found:
            print(problem, file=sys.stderr)
        return 1 if found else 0
    frozen = released()
    for name, text in built_files().items():
        if name in frozen:
            raise SystemExit(f"refusing to write {name}: it belongs to a released engine")
        (SQL / name).write_text(text, encoding="utf-8")
        print(f"built airflow_pgbg/sql/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
