# ratelimit-svc — `make run` and `make test` set themselves up (a venv in .venv) on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# `make run` defaults: the example rules in config/ on the in-process memory backend.
# Override any of them from the environment, e.g. `BACKEND_TYPE=redis REDIS_SOCKET_TYPE=tcp REDIS_URL=localhost:6379 make run`.
export BACKEND_TYPE ?= memory
export RUNTIME_ROOT ?= $(CURDIR)
export RUNTIME_SUBDIRECTORY ?= config
export RUNTIME_APPDIRECTORY ?= .
export USE_STATSD ?= false
export LOG_LEVEL ?= INFO

.PHONY: setup run test unit lint proto clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: $(STAMP)
	$(BIN)/ratelimit

test: lint unit

unit: $(STAMP)
	$(BIN)/pytest -n auto -q

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/mypy

proto: $(STAMP)
	$(BIN)/python scripts/genproto.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
