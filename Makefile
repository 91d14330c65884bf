# mlpaint — `make` or `make help` lists the targets.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.DEFAULT_GOAL := help
.PHONY: help setup run test lint unit integration bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv and install mlpaint with its dev tools

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: setup ## the main job on embedded defaults: fetch MNIST (default mirror chain), verify, join, explore
	$(BIN)/mlpaint data fetch

test: setup lint ## lint, then the whole suite (it starts its own HTTP, S3 and Prefect servers)
	$(BIN)/pytest

lint: setup ## ruff
	$(BIN)/ruff check .

unit: setup ## the fast tests only: no services
	$(BIN)/pytest tests/unit

bench: setup ## the ingestion benchmark (needs ../shared/data/mnist); results go in BENCHMARKS.md
	$(BIN)/python -m bench.ingest --runs 5

clean: ## remove the virtualenv and build debris (not the data cache)
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
