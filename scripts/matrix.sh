#!/usr/bin/env bash
# make matrix: the Airflow-facing suites on every Airflow minor the package claims, plus Python 3.13.
#
# Each Airflow minor gets a virtualenv of its own (.venv-airflow-X.Y) from its pinned constraints file
# (constraints-X.Y.txt; the newest minor is constraints.txt, the one `make test` uses) and runs the
# operator, trigger, example, UI and end-to-end suites against the same server; the engine suite,
# which does not touch Airflow, runs once, on the newest. On the older minors the end-to-end scenarios
# run on pg_background only: their pg_cron and PgBouncer variants differ from it in the engine and the
# pooler, not in what Airflow does (the same scheduler and triggerer calls; psycopg is pinned alike on
# every line), and `make test` runs them on the newest. The other Pythons the package claims (3.12,
# 3.13; `make test` runs 3.11) run the operator, trigger and example suites with the newest Airflow:
# from pyenv where the machine has it, else 3.13 from the Debian sid root of scripts/db.sh.
# Prints one line per line of the matrix and exits non-zero if any fails.
#
#   MATRIX="3.1 3.2 3.3 py3.12 py3.13" scripts/matrix.sh     (the default: all of them)
#   MATRIX_SUITES="tests/airflow/test_operator.py tests/e2e"   (override the suites of the Airflow lines)
#   MATRIX_OLDER_SELECT="..."                                  (pytest -k of the older minors; "" for all)
#   MATRIX_LOGS=DIR                                            (where the lines' logs go: .matrix-logs)
#   scripts/matrix.sh --venvs    only builds the lines' virtualenvs (no server starts: CI builds them
#                                before its groups, which have no network, scripts/ci.sh)
set -uo pipefail
cd "$(dirname "$0")/.."

LINES=${MATRIX:-"3.1 3.2 3.3 py3.12 py3.13"}
NEWEST=3.3
SUITES=${MATRIX_SUITES:-"tests/airflow tests/e2e tests/test_splitting.py"}
OLDER_SELECT=${MATRIX_OLDER_SELECT-"not pg_cron and not pgbouncer_tx"}
PY_SUITES="tests/airflow/test_operator.py tests/airflow/test_trigger.py tests/airflow/test_examples.py tests/airflow/test_lineage.py"
LOGS=${MATRIX_LOGS:-.matrix-logs}
PREPARE=0
[ "${1:-}" = --venvs ] && PREPARE=1
if [ $PREPARE = 0 ]; then
    DSN=$(bash scripts/db.sh | tail -n 1)
    bash scripts/browser.sh >/dev/null
fi
RESULTS=()
FAILED=0

constraints_of() { [ "$1" = "$NEWEST" ] && echo constraints.txt || echo "constraints-$1.txt"; }

interpreter() {  # 3.X -> a python3.X on this machine (pyenv's first: its shims may not run), or nothing
    local found
    found=$(ls -d "$HOME"/.pyenv/versions/"$1".*/bin/python"$1" 2>/dev/null | sort -V | tail -n 1)
    [ -n "$found" ] && { echo "$found"; return; }
    command -v "python$1" 2>/dev/null | grep -v /shims/ || true
}

venv_for() {  # minor [python] -> python of its virtualenv, created or refreshed from its constraints
    local minor=$1 python=${2:-python3} venv=".venv-airflow-$1" constraints
    [ "$python" != python3 ] && venv="$venv-py$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    constraints=$(constraints_of "$minor")
    if [ ! -f "$venv/.installed" ] || [ "$constraints" -nt "$venv/.installed" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
        echo "matrix: virtualenv $venv from $constraints" >&2
        rm -rf "$venv"
        "$python" -m venv "$venv" >&2 || return 1
        "$venv/bin/python" -m pip install -q --upgrade pip >&2 || return 1
        "$venv/bin/python" -m pip install -q -c "$constraints" -e '.[test]' >&2 || return 1
        touch "$venv/.installed"
    fi
    echo "$venv/bin/python"
}

summary_of() {  # pytest log -> "N passed, M failed"
    local line
    line=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error)" "$1" | tail -n 1 | sed -E 's/=//g; s/ in [0-9.]+s.*//; s/^ +//')
    echo "${line:-no result}"
}

run_line() {  # label, log, command...
    local label=$1 log=$2; shift 2
    local started=$SECONDS
    "$@" >"$log" 2>&1
    local rc=$?
    local outcome="ok"; [ $rc -ne 0 ] && { outcome="FAILED"; FAILED=1; }
    RESULTS+=("$(printf '%-28s %-6s %-40s %4ss  (%s)' "$label" "$outcome" "$(summary_of "$log")" $((SECONDS - started)) "$log")")
    # The log stays on the machine that ran it: what failed, and why, goes into the summary too.
    if [ $rc -ne 0 ]; then
        while IFS= read -r failure; do RESULTS+=("    $failure"); done < <(grep -E "^(FAILED|ERROR) " "$log" | cut -c1-300 | head -n 10)
    fi
}

mkdir -p "$LOGS"
for line in $LINES; do
    case "$line" in
        py3.*)
            version=${line#py}
            python=$(interpreter "$version")
            if [ -z "$python" ] && [ "$version" = 3.13 ]; then
                if [ $PREPARE = 1 ]; then
                    bash scripts/py313.sh --prepare || { RESULTS+=("Python 3.13 (sid root): could not build its virtualenv"); FAILED=1; }
                    continue
                fi
                # shellcheck disable=SC2086
                run_line "Python 3.13 (sid root), Airflow $NEWEST" "$LOGS/py3.13.log" bash scripts/py313.sh $PY_SUITES
                continue
            fi
            [ -n "$python" ] || { RESULTS+=("Python $version: no interpreter on this machine"); FAILED=1; continue; }
            py=$(venv_for "$NEWEST" "$python") || { RESULTS+=("Python $version: could not build its virtualenv"); FAILED=1; continue; }
            [ $PREPARE = 1 ] && continue
            # shellcheck disable=SC2086
            run_line "Airflow $NEWEST, Python $("$py" -c 'import platform; print(platform.python_version())')" \
                "$LOGS/py$version.log" env PGBG_TEST_DSN="$DSN" "$py" -m pytest -q -p no:cacheprovider $PY_SUITES ;;
        *)
            py=$(venv_for "$line") || { RESULTS+=("Airflow $line: could not build its virtualenv"); FAILED=1; continue; }
            [ $PREPARE = 1 ] && continue
            version=$("$py" -c "import airflow; print(airflow.__version__)" 2>/dev/null)
            suites=$SUITES
            select=()
            if [ "$line" = "$NEWEST" ]; then suites="tests/engine $suites"
            elif [ -n "$OLDER_SELECT" ]; then select=(-k "$OLDER_SELECT"); fi
            # shellcheck disable=SC2086
            run_line "Airflow $version, Python $("$py" -c 'import platform; print(platform.python_version())')" \
                "$LOGS/airflow-$line.log" env PGBG_TEST_DSN="$DSN" "$py" -m pytest -q -p no:cacheprovider "${select[@]}" $suites ;;
    esac
done

if [ $PREPARE = 1 ]; then
    [ ${#RESULTS[@]} -eq 0 ] || printf 'matrix: %s\n' "${RESULTS[@]}" >&2
    exit $FAILED
fi
echo
echo "matrix (logs in $LOGS/):"
printf '  %s\n' "${RESULTS[@]}"
exit $FAILED
