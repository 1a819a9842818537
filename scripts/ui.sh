#!/usr/bin/env bash
# make ui: the Airflow UI on the demo's Airflow home (run `make demo` first), with the batch view.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/airflow-env.sh
PORT=${PGBG_UI_PORT:-8080}
[ -f "$AIRFLOW_HOME/airflow.db" ] || { echo "ui: run make demo first" >&2; exit 1; }
bash scripts/db.sh >/dev/null
passwords=$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated
echo "ui: http://127.0.0.1:$PORT  user admin, password in $passwords (written at first start)"
echo "ui: open Dags > example_pgbg_basic > the run > build_summaries > tab 'PG Background'"
exec .venv/bin/airflow api-server --host 127.0.0.1 --port "$PORT"
