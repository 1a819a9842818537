# Everything a fresh clone needs: `make demo` and `make test` set up the virtualenv and the database.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv db test test-engine demo bench ui clean

venv: $(STAMP)

# constraints.txt pins the whole tested dependency set, the way Airflow recommends.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

# Provisions (cached) and starts PostgreSQL 18 with pg_background; prints the DSN last.
db:
	@bash scripts/db.sh

# With PGBG_TEST_DSN set to a server of your own, tests that need more local servers are skipped.
test: venv
	@bash scripts/browser.sh >/dev/null
	@ext=$${PGBG_TEST_DSN:+1}; dsn=$$(bash scripts/db.sh | tail -n 1) && \
	PGBG_EXTERNAL_SERVER=$$ext PGBG_TEST_DSN=$$dsn $(PY) -m pytest $(PYTEST_ARGS)

test-engine: venv
	@dsn=$$(bash scripts/db.sh | tail -n 1) && \
	PGBG_TEST_DSN=$$dsn $(PY) -m pytest tests/engine $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# The main job: example_pgbg_basic end to end (DAG=<id> for another example DAG).
demo: venv
	@bash scripts/demo.sh $(DAG)

# Figures in bench/results.json (the engine against a thread pool and the seed's design).
bench: venv
	@PGBG_TEST_DSN=$$(bash scripts/db.sh | tail -n 1) $(PY) bench/bench.py

# The Airflow UI on the demo's home, with the batch view (after make demo).
ui: venv
	@bash scripts/ui.sh
