#!/usr/bin/env bash
# make demo: an example DAG end to end on the local PostgreSQL 18 with pg_background.
# Sets up the database, the engine, a demo role and a throwaway Airflow home (.airflow-home),
# runs example_pgbg_basic with `airflow dags test` (the trigger runs for real, in-process),
# then prints the batch's log_background rows.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DSN=$(bash scripts/db.sh | tail -n 1)
source scripts/airflow-env.sh
DAG=${1:-example_pgbg_basic}

echo "== engine"
$PY -m airflow_pgbg install --dsn "$DSN"

echo "== demo role pgbg_demo (member of pgbg_user) and its tables"
psql "$DSN" -qX -v ON_ERROR_STOP=1 -f scripts/demo_setup.sql
# An ordinary Airflow connection: the role is all the engine needs (the server trusts loopback here).
DEMO_URI=$($PY - "$DSN" <<'PY'
import sys
from psycopg.conninfo import conninfo_to_dict
p = conninfo_to_dict(sys.argv[1])
print("postgresql://pgbg_demo@%s:%s/%s" % (p.get("host", "localhost"), p.get("port", 5432), p.get("dbname", "postgres")))
PY
)

echo "== Airflow home $AIRFLOW_HOME"
.venv/bin/airflow db migrate >/dev/null
# Kept in the metadata database, so `make ui` (the API server) finds it too.
.venv/bin/airflow connections delete pgbg_demo >/dev/null 2>&1 || true
.venv/bin/airflow connections add pgbg_demo --conn-uri "$DEMO_URI" >/dev/null

echo "== airflow dags test $DAG"
.venv/bin/airflow dags test "$DAG" >"$AIRFLOW_HOME/demo-$DAG.log" 2>&1 || {
    tail -n 40 "$AIRFLOW_HOME/demo-$DAG.log"; echo "demo: $DAG failed (log: $AIRFLOW_HOME/demo-$DAG.log)"; exit 1; }
grep -E "Launched batch|ended|DAG TEST\] running trigger" "$AIRFLOW_HOME/demo-$DAG.log" | sed -E 's/^[^ ]+ +\[[a-z ]+\] +//' | cut -c1-160

echo "== log_background of the batch"
psql "$DSN" -X -v ON_ERROR_STOP=1 -v dag="$DAG/%" <<'SQL'
SELECT seq, status, pid, left(query, 60) AS query, result->>'command' AS result, sqlstate, error,
       to_char(start_time_exec, 'HH24:MI:SS.MS') AS started, round(extract(epoch FROM duration)::numeric, 3) AS seconds
  FROM pgbg.pg_background_monitor((SELECT uuid_parent FROM pgbg.batch WHERE origin LIKE :'dag'
                                    ORDER BY created_at DESC LIMIT 1), false);
SQL
