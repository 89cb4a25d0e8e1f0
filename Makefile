# The two commands of the README: `make run` (the embedded default) and `make test` (the whole suite).
# Both create .venv and install what is missing on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
export MLFLOW_TRACKING_URI ?= sqlite:///mlruns.db
export MLFLOW_DISABLE_TELEMETRY ?= true

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" mlflow run . -e main --env-manager local --experiment-name bin-counter

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

# the edit loop: everything but the end-to-end trainings and servers marked slow
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" --durations=15

# the team setup: PostgreSQL + S3 (a local moto server) + `mlflow server`, in the background.
# Then `source .team-server/env`: the tracking URI and the server's basic-auth credentials.
server: $(VENV)/.installed
	@$(PY) tools/team_server.py start

server-stop:
	@$(PY) tools/team_server.py stop

# ruff, configured in pyproject.toml; CI runs it before the tests
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

benchmarks: $(VENV)/.installed
	for b in experiments/benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

.PHONY: install run lint test test-fast benchmarks server server-stop
