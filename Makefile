# wine_assets: make help lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
DAGSTER_YAML := $(DAGSTER_HOME)/dagster.yaml
HOST ?= 127.0.0.1
PORT ?= 3000

.DEFAULT_GOAL := help
.PHONY: help install run release test dev clean clean-all

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# The venv is rebuilt only when pyproject.toml is newer than the last install.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the package with its dev extras

$(DAGSTER_YAML):
	@mkdir -p $(DAGSTER_HOME)
	@printf 'telemetry:\n  enabled: false\n' > $(DAGSTER_YAML)

run: $(STAMP) $(DAGSTER_YAML) ## materialize every asset and check, then print a summary
	$(BIN)/dagster asset materialize -m wine_assets --select '*'
	@$(BIN)/wine-assets summary

release: $(STAMP) $(DAGSTER_YAML) ## re-check the stored evaluation and publish to the registry
	$(BIN)/dagster job execute -m wine_assets -j release_job
	@$(BIN)/wine-assets registry show

test: $(STAMP) ## run the tests with coverage (terminal and coverage.xml)
	$(BIN)/python -m pytest --cov=wine_assets --cov-report=term-missing --cov-report=xml

dev: $(STAMP) $(DAGSTER_YAML) ## the Dagster UI on http://$(HOST):$(PORT)
	$(BIN)/dagster dev -w workspace.yaml -h $(HOST) -p $(PORT)

clean: ## remove artifacts, caches and coverage files (keeps .venv, the registry and run history)
	rm -rf artifacts .pytest_cache .ruff_cache .coverage .coverage.* coverage.xml build *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

clean-all: clean ## also remove the registry, the Dagster instance (.dagster_home) and .venv
	rm -rf registry $(DAGSTER_HOME) $(VENV)
