# `make test` and `make demo` work on a fresh machine: the virtual environment is made when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint typecheck pytest demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the project's metadata changed (fast when present).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check
	$(BIN)/ruff format --check

typecheck: $(STAMP)
	$(BIN)/mypy

# The Debian packages of the tests' testbeds (registry, browser, containerd, nginx, ...), installed once
# before the tests rather than inside a test's time limit (scripts/testbeds.py; quick when all are there).
pytest: $(STAMP)
	$(BIN)/python scripts/testbeds.py
	$(BIN)/python -m pytest

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python scripts/bench_fabric.py --quick

# An origin, `dfz up` and 4 more daemons on this machine fetch one 256 MiB file at once (scripts/demo.py);
# e.g. `make demo DEMO_ARGS="--size-mib 64 --peers 3"` for another size or swarm.
demo: $(STAMP)
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
