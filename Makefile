# The README's two commands: `make demo` and `make test`. Each builds .venv on first use:
# the demo needs only the command line's extra, the tests every driver and tool.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The Node.js example's drivers, for the tests that run it; installed only where npm is, so
# `make test` works without Node.js too (those tests then skip, naming the npm command).
APP_NODE := docs/examples/app_cipher
NODE_MODULES := $(if $(shell command -v npm),$(APP_NODE)/node_modules/.installed)

# The whole tree's branch coverage under the core and CLI tests may not fall below this.
COVERAGE_MIN := 86

.PHONY: demo test fast chaos lint flow-coverage docs docs-build clean

demo: $(VENV)/.cli
	$(BIN)/credkeeper demo

# What CI runs. Coverage is measured on the core, command-line and service tests (about two
# minutes; the service's own process runs under `coverage run`), where the engine's branches
# are; the adapters' and the integration tests (storms, crashes, chaos) run after it without
# coverage, which would cost CI more minutes than it has.
# The rest runs on $(WORKERS) pytest-xdist workers, a test class or module to each at a time:
# most of its time is spent waiting (leases expiring, outages, a provider's latency, worker
# processes starting), which two workers overlap. Each worker starts its own MongoDB and moto
# servers; the chaos table is gathered from both.
# --tb=native: CPython 3.11.7 can crash formatting pytest's long tracebacks under coverage.
COVERED := tests/core tests/cli tests/server tests/test_backends.py
WORKERS ?= 2
test: $(VENV)/.dev lint docs-build $(NODE_MODULES) flow-coverage
	$(BIN)/pytest $(COVERED) --tb=native --cov --cov-report=term-missing:skip-covered \
		--cov-fail-under=$(COVERAGE_MIN)
	$(BIN)/pytest $(addprefix --ignore=,$(COVERED)) -n $(WORKERS) --dist loadscope

# The everyday loop: lint, types and every test but the slow storms and crash cases.
fast: $(VENV)/.dev lint $(NODE_MODULES)
	$(BIN)/pytest -m "not slow"

# The chaos suite on every backend (docs/reliability.md); prints its table at the end. `make
# test` runs it too, among the slow cases.
chaos: $(VENV)/.dev
	$(BIN)/pytest tests/adapters -k Chaos -m slow -p no:randomly -q

# The refresh flow's own tests, stepping it by hand, must cover every branch of _flow.py.
flow-coverage: $(VENV)/.dev
	$(BIN)/pytest -q tests/core/test_flow.py --cov=credkeeper._flow --cov-branch --cov-fail-under=100 -p no:randomly

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The documentation site (mkdocs.yml), served with live reload on http://127.0.0.1:8000.
docs: $(VENV)/.dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# What CI builds: a broken link, a page missing from the nav or an API reference that does not
# resolve fails the run. The site goes to build/site.
docs-build: $(VENV)/.dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

$(VENV)/.venv:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "credkeeper needs Python 3.11 or newer; set PYTHON=python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	touch $@

$(VENV)/.cli: pyproject.toml $(VENV)/.venv
	$(BIN)/python -m pip install --quiet -e '.[cli]'
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.venv
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet -e docs/examples/redis_store
	touch $@ $(VENV)/.cli

# Offline, the install fails without failing the run: the tests needing it skip and say why.
$(APP_NODE)/node_modules/.installed: $(APP_NODE)/package-lock.json
	npm ci --prefix $(APP_NODE) --no-audit --no-fund && touch $@ || \
		echo "npm ci failed: the Node.js example's tests will skip"

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis .coverage .coverage.* $(APP_NODE)/node_modules
