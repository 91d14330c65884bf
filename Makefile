# mlpaint — `make` or `make help` lists the targets.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.DEFAULT_GOAL := help
.PHONY: help setup lock run fetch serve test browser postgres prometheus redis lint unit bench bench-train stack-up stack-down deploy clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv and install mlpaint with its dev tools

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

lock: ## re-resolve pyproject.toml's dependencies to their newest releases into constraints.txt
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet -e '.[dev]'
	{ sed -n '/^#/p' constraints.txt; .venv-lock/bin/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock

run: setup ## the main job on embedded defaults: fetch MNIST, train, register, publish with explanations, then serve the drawing page
	$(BIN)/mlpaint train --publish-to .mlpaint/bundles
	@echo "MLPaint: open http://127.0.0.1:8000 and draw a digit (Ctrl-C stops the server)"
	$(BIN)/mlpaint serve --bundle .mlpaint/bundles

serve: setup ## serve the published bundle: the drawing page at http://127.0.0.1:8000
	$(BIN)/mlpaint serve --bundle .mlpaint/bundles

fetch: setup ## only fetch, verify, join and explore MNIST (the default mirror chain)
	$(BIN)/mlpaint data fetch

# Most tests wait on the services they start, so two pytest workers share the cores (a
# file's tests on one worker, sharing its fixtures); the stack's tests, whose fault tests
# wait out heartbeats and retries, run after them, alone.
test: setup browser postgres prometheus redis lint ## lint, then the whole suite (it starts its own HTTP, S3, PostgreSQL, Prefect, MLflow, Prometheus, Redis and MLPaint servers)
	$(BIN)/pytest -m "not stack" --numprocesses 2 --dist loadfile
	$(BIN)/pytest -m stack

browser: ## Debian's chromium for the browser tests (Playwright drives it; it cannot download one)
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

postgres: ## Debian's PostgreSQL for the stack (infra/stack.sh runs its own cluster in the stack folder)
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }

prometheus: ## Debian's Prometheus for the stack (infra/stack.sh runs it with its data in the stack folder)
	@command -v prometheus >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

redis: ## Debian's redis-server, which the tests start to share a feedback rate limit between servers
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; }

lint: setup ## ruff
	$(BIN)/ruff check .

unit: setup ## the fast tests only: no services
	$(BIN)/pytest tests/unit

bench: setup ## the ingestion benchmark (needs ../shared/data/mnist); results go in BENCHMARKS.md
	$(BIN)/python -m bench.ingest --runs 5

bench-train: setup ## the training benchmark on full MNIST (long: about an hour on 2 cores)
	$(BIN)/python -m bench.train

stack-up: setup postgres prometheus ## start PostgreSQL, Prefect server + work pool + worker, MLflow server (both on PostgreSQL), Prometheus; deploy prefect.yaml
	infra/stack.sh up

stack-down: ## stop the local stack
	infra/stack.sh down

deploy: setup ## (re)register the deployments in prefect.yaml with the running Prefect server
	infra/stack.sh deploy

clean: ## remove the virtualenv and build debris (not the data cache)
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
