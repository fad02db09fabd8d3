# ratelimit-svc — `make run` and `make test` set themselves up (a venv in .venv) on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two installs in one venv: the runtime alone (`make run`), and the runtime plus the test and dev
# tools (`make setup`, `make test`). Both take the runtime packages from requirements.lock.
RUNTIME_STAMP := $(VENV)/.runtime
STAMP := $(VENV)/.installed
# Tools the tests use that are not Python packages, built into .cache/bin (`make helm`).
CACHE_BIN := $(CURDIR)/.cache/bin
HELM_VERSION := v3.22.0
GO ?= $(shell command -v go 2>/dev/null || ls /usr/local/go/bin/go 2>/dev/null)

# `make run` defaults: the example rules in config/ on the in-process memory backend.
# Override any of them from the environment, e.g. `BACKEND_TYPE=redis REDIS_SOCKET_TYPE=tcp REDIS_URL=localhost:6379 make run`.
export BACKEND_TYPE ?= memory
export RUNTIME_ROOT ?= $(CURDIR)
export RUNTIME_SUBDIRECTORY ?= config
export RUNTIME_APPDIRECTORY ?= .
export USE_STATSD ?= false
export LOG_LEVEL ?= INFO
# Editors write swap, backup and lock files next to the file being edited (.x.yaml.swp, x.yaml~,
# .#x.yaml, vim's 4913 probe): not rules. The reference reads every file; these two settings skip
# them (docs/deployment.md (First contact)).
export RUNTIME_IGNOREDOTFILES ?= true
export RUNTIME_IGNORE_PATTERNS ?= *~,*.swp,*.swx,*.swo,.#*,\#*\#,4913,*.tmp,*.bak,*.orig

.PHONY: setup run test test-unit unit lint proto clean reference differential helm manifests \
	lock check-minimums

# Go, for the reference the differential tier runs (tests/differential, docs/compatibility.md);
# CI machines have it at /usr/local/go/bin. Without Go that tier is skipped with a note.
export PATH := $(PATH):/usr/local/go/bin

setup: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The runtime only (no test tools, no Envoy): what `make run` needs.
$(RUNTIME_STAMP): pyproject.toml requirements.lock | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet --constraint requirements.lock -e .
	touch $@ $(COMPILED_STAMP)

$(STAMP): pyproject.toml requirements.lock | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet --constraint requirements.lock -e '.[dev]'
	# xds-protos (Envoy's generated code, for the wire-compatibility tests) in a directory of its
	# own: it bundles old copies of the opentelemetry protos that would shadow the real ones.
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/xds-protos xds-protos
	touch $@ $(RUNTIME_STAMP) $(COMPILED_STAMP)

# The request path's modules compiled with mypyc (setup.py's COMPILED, docs/performance.md
# (Compiled modules)): built by the installs above, and again when one of them changes. Without a
# C compiler they run as Python.
COMPILED_STAMP := $(VENV)/.compiled
COMPILED_SOURCES := setup.py \
	$(addprefix src/,$(shell sed -n 's/^    "\(ratelimit_svc\/[a-z_/]*\.py\)",.*/\1/p' setup.py))
$(COMPILED_STAMP): $(COMPILED_SOURCES) | $(RUNTIME_STAMP)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

run: $(RUNTIME_STAMP) $(COMPILED_STAMP)
	$(BIN)/ratelimit

test: lint reference unit

unit: $(STAMP) $(COMPILED_STAMP) helm
	$(BIN)/pytest -n auto -q

# The fast loop: tests/unit only (no processes, no network sockets; seconds).
test-unit: $(STAMP) $(COMPILED_STAMP)
	$(BIN)/pytest -q tests/unit

# Helm for the chart tests (tests/test_helm.py), built with Go where Go is installed; without Go
# those tests skip and say why.
helm: $(CACHE_BIN)/helm
$(CACHE_BIN)/helm:
	@if [ -n "$(GO)" ]; then \
		echo "building helm $(HELM_VERSION) into .cache/bin (go install)"; \
		GOBIN=$(CACHE_BIN) GOFLAGS=-mod=mod $(GO) install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION) \
		|| echo "could not build helm: the Helm chart tests will skip"; \
	else echo "no Go: the Helm chart tests will skip"; fi

# deploy/kubernetes/ratelimit-svc.yaml: the chart rendered with its defaults (a test fails if stale).
manifests: $(STAMP) helm
	$(BIN)/python scripts/render_manifests.py

# requirements.lock: every runtime package pinned (uvloop included), for CI, `make run` and the
# image. Regenerate after changing [project.dependencies].
lock: $(STAMP)
	$(BIN)/pip-compile --quiet --strip-extras --extra uvloop --no-emit-index-url \
		--no-emit-find-links --output-file requirements.lock pyproject.toml

# The declared minimum versions, installed into a fresh venv and exercised (scripts/check_minimums.py).
check-minimums: $(STAMP)
	$(BIN)/python scripts/check_minimums.py

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
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache build
	find src -name '*.so' -delete
	rm -f src/ratelimit_svc/compiled.sha256

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
soak: $(STAMP) $(COMPILED_STAMP)
	$(BIN)/python scripts/soak.py

# A 10,000- and a 100,000-descriptor config swapped in under load: load time, the slowest call
# during the reload, RSS (scripts/bench_reload.py, docs/reliability.md).
.PHONY: bench-reload
bench-reload: $(STAMP) $(COMPILED_STAMP)
	$(BIN)/python scripts/bench_reload.py

# ShouldRateLimit side by side with envoyproxy/ratelimit built from source (Go), ours on each gRPC
# transport and the floors (scripts/bench.py, docs/performance.md): a table and .bench/results.json.
# Then the counting algorithms' cost and the reload benchmark (the two targets below).
# BENCH_QUICK=1 for a short run, BENCH_STRICT=1 to fail when a target is missed.
.PHONY: bench
bench: $(STAMP) $(COMPILED_STAMP)
	@command -v h2load >/dev/null && command -v redis-server >/dev/null \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq --no-install-recommends \
		nghttp2-client redis-server >/dev/null; } || true
	$(BIN)/python scripts/bench.py
	$(BIN)/python scripts/bench_algorithms.py
	$(BIN)/python scripts/bench_reload.py

# CPU per request of each counting algorithm on Redis (scripts/bench_algorithms.py,
# docs/algorithms.md (Cost)); also the last part of `make bench`.
.PHONY: bench-algorithms
bench-algorithms: $(STAMP)
	$(BIN)/python scripts/bench_algorithms.py
