#!/usr/bin/env bash
# make dist-check: the release build, checked as a user would receive it.
# Builds the sdist and the wheel (python -m build), checks their metadata (twine check), installs the
# wheel into a clean virtualenv with the pinned dependencies, and checks there that Airflow lists the
# provider and that the engine's SQL, the typing marker and the plugin are in the package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=$(mktemp -d /tmp/pgbg-dist.XXXXXX)
trap 'rm -rf "$OUT"' EXIT

# From a copy of the tree (tracked files and new ones not ignored): building in the checkout rewrites its
# egg-info, which the test runs that share the checkout (scripts/ci.sh) read Airflow's plugins from.
mkdir "$OUT/src"
# shellcheck disable=SC2016  # the inner sh's own "$f"
git ls-files -z --cached --others --exclude-standard | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
    | tar --null -T - -cf - | tar -C "$OUT/src" -xf -
$PY -m build --outdir "$OUT/dist" "$OUT/src" >"$OUT/build.log" 2>&1 || { tail -n 30 "$OUT/build.log"; exit 1; }
$PY -m twine check --strict "$OUT"/dist/*
wheel=$(ls "$OUT"/dist/*.whl)

python3 -m venv "$OUT/venv"
"$OUT/venv/bin/python" -m pip install -q --upgrade pip
"$OUT/venv/bin/python" -m pip install -q -c constraints.txt "$wheel"
cd "$OUT"  # nothing of the source tree on the path
export AIRFLOW_HOME=$OUT/airflow-home
"$OUT/venv/bin/airflow" providers list -o plain 2>/dev/null | grep -E "^airflow-provider-pgbg[[:space:]]" \
    || { echo "dist-check: airflow providers list does not show airflow-provider-pgbg"; exit 1; }
"$OUT/venv/bin/python" - <<'PY'
from importlib import metadata, resources

import airflow_pgbg
from airflow_pgbg.hooks.install import SqlScripts

files = resources.files("airflow_pgbg")
assert "site-packages" in str(files), f"not the installed wheel: {files}"
scripts = SqlScripts.load()
assert scripts.latest == airflow_pgbg.ENGINE_VERSION, (scripts.latest, airflow_pgbg.ENGINE_VERSION)
assert files.joinpath("sql").joinpath("roles.sql").is_file()
assert files.joinpath("py.typed").is_file()
plugins = [ep for ep in metadata.entry_points(group="airflow.plugins") if ep.name == "airflow_pgbg"]
assert plugins and plugins[0].load().name == "airflow_pgbg"
print(f"dist-check: airflow-provider-pgbg {airflow_pgbg.__version__}, engine {scripts.latest}: "
      f"{len(scripts.bases)} install and {len(scripts.upgrades)} upgrade scripts, py.typed, plugin: ok")
PY
ls -1 "$OUT"/dist
