# Two entry points for a fresh clone: `make demo` and `make test`. Each builds .venv from pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: install demo test lint serve simulate
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/realtime-reset-proxy demo

test: $(STAMP)
	$(BIN)/ruff check proxy tests
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check proxy tests
	$(BIN)/mypy

serve: $(STAMP)
	$(BIN)/realtime-reset-proxy --config config.example.toml

simulate: $(STAMP)
	$(BIN)/realtime-reset-proxy simulate --port 8766
