# The README's commands. Every target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock requirements-dev.lock | cksum | cut -d' ' -f1)

.PHONY: install run run-prod test test-fast test-unit lint audit lock bench system-deps clean

install: $(STAMP)

# Exactly the pinned versions (runtime, then tools pinned against them), then the project
# itself without dependencies: the suite runs what the image ships.
$(STAMP): pyproject.toml requirements.lock requirements-dev.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock -r requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

# redis-server for the shared-tier tests, chromium for the preview page test; wrk for the benchmark.
system-deps:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
# The front (nginx-light), promtool (prometheus) for the alert and dashboard checks, openssl and curl
# for the TLS test: one apt-get update for whatever of them is missing.
	@missing=""; \
	  { [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null; } || missing="$$missing nginx-light"; \
	  command -v promtool >/dev/null || missing="$$missing prometheus"; \
	  command -v openssl >/dev/null || missing="$$missing openssl"; \
	  command -v curl >/dev/null || missing="$$missing curl"; \
	  if [ -n "$$missing" ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }

run: install
	./scripts/run.sh

# The production shape: the nginx front on http://localhost:8000, gunicorn behind it on 127.0.0.1:8001.
run-prod: install system-deps
	./scripts/run-prod.sh

# Three steps. The minute-long soaks (marked slow: they pace a flood and mostly wait) each
# run on a pytest worker of their own from the start, in a second pytest beside the rest
# (three workers: most tests wait on sockets and clocks, not the CPU); their output follows
# the rest's. Then the timing promises under heavy concurrency (marked serial), alone.
SLOW_LOG := $(VENV)/slow-tests.log
test: install system-deps
	@$(PY) -m pytest -p no:cacheprovider -n 6 -m "slow and not serial" > $(SLOW_LOG) 2>&1 & slow=$$!; \
	  $(PY) -m pytest -p no:cacheprovider -n 3 --dist worksteal -m "not slow and not serial"; fast=$$?; \
	  wait $$slow; slow_rc=$$?; echo "--- the slow tests:"; cat $(SLOW_LOG); \
	  test $$fast -eq 0 && test $$slow_rc -eq 0
	$(PY) -m pytest -p no:cacheprovider -m serial

test-fast: install system-deps
	$(PY) -m pytest -n 4 --dist worksteal -m "not slow and not serial"
	$(PY) -m pytest -m "serial and not slow"

# The unit layer alone: pure logic on a fake clock, no sockets, no sleeps (seconds).
test-unit: install
	$(PY) -m pytest tests/unit

lint: install
	$(VENV)/bin/ruff check app simulator testkit tests bench scripts gunicorn.conf.py
	$(VENV)/bin/ruff format --check app simulator testkit tests bench scripts gunicorn.conf.py
	$(VENV)/bin/mypy

# bandit over app/ (no findings allowed) and pip-audit over the pinned runtime dependencies.
# pip-audit fails the build on a known vulnerability; a registry it cannot reach is reported, not fatal.
audit: install
	$(VENV)/bin/bandit -q -r app
	@out=$$(timeout 180 $(VENV)/bin/pip-audit -r requirements.lock --no-deps --progress-spinner off 2>&1); rc=$$?; \
	  echo "$$out" | grep -v "^WARNING"; \
	  if echo "$$out" | grep -q "known vulnerabilit[a-z]* found" && ! echo "$$out" | grep -q "No known"; then exit 1; fi; \
	  if [ $$rc -ne 0 ]; then echo "pip-audit could not complete (exit $$rc): see above"; fi
	$(VENV)/bin/hadolint Dockerfile deploy/nginx/Dockerfile
	$(VENV)/bin/kubernetes-validate --strict --quiet deploy/k8s/*.yaml

# Re-pin the dependencies after changing pyproject.toml: the runtime lock (what the image
# installs), then the tools' lock resolved against it.
lock: install
	$(PY) -m pip install . --dry-run --ignore-installed --quiet --report /tmp/proxy-lock.json
	$(PY) scripts/write_lock.py /tmp/proxy-lock.json > requirements.lock
	$(PY) -m pip install '.[test,dev,bench]' -c requirements.lock --dry-run --ignore-installed --quiet \
	  --report /tmp/proxy-dev-lock.json
	$(PY) scripts/write_lock.py /tmp/proxy-dev-lock.json --except requirements.lock > requirements-dev.lock

bench: install system-deps
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(PY) -m bench $(BENCH_ARGS)

# docs/configuration.md and .env.example, generated from app/settings.py, gunicorn.conf.py and the
# front's scripts: run after changing a setting (tests/test_docs.py fails while either is stale).
.PHONY: docs
docs: install
	$(PY) scripts/gen_docs.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
