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

.PHONY: setup run test test-unit unit lint proto clean reference differential

# Go, for the reference the differential tier runs (tests/differential, docs/compatibility.md);
# CI machines have it at /usr/local/go/bin. Without Go that tier is skipped with a note.
export PATH := $(PATH):/usr/local/go/bin

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# xds-protos (Envoy's generated code, for the wire-compatibility tests) in a directory of its
	# own: it bundles old copies of the opentelemetry protos that would shadow the real ones.
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/xds-protos xds-protos
	touch $@

run: $(STAMP)
	$(BIN)/ratelimit

test: lint reference unit

unit: $(STAMP)
	$(BIN)/pytest -n auto -q

# The fast loop: tests/unit only (no processes, no network sockets; seconds).
test-unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

# The settings table of docs/configuration.md, from the settings model (a unit test checks it).
.PHONY: docs
docs: $(STAMP)
	$(BIN)/python -m ratelimit_svc.settings.table docs/configuration.md

# The pinned reference (envoyproxy/ratelimit's service_cmd), installed with `go install` unless the
# pinned version is already in Go's bin directory; prints why not where it cannot be had.
reference: $(STAMP)
	@cd tests && ../$(BIN)/python -m differential.processes

# A long seeded differential run: DIFF_SEED, DIFF_CONFIGS, DIFF_REQUESTS (per config),
# DIFF_CONFIGS_PER_PROFILE; prints the tally (identical / explained per allow-list ID / unexplained).
differential: reference
	DIFF_CONFIGS=$${DIFF_CONFIGS:-100} DIFF_REQUESTS=$${DIFF_REQUESTS:-150} \
		$(BIN)/pytest -q -s -p no:cacheprovider --timeout=0 tests/differential

proto: $(STAMP)
	$(BIN)/python scripts/genproto.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Envoy + the service + Redis + an echo upstream, no Docker (scripts/demo.py, docs/demo.md):
# a burst per route, a table of allowed vs limited, then running until Ctrl-C.
# `make demo DEMO_ARGS=--detach` returns once the table is printed; `make demo-down` stops it.
.PHONY: demo demo-down
demo: $(STAMP)
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

demo-down: $(STAMP)
	$(BIN)/python scripts/demo.py down

# Load with key churn, config reloads and a Redis restart for SOAK_SECONDS (default 600); reports
# errors, p99 and RSS over time and fails if RSS grows 10% after the warm-up (scripts/soak.py).
.PHONY: soak
soak: $(STAMP)
	$(BIN)/python scripts/soak.py

# ShouldRateLimit side by side with envoyproxy/ratelimit built from source (Go), ours on each gRPC
# transport and the floors (scripts/bench.py, docs/performance.md): a table and .bench/results.json.
# BENCH_QUICK=1 for a short run, BENCH_STRICT=1 to fail when a target is missed.
.PHONY: bench
bench: $(STAMP)
	@command -v h2load >/dev/null && command -v redis-server >/dev/null \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq --no-install-recommends \
		nghttp2-client redis-server >/dev/null; } || true
	$(BIN)/python scripts/bench.py
	$(BIN)/python scripts/bench_algorithms.py

# CPU per request of each counting algorithm on Redis (scripts/bench_algorithms.py,
# docs/algorithms.md (Cost)); also the last part of `make bench`.
.PHONY: bench-algorithms
bench-algorithms: $(STAMP)
	$(BIN)/python scripts/bench_algorithms.py
