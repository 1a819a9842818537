# Everything a fresh clone needs: `make demo` and `make test` set up the virtualenv and the database.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv db engine test test-pg-cron test-deploy test-engine demo bench ui clean lint matrix dist-check ci

venv: $(STAMP)

# constraints.txt pins the whole tested dependency set, the way Airflow recommends.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,dev]'
	touch $@

# Provisions (cached) and starts PostgreSQL 18 with pg_background; prints the DSN last.
db:
	@bash scripts/db.sh

# With PGBG_TEST_DSN set to a server of your own, tests that need more local servers are skipped.
# Then the engine and the Airflow layer again on a server like a managed service (test-pg-cron).
test: venv
	@bash scripts/browser.sh >/dev/null
	@ext=$${PGBG_TEST_DSN:+1}; dsn=$$(bash scripts/db.sh | tail -n 1) && \
	PGBG_EXTERNAL_SERVER=$$ext PGBG_TEST_DSN=$$dsn $(PY) -m pytest $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory test-pg-cron

# A server with pg_cron and without pg_background, as RDS, Cloud SQL or Azure offer: the engine
# runs on pg_cron jobs there. PGBG_TEST_CRON_DSN names a server of your own instead.
test-pg-cron: venv
	@if [ -n "$$PGBG_TEST_DSN" ] && [ -z "$$PGBG_TEST_CRON_DSN" ]; then \
	    echo "test-pg-cron: skipped (PGBG_TEST_DSN set; PGBG_TEST_CRON_DSN names a pg_cron server)"; exit 0; fi; \
	dsn=$${PGBG_TEST_CRON_DSN:-$$(bash scripts/db.sh --instance managed --port 54321 --without pg_background | tail -n 1)} && \
	PGBG_EXTERNAL_SERVER=1 PGBG_TEST_DSN=$$dsn $(PY) -m pytest tests/engine tests/airflow $(PYTEST_ARGS)

# The deployment people run (tests/deploy): CeleryExecutor with Redis, two schedulers, triggerers and
# Celery workers, Airflow's metadata behind PgBouncer in transaction mode, and one triggerer waiting on
# twenty databases. Needs the local servers (scripts/db.sh); Redis and PgBouncer are installed by
# scripts/redis.sh and scripts/pgbouncer.sh.
test-deploy: venv
	@dsn=$$(bash scripts/db.sh | tail -n 1) && \
	ext=$${PGBG_TEST_DSN:+1}; PGBG_EXTERNAL_SERVER=$$ext PGBG_TEST_DSN=$$dsn $(PY) -m pytest tests/deploy $(PYTEST_ARGS)

test-engine: venv
	@dsn=$$(bash scripts/db.sh | tail -n 1) && \
	PGBG_TEST_DSN=$$dsn $(PY) -m pytest tests/engine $(PYTEST_ARGS)

clean:
	@bash scripts/ci.sh clean
	rm -rf $(VENV) .venv-airflow-* .matrix-logs .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info

# The engine's installable SQL (airflow_pgbg/sql/pgbg--*.sql) from its sources (airflow_pgbg/sql/src,
# airflow_pgbg/sql/migrations): run after editing them.
engine:
	@$(PYTHON) scripts/build_engine.py

# Lint, format and type checks (ruff, mypy; versions pinned in the dev extra), and built engine files
# that match their sources.
lint: venv
	$(PY) scripts/build_engine.py --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Every Airflow minor the package claims (constraints-X.Y.txt), and Pythons 3.10, 3.12, 3.13.
matrix: venv
	@bash scripts/matrix.sh

# The release build: sdist and wheel, twine check, the wheel in a clean virtualenv.
dist-check: venv
	@bash scripts/dist_check.sh

# What .ci/run does: the same as lint, test, test-deploy, dist-check and matrix, side by side where the
# machine allows (scripts/ci.sh).
ci:
	@bash .ci/run

# The main job: example_pgbg_basic end to end (DAG=<id> for another example DAG).
demo: venv
	@bash scripts/demo.sh $(DAG)

# Figures in bench/results.json (the engine against a thread pool and the seed's design), and the
# README's Performance and tuning tables rendered from them (bench/report.py, also runnable alone).
bench: venv
	@PGBG_TEST_DSN=$$(bash scripts/db.sh | tail -n 1) $(PY) bench/bench.py
	@$(PY) bench/report.py

# The Airflow UI on the demo's home, with the batch view (after make demo).
ui: venv
	@bash scripts/ui.sh
