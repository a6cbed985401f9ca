# The README's commands. Every target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install run test test-fast lint bench system-deps clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# redis-server for the shared-tier tests; wrk for the benchmark.
system-deps:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }

run: install
	./scripts/run.sh

test: install system-deps
	$(PY) -m pytest

test-fast: install system-deps
	$(PY) -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check app simulator tests bench
	$(VENV)/bin/ruff format --check app simulator tests bench
	$(VENV)/bin/mypy

bench: install system-deps
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
