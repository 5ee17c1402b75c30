# twinfed: `make demo` and `make test` set up .venv themselves when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.twinfed-installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: venv demo test test-slow lint bench lock clean

venv: $(STAMP)

# Re-install only when the dependency pins change; otherwise this is a no-op.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

demo: venv
	$(BIN)/twinfed demo

test: venv
	$(BIN)/python -m pytest

test-slow: venv
	$(BIN)/python -m pytest -m slow

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy flows federated models data_contracts bench

bench: venv
	$(BIN)/python bench/simulator.py
	$(BIN)/python bench/sites.py
	$(BIN)/python bench/marts.py

# Refresh requirements.lock from what pip resolves for pyproject.toml in a scratch venv.
lock:
	rm -rf /tmp/twinfed-lock && $(PYTHON) -m venv /tmp/twinfed-lock
	/tmp/twinfed-lock/bin/pip install --quiet -e '.[dev]'
	( echo "# Exact versions that co-install on Python 3.11 here (pip resolved them from pyproject.toml)."; \
	  echo "# Used as pip constraints by the Makefile; regenerate with \`make lock\`."; \
	  /tmp/twinfed-lock/bin/pip freeze --exclude-editable | sed 's/+cpu$$//' ) > requirements.lock

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
