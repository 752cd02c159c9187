# The README's two commands: `make demo` and `make test`. Each builds .venv on first use:
# the demo needs only the command line's extra, the tests every driver and tool.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

demo: $(VENV)/.cli
	$(BIN)/credkeeper demo

test: $(VENV)/.dev lint
	$(BIN)/pytest

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

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
	touch $@ $(VENV)/.cli

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis
